"""Checkpoints list their files (``COMPLETE``); resume falls back past damaged ones, export refuses them.

Unit tests on hand-made checkpoints, then one real 1-process run of the tiny model (6 steps, checkpoints
at 3 and 6) through the CLI, copied per case: a flipped byte and a deleted file in the newest
checkpoint, an old-format marker, and ``recgpt export`` / ``recgpt evaluate`` of a damaged checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from configs import CheckpointError, sha256_file
from tests.conftest import losses, recgpt_train, train_log
from trainer.checkpoint import (
    COMPLETE,
    CheckpointManager,
    checkpoint_damage,
    find_resume_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
    write_complete,
)
from trainer.faults import Faults

DS_FILE = "ds/step_00000020/mp_rank_00_model_states.pt"  # of the hand-made checkpoint 20


def _ds_rel(step: int) -> str:
    return f"ds/step_{step:08d}/mp_rank_00_model_states.pt"


def _ckpt(run: Path, step: int, *, legacy: bool = False, latest: bool = True) -> Path:
    """A hand-made checkpoint ``step`` of ``run`` with a DeepSpeed-like file, published as latest."""
    name = f"step_{step:08d}"
    d = run / "checkpoints" / name
    (d / "ds" / name).mkdir(parents=True)
    (d / "ds" / "latest").write_text(name)
    (d / "ds" / name / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "vocab.json").write_text("{}")
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    if legacy:
        (d / COMPLETE).write_text(f"{name}\n")
    else:
        write_complete(d, name, step, 1)
    if latest:
        (run / "checkpoints" / "latest").write_text(name)
    return d


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- units


def test_complete_lists_every_file_with_size_and_sha256(tmp_path):
    d = _ckpt(tmp_path, 20)
    doc = json.loads((d / COMPLETE).read_text())
    assert (doc["format_version"], doc["checkpoint"], doc["step"], doc["world_size"]) == (
        1,
        "step_00000020",
        20,
        1,
    )
    on_disk = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != COMPLETE)
    assert sorted(doc["files"]) == on_disk
    for rel, entry in doc["files"].items():
        assert entry == {"bytes": (d / rel).stat().st_size, "sha256": sha256_file(d / rel)}
    assert verify_checkpoint(d) is True and checkpoint_damage(d) == (None, True)


def test_damage_names_the_file(tmp_path):
    d = _ckpt(tmp_path, 20)
    _flip_byte(d / DS_FILE)
    assert checkpoint_damage(d) == (f"{DS_FILE}: sha256 differs", True)
    with pytest.raises(CheckpointError, match=f"damaged checkpoint \\({DS_FILE}: sha256 differs\\)"):
        verify_checkpoint(d)
    (d / "trainer_state.json").unlink()
    assert checkpoint_damage(d)[0] == "trainer_state.json: missing"  # sizes are checked before hashes
    (d / DS_FILE).write_bytes(b"short")
    assert checkpoint_damage(d)[0] == f"{DS_FILE}: 5 bytes, COMPLETE lists 4096"
    (d / COMPLETE).write_text('{"files": ')  # a hand-edited or bit-rotten marker
    assert checkpoint_damage(d)[0].startswith("COMPLETE: unreadable")
    legacy = _ckpt(tmp_path, 10, legacy=True)
    assert checkpoint_damage(legacy) == (None, False) and verify_checkpoint(legacy) is False
    (legacy / "trainer_state.json").unlink()
    assert checkpoint_damage(legacy) == ("trainer_state.json: missing", False)


def test_auto_resume_falls_back_with_one_line(tmp_path, capsys):
    _ckpt(tmp_path, 10)
    good = _ckpt(tmp_path, 20)
    bad = _ckpt(tmp_path, 30)
    assert find_resume_checkpoint("auto", tmp_path) == bad and capsys.readouterr().err == ""
    _flip_byte(bad / _ds_rel(30))
    assert find_resume_checkpoint("auto", tmp_path) == good
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "recgpt: checkpoint step_00000030 is damaged (ds/step_00000030/mp_rank_00_model_states.pt: "
        "sha256 differs); resuming from step_00000020"
    ]
    # Two damaged ones: both are named on the one line.
    (good / "tokenizer" / "vocab.json").unlink()
    assert find_resume_checkpoint("auto", tmp_path).name == "step_00000010"
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        "step_00000030 is damaged" in line
        and "step_00000020 is damaged (tokenizer/vocab.json: missing)" in line
    )
    assert line.endswith("resuming from step_00000010")
    # An explicit path never falls back.
    with pytest.raises(CheckpointError, match="tokenizer/vocab.json: missing"):
        find_resume_checkpoint(str(good), tmp_path)


def test_auto_resume_refuses_when_nothing_verifies(tmp_path):
    old = _ckpt(tmp_path, 10)
    new = _ckpt(tmp_path, 20)
    (old / "trainer_state.json").write_text("{}")
    (new / DS_FILE).unlink()
    with pytest.raises(CheckpointError) as e:
        find_resume_checkpoint("auto", tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{new}: damaged checkpoint ({DS_FILE}: missing)")
    assert "none of the 1 earlier complete checkpoints verifies" in msg and "train.resume=never" in msg
    assert "\n" not in msg
    assert find_resume_checkpoint("never", tmp_path) is None
    assert find_resume_checkpoint("auto", tmp_path / "fresh") is None


def test_latest_naming_a_missing_checkpoint_falls_back(tmp_path, capsys):
    good = _ckpt(tmp_path, 10)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000020")  # published, then lost
    assert find_resume_checkpoint("auto", tmp_path) == good
    assert capsys.readouterr().err.strip() == (
        "recgpt: checkpoint step_00000020 is damaged (directory missing); resuming from step_00000010"
    )
    shutil.rmtree(good)
    with pytest.raises(CheckpointError, match="step_00000020: damaged checkpoint \\(directory missing\\)"):
        find_resume_checkpoint("auto", tmp_path)


def test_checkpoints_newer_than_latest_are_ignored_and_kept(tmp_path, capsys):
    """After a fall back, ``latest`` still names the damaged checkpoint until the run saves again."""
    for s in (10, 20, 30):
        _ckpt(tmp_path, s)
    root = tmp_path / "checkpoints"
    _flip_byte(root / "step_00000030" / _ds_rel(30))
    (root / "latest").write_text("step_00000020")  # the resumed run saved step 20 again
    assert find_resume_checkpoint("auto", tmp_path).name == "step_00000020"
    assert capsys.readouterr().err == ""
    _ckpt(tmp_path, 25)  # keep_last=1: step 30 (newer than latest) is neither counted nor deleted
    CheckpointManager(tmp_path, rank=0, world_size=1, keep_last=1, faults=Faults(0)).prune()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000025", "step_00000030"]


def test_old_format_is_used_with_one_line(tmp_path, capsys):
    legacy = _ckpt(tmp_path, 10, legacy=True)
    assert resolve_checkpoint(tmp_path) == legacy
    assert capsys.readouterr().err.strip() == (
        f"recgpt: checkpoint {legacy} has an old-format COMPLETE marker (no file list) and cannot be "
        "verified; using it as it is"
    )
    assert find_resume_checkpoint("auto", tmp_path) == legacy
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("recgpt: resuming from step_00000010, which has an old-format COMPLETE")


# --------------------------------------------------------------------------- a real run


# 1 process, 6 steps of 32 sequences, checkpoints at 3 and 6, every step logged, final evaluation only.
STEPS = [
    "train.max_steps=6",
    "train.checkpoint_interval=3",
    "train.eval_interval=0",
    "train.log_interval=1",
    "data.num_workers=0",
    "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def base_run(sample_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    p = recgpt_train(sample_shards, out, STEPS, nproc=1)
    assert p.returncode == 0, p.stderr[-4000:]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _ds_file(ckpt: Path) -> Path:
    return next(ckpt.glob("ds/step_*/mp_rank_00_model_states.pt"))


def _recgpt_main(args: list[str], capsys) -> tuple[int, list[str]]:
    """``recgpt ARGS`` in this process; returns (exit code, stderr lines). The process-group set-up of
    ``evaluate`` exports RANK/MASTER_PORT/...: the environment is restored for the later subprocesses."""
    from launcher.cli import main

    env = dict(os.environ)
    try:
        code = main(args)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return code, capsys.readouterr().err.strip().splitlines()


def test_real_complete_lists_every_file(base_run):
    root = base_run / "checkpoints"
    assert (root / "latest").read_text() == "step_00000006"
    for name in ("step_00000003", "step_00000006"):
        ckpt = root / name
        doc = json.loads((ckpt / COMPLETE).read_text())
        assert doc["checkpoint"] == name and doc["world_size"] == 1 and doc["step"] == int(name[5:])
        files = sorted(
            p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE
        )
        assert sorted(doc["files"]) == files
        assert {f"ds/{name}/mp_rank_00_model_states.pt", "trainer_state.json", "rng/rank_00000.pt",
                "reader/rank_00000.json", "config.yaml", "ds/latest"} <= set(files)  # fmt: skip
        for rel, entry in doc["files"].items():
            assert entry == {"bytes": (ckpt / rel).stat().st_size, "sha256": sha256_file(ckpt / rel)}, rel


def test_flipped_byte_falls_back_and_finishes_like_the_uninterrupted_run(base_run, sample_shards, tmp_path):
    out = _copy(base_run, tmp_path)
    ds = _ds_file(out / "checkpoints" / "step_00000006")
    _flip_byte(ds, ds.stat().st_size // 2)
    p = recgpt_train(sample_shards, out, STEPS, nproc=1)
    assert p.returncode == 0, p.stderr[-4000:]
    notes = [ln for ln in p.stderr.splitlines() if "is damaged" in ln]
    assert notes == [
        "recgpt: checkpoint step_00000006 is damaged (ds/step_00000006/mp_rank_00_model_states.pt: "
        "sha256 differs); resuming from step_00000003"
    ]
    assert "step_00000003 at step 3" in p.stdout and "resumed from" in p.stdout
    # Steps 4-6 ran again from checkpoint 3 and gave the uninterrupted run's losses and final metrics.
    ref, got = losses(train_log(base_run)), losses(train_log(out))
    for s in range(1, 7):
        assert got[s] == pytest.approx(ref[s], abs=1e-6), s
    want = json.loads((base_run / "metrics.json").read_text())
    final = json.loads((out / "metrics.json").read_text())
    assert final.keys() == want.keys() and final["step"] == 6
    for k, v in want.items():
        assert final[k] == (pytest.approx(v, abs=1e-9) if isinstance(v, float) else v), k
    # The damaged checkpoint was replaced by the re-written step 6, which verifies.
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    assert verify_checkpoint(out / "checkpoints" / "step_00000006")


def test_deleted_file_falls_back_to_an_old_format_checkpoint(base_run, sample_shards, tmp_path):
    """A listed file of the newest checkpoint is gone; the previous one has the old one-line marker."""
    out = _copy(base_run, tmp_path)
    root = out / "checkpoints"
    (root / "step_00000006" / "rng" / "rank_00000.pt").unlink()
    (root / "step_00000003" / COMPLETE).write_text("step_00000003\n")
    p = recgpt_train(sample_shards, out, STEPS, nproc=1)
    assert p.returncode == 0, p.stderr[-4000:]
    notes = [ln for ln in p.stderr.splitlines() if ln.startswith("recgpt: ")]
    assert notes == [
        "recgpt: checkpoint step_00000006 is damaged (rng/rank_00000.pt: missing); resuming from "
        "step_00000003, which has an old-format COMPLETE marker (no file list) and cannot be verified"
    ]
    assert "step_00000003 at step 3" in p.stdout
    assert json.loads((out / "metrics.json").read_text())["step"] == 6
    assert max(losses(train_log(out))) == 6


def test_explicit_damaged_checkpoint_is_refused(base_run, sample_shards, tmp_path, capsys):
    out = _copy(base_run, tmp_path)
    ckpt = out / "checkpoints" / "step_00000006"
    rel = _ds_file(ckpt).relative_to(ckpt).as_posix()
    _flip_byte(ckpt / rel)
    want = f"{ckpt}: damaged checkpoint ({rel}: sha256 differs)"
    # recgpt export of the run directory (its latest) and of the checkpoint itself, recgpt evaluate.
    for args in (
        ["export", "--checkpoint", str(out), "--out", str(tmp_path / "model")],
        ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "model")],
        ["evaluate", "--checkpoint", str(ckpt), "--split", "valid"],
    ):
        code, err = _recgpt_main(args, capsys)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"recgpt {args[0]}: error: {want}"), err
    assert not (tmp_path / "model").exists()
    with pytest.raises(CheckpointError, match="sha256 differs"):
        find_resume_checkpoint(str(ckpt), out)  # train.resume=PATH: no fallback


def test_old_format_checkpoint_exports(base_run, tmp_path, capsys):
    out = _copy(base_run, tmp_path)
    ckpt = out / "checkpoints" / "step_00000006"
    (ckpt / COMPLETE).write_text("step_00000006\n")
    code, err = _recgpt_main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "model")], capsys)
    assert code == 0, err
    assert [ln for ln in err if "old-format" in ln] == [
        f"recgpt: checkpoint {ckpt} has an old-format COMPLETE marker (no file list) and cannot be verified; "
        "using it as it is"
    ]
    assert json.loads((tmp_path / "model" / "export_manifest.json").read_text())["step"] == 6
