"""The recgpt CLI: every subcommand has real --help, bad config gives one line and exit 2."""

import subprocess
import sys

import pytest

from launcher.cli import build_parser, main

SUBCOMMANDS = [
    ["shards"],
    ["shards", "build"],
    ["shards", "inspect"],
    ["shards", "verify"],
    ["train"],
    ["evaluate"],
    ["export"],
    ["recommend"],
]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: recgpt " + " ".join(cmd))
    assert len(out.splitlines()) > 3


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.bogus=1"], "train.bogus"),
        (["zero.stage=4"], "zero.stage"),
        (["train.precision=fp8"], "train.precision"),
        (["zero.bf16=true"], "zero.bf16"),
        (["lora.r=0"], "lora.r"),
        (["train.max_steps=ten"], "train.max_steps"),
        (["nonsense"], "nonsense"),
    ],
)
def test_bad_config_is_one_line_exit_2(overrides, key, capsys):
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err


def test_bad_key_in_yaml_names_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.yaml" in err and "train.max_stepz" in err and "Traceback" not in err


def test_python_dash_m_launcher_without_install():
    # What a Ray job's working directory runs: no console script, only the source tree.
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "--help"], capture_output=True, text=True, check=True
    )
    assert "shards" in out.stdout and "recommend" in out.stdout
    res = subprocess.run(
        [sys.executable, "-m", "launcher", "train", "zero.stage=7"], capture_output=True, text=True
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "zero.stage" in res.stderr


def test_output_cut_short_by_head_ends_quietly(sample_shards):
    """`recgpt shards inspect --json | head`: when the reader goes away, no BrokenPipeError traceback.

    The pipe's read end is closed before the child (still importing) writes its first byte, so every
    write fails with EPIPE — what `head` does to a long output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "shards", "inspect", str(sample_shards), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_bad_data_settings_fail_before_the_process_group_starts(tmp_path, sample_shards, capsys):
    """A wrong data.shards, a data.max_history longer than the shards' windows or more sampled negatives
    than items: one line naming the key, exit 2, before DeepSpeed and the process group start (no
    op-build noise first)."""
    import torch.distributed as dist

    assert main(["train", f"data.shards={tmp_path / 'nope'}", f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recgpt train: error: data.shards:"), err
    too_long = [
        "train",
        f"data.shards={sample_shards}",
        "data.max_history=999",
        f"train.output_dir={tmp_path / 'r'}",
    ]
    assert main(too_long) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.max_history: 999 is longer" in err[0], err
    more_negatives = ["train.loss=sampled", "train.num_negatives=9724"]  # the sample has 9,724 items
    assert main([*too_long[:2], *more_negatives, f"train.output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.num_negatives: 9724 is not below the 9,724 items" in err[0], err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
