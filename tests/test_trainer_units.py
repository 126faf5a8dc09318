"""Trainer pieces without a training run: schedule, AdamW groups, faults, checkpoint bookkeeping, RNG."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from configs import ConfigError
from trainer.checkpoint import (
    COMPLETE,
    CheckpointError,
    CheckpointManager,
    find_resume_checkpoint,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from trainer.engine import LRSchedule, gradients_zeroed, param_groups
from trainer.faults import Faults


def test_schedule_warmup_then_cosine_and_linear():
    cos = LRSchedule(warmup_steps=4, total_steps=14, decay="cosine", min_ratio=0.1)
    assert [round(cos(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]  # the first step already learns
    assert cos(4) == pytest.approx(1.0)
    assert cos(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(14) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    lin = LRSchedule(warmup_steps=0, total_steps=10, decay="linear", min_ratio=0.0)
    assert [lin(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert LRSchedule(2, 10, "constant", 0.1)(7) == 1.0


def test_no_weight_decay_on_biases_norms_or_frozen():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[0].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3  # linear bias, norm weight and bias


@pytest.mark.parametrize("stage,offload", [(0, False), (2, False), (3, True)])
def test_sgd_optimizer_and_its_deepspeed_keys(stage, offload):
    """optim.name=sgd: torch's SGD over the same groups (L2 decay on matrices only), Nesterov momentum;
    the DeepSpeed JSON lets ZeRO step it (and offload it to the CPU); clipping is the same key."""
    from configs import ConfigError, load_config
    from trainer.engine import build_optimizer, deepspeed_config

    over = ["optim.name=sgd", "optim.lr=0.5", f"zero.stage={stage}", f"zero.offload_optimizer={offload}"]
    cfg = load_config(None, over)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 2
    assert [(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) for g in opt.param_groups] == [
        (0.5, 0.9, True, 0.01),
        (0.5, 0.9, True, 0.0),
    ]
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["gradient_clipping"] == 1.0 and "optimizer" not in ds
    assert ds.get("zero_allow_untested_optimizer", False) == (stage >= 1)
    assert ds.get("zero_force_ds_cpu_optimizer", True) == (not offload)
    assert "zero_allow_untested_optimizer" not in deepspeed_config(load_config(None, over[2:]), 2)
    with pytest.raises(ConfigError, match=r"^optim.nesterov: Nesterov momentum needs optim.momentum > 0"):
        load_config(None, ["optim.name=sgd", "optim.momentum=0"])
    with pytest.raises(ConfigError, match=r"^optim.name: got 'adam', allowed: adamw, sgd"):
        load_config(None, ["optim.name=adam"])


def test_a_non_finite_backward_under_gradients_zeroed_adds_nothing():
    """The loop's answer to a non-finite loss on one rank: its backward runs (the ranks' collectives stay
    matched) but every parameter gradient is zeroed before accumulation; frozen ones get none."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    model[1].bias.requires_grad_(False)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with gradients_zeroed(model):
        (model(x).sum() * float("nan")).backward()  # NaN through the whole graph
    assert {n: p.grad for n, p in model.named_parameters() if p.requires_grad}.keys() == before.keys()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, before[n]), n  # accumulated exactly nothing
    assert model[1].bias.grad is None
    model(x).sum().backward()  # the hooks are gone: the next backward accumulates again
    assert torch.allclose(model[0].weight.grad, 2 * before["0.weight"])


def test_faults_parse_and_fire_once(monkeypatch):
    monkeypatch.setenv("RECGPT_FAULT", "nan:3:1,kill_before_publish:20:0")
    f1 = Faults.from_env(rank=1)
    assert not f1.nan_loss(2) and f1.nan_loss(3) and not f1.nan_loss(3)  # once: the next micro-batch is clean
    assert not Faults.from_env(rank=0).nan_loss(3)
    monkeypatch.setenv("RECGPT_FAULT", "nan:*:*")
    always = Faults.from_env(rank=0)
    assert all(always.nan_loss(s) for s in (1, 1, 2))
    for bad in ("explode:1:1", "kill:1", "kill:x:0", "kill:01:0", "kill:1:-1"):  # never silently inert
        monkeypatch.setenv("RECGPT_FAULT", bad)
        with pytest.raises(ConfigError, match="RECGPT_FAULT: bad entry"):  # one line, exit 2
            Faults.from_env(rank=0)
    monkeypatch.delenv("RECGPT_FAULT")
    assert Faults.from_env(rank=0).entries == []


def _fake_checkpoint(root, step, complete=True):
    d = root / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "ds").mkdir()
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 2}))
    if complete:
        (d / COMPLETE).write_text(f"{d.name}\n")  # the old one-line marker: complete, unverifiable
    return d


def test_resume_follows_latest_and_ignores_partial(tmp_path):
    assert find_resume_checkpoint("auto", tmp_path) is None  # a fresh run directory
    good = _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 30, complete=False)  # higher step, but never completed
    (tmp_path / "checkpoints" / ".tmp-step_00000040").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010")
    assert find_resume_checkpoint("auto", tmp_path) == good
    assert find_resume_checkpoint("never", tmp_path) is None
    assert resolve_checkpoint(tmp_path) == good
    assert find_resume_checkpoint(str(good), tmp_path / "elsewhere") == good
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(tmp_path / "checkpoints" / "step_00000030")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path, best=True)
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(tmp_path / "missing")


def test_prune_keeps_last_best_and_latest_only(tmp_path):
    for s in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, s)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000050").mkdir()
    (root / "latest").write_text("step_00000040")
    (root / "best").write_text("step_00000010")
    CheckpointManager(tmp_path, rank=0, world_size=2, keep_last=2, faults=Faults(0)).prune()
    assert sorted(p.name for p in root.iterdir()) == [
        "best",
        "latest",
        "step_00000010",
        "step_00000030",
        "step_00000040",
    ]


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_zero3_external_params_for_parameter_dict_readers(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from trainer.engine import register_zero3_external_params

    class TokenRows(torch.nn.Module):  # reads parameters of children it never calls (like PEFT)
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Embedding(5, 3)
            self.delta = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.zeros(2, 3))})

    model = torch.nn.Sequential(TokenRows(), torch.nn.Linear(3, 3))
    assert register_zero3_external_params(model) == ["0"]
    assert {id(p) for _, p in model[0].ds_external_parameters()} == {id(p) for p in model[0].parameters()}


def test_stale_op_build_lock_is_removed_fresh_one_kept(tmp_path, monkeypatch):
    import os
    import time

    from trainer.distributed import STALE_BUILD_LOCK_S, _clear_stale_op_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    _clear_stale_op_build_lock()
    assert lock.exists()  # a build may be running right now
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    _clear_stale_op_build_lock()
    assert not lock.exists()  # left by a killed process: every later run would wait on it forever


def test_best_metric_improvement_and_patience():
    from trainer.loop import BestMetric

    best = BestMetric()
    assert not best.improves(None) and best.improves(0.0)
    assert best.update(0.2, step=10) and (best.value, best.step, best.stale) == (0.2, 10, 0)
    assert not best.update(0.2, step=20)  # equal is no improvement
    assert not best.update(0.1, step=30) and best.stale == 2 and best.step == 10
    assert best.update(0.3, step=40) and (best.value, best.step, best.stale) == (0.3, 40, 0)


def test_train_state_best_checkpoint_and_round_trip():
    from trainer.loop import BestMetric, TrainState

    st = TrainState(step=30, epoch=1, consumed_samples=960, consumed_tokens=12345, metrics={"ndcg@10": 0.1})
    assert st.best_checkpoint is None
    for step, value in ((10, 0.05), (20, 0.2), (30, 0.1)):  # evaluated checkpoints
        st.best_eval.update(value, step)
        is_best = st.best_saved.update(value, step)
        assert is_best == (step in (10, 20))
    assert st.best_checkpoint == "step_00000020" and st.best_eval.stale == 1
    saved = json.loads(json.dumps({**st.to_dict(), "world_size": 2, "checkpoint": "step_00000030"}))
    assert TrainState.from_dict(saved) == st
    assert saved["best_saved"] == {"value": 0.2, "step": 20, "stale": 1}
    assert TrainState.from_dict({}) == TrainState() and TrainState().best_eval == BestMetric()


def test_train_state_loads_the_old_flat_best_keys():
    from trainer.loop import BestMetric, TrainState

    old = {
        "step": 30, "epoch": 1, "consumed_samples": 960, "consumed_tokens": 12345, "metrics": {"ndcg@10": 0.1},
        "best_metric": 0.25, "evals_without_improvement": 2, "best_checkpoint_metric": 0.2,
        "best_checkpoint": "step_00000020", "world_size": 2, "checkpoint": "step_00000030",
    }  # fmt: skip
    st = TrainState.from_dict(old)
    assert (st.step, st.epoch, st.consumed_samples, st.consumed_tokens) == (30, 1, 960, 12345)
    assert st.metrics == {"ndcg@10": 0.1}
    assert st.best_eval == BestMetric(0.25, None, 2)
    assert st.best_saved == BestMetric(0.2, 20, 0) and st.best_checkpoint == "step_00000020"
    fresh = TrainState.from_dict(
        {**old, "best_metric": None, "best_checkpoint_metric": None, "best_checkpoint": None}
    )
    assert fresh.best_saved == BestMetric() and fresh.best_eval == BestMetric(None, None, 2)


def test_intervals_and_adversarial_start_message():
    from configs import AdversarialConfig
    from trainer.loop import adversarial_start_message, on_interval

    assert [s for s in range(1, 8) if on_interval(s, 3, last=s == 7)] == [3, 6, 7]
    assert not on_interval(4, 0) and on_interval(4, 0, last=True)
    msg = adversarial_start_message(AdversarialConfig(method="pgd", warmup_steps=10, adv_weight=0.5), 10)
    assert msg.startswith("step 11: adversarial training (pgd") and "after 10 clean steps" in msg
    assert "clean_loss + 0.5 x adv_loss" in msg and "jumps" in msg
    assert "FreeLB ascent path" in adversarial_start_message(AdversarialConfig(method="freelb"), 50)


def test_a_build_lock_nobody_works_on_is_cleared_a_live_one_kept(tmp_path, monkeypatch):
    """A lock left by a process killed mid-build (Ctrl-C during the first run) would make every later
    run wait forever; one whose build is alive (ninja runs in the directory) must stay."""
    import os
    import subprocess
    import time

    from trainer.distributed import _clear_stale_op_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir()
    lock = build / "lock"

    def lock_aged(seconds: float) -> None:
        lock.touch()
        os.utime(lock, (time.time() - seconds,) * 2)

    lock_aged(10)  # young: a build may be starting
    _clear_stale_op_build_lock()
    assert lock.exists()
    lock_aged(120)
    live = subprocess.Popen(["sleep", "30"], cwd=build)  # stands for ninja working in the directory
    try:
        _clear_stale_op_build_lock()
        assert lock.exists()
    finally:
        live.kill()
        live.wait()
    _clear_stale_op_build_lock()  # old and nobody in the directory: an orphan
    assert not lock.exists()
