"""Every file in configs/ loads and validates; a bad key in any of them is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import ConfigError, load_config
from launcher.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "lora_adversarial.yaml", "gpt2_zero2_gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    if cfg.train.eval_interval and cfg.train.checkpoint_interval:
        assert cfg.train.checkpoint_interval % cfg.train.eval_interval == 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("override, key", [("train.bogus=1", "train.bogus"), ("zero.stage=5", "zero.stage")])
def test_bad_override_is_one_line_exit_2(path, override, key, capsys):
    assert main(["train", "--config", str(path), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and err[0].startswith("recgpt train: error:"), err


def test_bad_key_inside_a_copy_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIGS[0].read_text() + "\ntrain_extra:\n  x: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_extra" in err[0], err


def test_checkpoint_interval_must_be_a_multiple_of_eval_interval():
    with pytest.raises(ConfigError, match="train.checkpoint_interval"):
        load_config(CONFIGS[0], ["train.eval_interval=20", "train.checkpoint_interval=30"])
