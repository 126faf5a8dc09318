"""Per-rank state bytes (``trainer.monitor.state_bytes``) and ``benchmarks/zero_catalogue.py`` (issue 15
item 5: ZeRO-3 partitions the item table; a ZeRO-3 run checkpoints, loses a rank, resumes exactly and
exports) at CI size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import subprocess_env
from trainer.monitor import state_bytes

REPO = Path(__file__).resolve().parents[1]


def test_state_bytes_counts_weights_moments_and_gradients_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 8))
    model[1].register_buffer("scale", torch.ones(3))
    n = sum(p.numel() for p in model.parameters())  # 100*8 + 8*8 + 8 = 872
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert state_bytes(model, opt) == {"model": 4 * n + 12, "optimizer": 0}
    model(torch.tensor([1, 2])).sum().backward()
    # Gradients still held (the optimizer reaches them through its parameters), no moments yet.
    assert state_bytes(model, opt) == {"model": 4 * n + 12, "optimizer": 4 * n}
    opt.step()
    opt.zero_grad(set_to_none=True)
    held = state_bytes(model, opt)["optimizer"]
    # exp_avg + exp_avg_sq (fp32) and one scalar step tensor per parameter.
    assert held == 8 * n + sum(s["step"].untyped_storage().nbytes() for s in opt.state.values())


def test_state_bytes_counts_a_shared_storage_once():
    flat = torch.zeros(64)
    a, b = torch.nn.Parameter(flat[:32].view(4, 8)), torch.nn.Parameter(flat[32:].view(4, 8))
    model = torch.nn.Module()
    model.a, model.b = a, b
    opt = torch.optim.SGD([a, b], lr=0.1)
    opt.state[a]["momentum_buffer"] = flat[:32]  # a view of the same storage: nothing new
    assert state_bytes(model, opt) == {"model": 64 * 4, "optimizer": 0}


@pytest.mark.slow
@pytest.mark.distributed  # 5 torchrun launches of 2 gloo ranks, export and serving: ~2 min on 2 cores
def test_zero_catalogue_halves_state_and_resumes_exactly(sample_shards, tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "zero_catalogue.py"), "--shards", str(sample_shards),
           "--steps", "20", "--memory-steps", "5", "--precisions", "bf16", "--eval-users", "20",
           "--requests", "3", "--workdir", str(tmp_path / "w")]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "w" / "result.json").read_text())
    zero0, zero3 = result["memory"]
    assert (zero0["stage"], zero3["stage"]) == (0, 3)
    # Every rank of ZeRO-0 holds the same full state; ZeRO-3 holds about half of it on 2 ranks (the small
    # parameters below DeepSpeed's persistence threshold stay whole on every rank: "about").
    assert zero0["state_mib_per_rank"][0] == zero0["state_mib_per_rank"][1]
    for rank in (0, 1):
        ratio = zero3["state_mib_per_rank"][rank] / zero0["state_mib_per_rank"][rank]
        assert 0.45 < ratio < 0.65, ratio
    run = result["zero3_run"]
    assert run["first_attempt_rc"] != 0 and run["killed_at"] == 16
    assert run["resumed_line"].endswith("step_00000010 at step 10")
    assert run["exact_resume"] and run["redone_steps_compared"] == [15]
    assert run["metrics"]["step"] == 20 and run["metrics"]["num_examples"] == 20
    # The second attempt saved the final checkpoint (the first saved step 10 before it was killed).
    assert len(run["checkpoint_save_s"]) == 2 and min(run["checkpoint_save_s"]) > 0
    assert zero0["model_build_s"] > 0 and zero3["engine_s"] > 0
    assert (tmp_path / "w" / "export" / "model.safetensors").is_file()
    assert result["serve"]["requests"] == 3 and result["serve"]["recommend_p50_ms"] > 0


def test_zero_catalogue_never_empties_a_directory_it_did_not_make(sample_shards, tmp_path):
    """The workdir is emptied before the runs: one it did not make, or one holding the shards, is refused
    (exit 2, one line) and left as it was; so are bad settings, before anything starts."""
    script = [sys.executable, str(REPO / "benchmarks" / "zero_catalogue.py"), "--shards", str(sample_shards)]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for extra, says in [
        (["--workdir", str(tmp_path / "mine")], "not made by this script"),
        (["--workdir", str(sample_shards.parent)], "holds the shards"),
        (["--steps", "0"], "--steps: a positive multiple of 20, got 0"),
        (["--precisions", "bf16,fp64"], "--precisions"),
        (["--nproc", "1"], "--nproc must be >= 2"),
    ]:
        p = subprocess.run([*script, *extra], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
        assert p.returncode == 2 and says in p.stderr.strip().splitlines()[-1], (extra, p.stderr)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and (
        sample_shards / "manifest.json"
    ).exists()
