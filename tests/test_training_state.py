"""The training state tells the truth (issue 14).

- A resumed run's LR schedule and optimizer follow the run's own settings (DeepSpeed restores the
  checkpoint's ``LRSchedule``, ``total_steps`` included, and the optimizer's param groups), every
  change is logged, and the run's config.yaml and next checkpoints say what the optimizer does.
- Settings a checkpoint cannot continue with are refused before anything is built, naming the key.
- Every supervised position of an optimizer step weighs the same: ``grad_accum`` x 16 and 2 ranks x 16
  give the gradient of 1 x 32 on the same sequences.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from configs import ConfigError, load_config
from trainer.engine import LRSchedule, build_optimizer, build_scheduler
from trainer.resume import (
    FIXED,
    apply_schedule,
    batch_for_world_size,
    check_data,
    other_changes,
    refuse_fixed_changes,
)

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- the restored schedule


class _Engine:
    """What apply_schedule reads of a DeepSpeed engine."""

    def __init__(self, module, lr_scheduler):
        self.module, self.lr_scheduler = module, lr_scheduler


def _restored(saved_overrides, overrides, saved_total, total, steps):
    """A run of ``steps`` optimizer steps under ``saved_overrides``, then the optimizer and scheduler of a
    run under ``overrides`` restored from it as DeepSpeed does (optimizer, then scheduler state)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    old_cfg = _cfg(*saved_overrides)
    opt = build_optimizer(old_cfg, model)
    sched = build_scheduler(old_cfg, opt, saved_total)
    for _ in range(steps):
        opt.step()
        sched.step()
    state = {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}
    cfg = _cfg(*overrides)
    opt2 = build_optimizer(cfg, model)
    sched2 = build_scheduler(cfg, opt2, total)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["lr_scheduler"])
    return cfg, model, opt2, sched2


def _next_lrs(opt, sched, n):
    """The LR each of the next ``n`` optimizer steps uses."""
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_resume_with_more_steps_follows_the_new_horizon():
    base = ["optim.lr=0.003", "schedule.warmup_steps=1"]
    cfg, model, opt, sched = _restored([*base, "train.max_steps=3"], [*base, "train.max_steps=6"], 3, 6, 3)
    # The bug's mechanism: LambdaLR.load_state_dict brings the checkpoint's LRSchedule back, horizon 3.
    assert sched.lr_lambdas[0].total_steps == 3 and opt.param_groups[0]["lr"] == pytest.approx(3.0e-4)
    lines = apply_schedule(_Engine(model, sched), cfg, total_steps=6, step=3)
    assert lines[0] == "resume: train.max_steps 3 -> 6: the LR schedule now ends at step 6"
    assert lines[-1].startswith("resume: lr now 0.002067 (the checkpoint's schedule had 0.0003)")
    want = [0.003 * LRSchedule(1, 6, "cosine", 0.1)(s) for s in (3, 4, 5)]
    assert _next_lrs(opt, sched, 3) == pytest.approx(want)  # steps 4-6: 2.07e-3, 1.23e-3, 5.58e-4
    assert want[0] > 2e-3 and want[2] > 3.0e-4
    # The next checkpoint's scheduler state says what it does.
    assert sched.state_dict()["lr_lambdas"][0]["total_steps"] == 6


def test_resume_applies_every_schedule_and_optimizer_setting():
    old = ["optim.lr=0.003", "schedule.warmup_steps=1", "train.max_steps=10"]
    new = [
        "optim.lr=0.001", "schedule.warmup_steps=2", "schedule.decay=linear", "schedule.min_lr_ratio=0.0",
        "optim.weight_decay=0.1", "optim.beta2=0.95", "optim.eps=1e-6", "train.max_steps=10",
    ]  # fmt: skip
    cfg, model, opt, sched = _restored(old, new, 10, 10, 4)
    lines = apply_schedule(_Engine(model, sched), cfg, total_steps=10, step=4)
    keys = [line.split()[1] for line in lines[:-1]]
    assert keys == [
        "schedule.warmup_steps", "schedule.decay", "schedule.min_lr_ratio", "optim.lr", "optim.weight_decay",
        "optim.beta2", "optim.eps",
    ]  # fmt: skip
    assert "resume: optim.lr 0.003 -> 0.001: applied to the LR schedule from step 5" in lines
    want = [0.001 * LRSchedule(2, 10, "linear", 0.0)(s) for s in (4, 5, 6)]
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-6 and decay["initial_lr"] == 0.001
    assert _next_lrs(opt, sched, 3) == pytest.approx(want)


def test_resume_applies_sgd_settings_and_ignores_adamw_ones():
    base = ["optim.name=sgd", "optim.lr=0.5", "train.max_steps=10"]
    new = [*base, "optim.momentum=0.8", "optim.nesterov=false", "optim.beta2=0.9", "optim.eps=1e-3"]
    cfg, model, opt, sched = _restored(base, new, 10, 10, 4)
    assert isinstance(opt, torch.optim.SGD) and "betas" not in opt.param_groups[0]
    lines = apply_schedule(_Engine(model, sched), cfg, total_steps=10, step=4)
    assert (
        lines[:2]
        == [
            "resume: optim.momentum 0.9 -> 0.8: applied to the optimizer from step 5",
            "resume: optim.nesterov True -> False: applied to the optimizer from step 5",
        ]
        and len(lines) == 3
    )  # + the lr line; AdamW's beta2 and eps mean nothing to SGD
    assert all(g["momentum"] == 0.8 and g["nesterov"] is False for g in opt.param_groups)
    assert "betas" not in opt.param_groups[0] and "eps" not in opt.param_groups[0]


def test_resume_turning_weight_decay_off_is_applied():
    base = ["train.max_steps=6"]
    cfg, model, opt, sched = _restored(
        [*base, "optim.weight_decay=0.01"], [*base, "optim.weight_decay=0"], 6, 6, 2
    )
    lines = apply_schedule(_Engine(model, sched), cfg, total_steps=6, step=2)
    assert lines[0] == "resume: optim.weight_decay 0.01 -> 0.0: applied to the optimizer from step 3"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]


def test_resume_with_the_same_settings_changes_nothing():
    same = ["optim.lr=0.003", "schedule.warmup_steps=1", "train.max_steps=6"]
    cfg, model, opt, sched = _restored(same, same, 6, 6, 3)
    before = opt.param_groups[0]["lr"]
    assert apply_schedule(_Engine(model, sched), cfg, total_steps=6, step=3) == []
    assert opt.param_groups[0]["lr"] == before


# --------------------------------------------------------------------------- refused changes

REFUSED = {
    "task": (["task=rating", "eval.metric=accuracy"], []),
    "model.preset": (["model.preset=small"], []),
    "model.name_or_path": (
        ["model.preset=null", "model.name_or_path=b"],
        ["model.preset=null", "model.name_or_path=a"],
    ),
    "model.architecture": (["model.architecture=bart"], []),
    "model.n_layer": (["model.n_layer=3"], []),
    "model.n_embd": (["model.n_embd=128"], []),
    "model.n_head": (["model.n_head=4"], []),
    "model.ffn_multiplier": (["model.ffn_multiplier=2"], []),
    "model.prompt": (["model.prompt=text"], []),
    "model.tokenizer_vocab_size": (["model.tokenizer_vocab_size=1000"], []),
    "model.rating_head": (
        ["task=rating", "eval.metric=accuracy", "model.rating_head=regression"],
        ["task=rating", "eval.metric=accuracy"],
    ),
    "lora.enabled": (["lora.enabled=true"], []),
    "lora.method": (["lora.enabled=true", "lora.method=adalora"], ["lora.enabled=true"]),
    "lora.r": (["lora.enabled=true", "lora.r=4"], ["lora.enabled=true"]),
    "lora.target_modules": (["lora.enabled=true", "lora.target_modules=[c_attn]"], ["lora.enabled=true"]),
    "model.trainable_layers": (["model.trainable_layers=1"], ["model.trainable_layers=0"]),
    "optim.name": (["optim.name=sgd"], []),
    "zero.stage": (["zero.stage=2"], []),
    "train.precision": (["train.precision=bf16"], []),
    "seed": (["seed=1"], []),
    "train.init_from": (["train.init_from=runs/other-export"], ["train.init_from=runs/export"]),
}


def test_every_fixed_key_has_a_refusal_case():
    assert sorted(REFUSED) == sorted(FIXED)


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_fixed_setting_changed_on_resume_is_refused_naming_it(key):
    new, old = REFUSED[key]
    with pytest.raises(ConfigError) as e:
        refuse_fixed_changes(_cfg(*old), _cfg(*new), "run/checkpoints/step_00000003")
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and "in the checkpoint run/checkpoints/step_00000003" in msg
    assert "cannot change on resume" in msg and "\n" not in msg


def test_changes_that_are_no_change_are_not_refused():
    saved = _cfg("model.n_layer=null", "lora.r=8")
    refuse_fixed_changes(saved, _cfg("model.n_layer=2", "lora.r=4"), "ckpt")  # tiny's depth; LoRA is off
    later = _cfg(
        "optim.lr=0.01", "train.max_steps=80", "train.eval_interval=10", "train.checkpoint_interval=10",
        "adversarial.method=fgm", "model.dropout=0.0", "train.output_dir=elsewhere",
    )  # fmt: skip
    refuse_fixed_changes(saved, later, "ckpt")
    changed = other_changes(saved, later)
    assert changed == [
        "model.dropout 0.1 -> 0.0", "adversarial.method 'none' -> 'fgm'", "train.eval_interval 20 -> 10",
        "train.checkpoint_interval 20 -> 10",
    ]  # fmt: skip


def test_another_world_size_keeps_the_global_batch():
    """2 x 32 -> 1 rank: 32 x 2 accumulation; 1 x 32 -> 2 ranks: 16 each; back to the first size: the
    config's own values again; a config asking for other values rules; 64 over 3 ranks is refused."""
    tiny = _cfg()  # micro-batch 32, no accumulation
    *values, line = batch_for_world_size(tiny, {"world_size": 2}, tiny, 1)
    assert values == [32, 2, [32, 1]] and line.startswith("resume: world size 2 -> 1: global batch 64 kept")
    assert batch_for_world_size(tiny, {"world_size": 1}, tiny, 2)[:3] == (16, 1, [32, 1])
    assert batch_for_world_size(tiny, {"world_size": 2}, tiny, 4)[:2] == (16, 1)
    assert batch_for_world_size(tiny, {"world_size": 2}, tiny, 2) == (32, 1, [32, 1], None)
    halved = _cfg("train.micro_batch_size=16")  # what a 1 -> 2 resume saved, asked for 32
    state = {"world_size": 2, "requested_batch": [32, 1]}
    assert batch_for_world_size(halved, state, tiny, 1)[:2] == (32, 1)
    assert batch_for_world_size(halved, state, tiny, 2) == (16, 1, [32, 1], None)
    asked = _cfg("train.micro_batch_size=8")
    *values, line = batch_for_world_size(tiny, {"world_size": 2}, asked, 1)
    assert values == [8, 1, [8, 1]] and line.startswith(
        "resume: global batch 64 -> 8 (as configured: 1 ranks x"
    )
    with pytest.raises(
        ConfigError, match=r"^train.micro_batch_size: the checkpoint's global batch of 64 records"
    ):
        batch_for_world_size(tiny, {"world_size": 2}, tiny, 3)
    # the way out the error names: the configured values on 3 ranks, a global batch of 96
    *values, line = batch_for_world_size(tiny, {"world_size": 2}, _cfg("train.keep_global_batch=false"), 3)
    assert values == [32, 1, [32, 1]]
    assert line.startswith("resume: global batch 64 -> 96 (train.keep_global_batch=false")


def test_other_build_of_the_data_is_refused(tmp_path):
    ckpt = tmp_path / "step_00000003"
    (ckpt / "reader").mkdir(parents=True)
    (ckpt / "reader" / "rank_00000.json").write_text(json.dumps({"fingerprint": "a" * 64}))
    cfg = _cfg("data.shards=/data/other")
    check_data(ckpt, {"fingerprint": "a" * 64}, cfg, _cfg())  # the same build, moved: fine
    with pytest.raises(ConfigError, match=r"^data\.shards: /data/other is another build of the data"):
        check_data(ckpt, {"fingerprint": "b" * 64}, cfg, _cfg())


# --------------------------------------------------------------------------- equal weight per position

_MODELS: dict = {}


def _model(shards, cfg):
    from modeling.factory import build_model_and_tokenizer

    key = (cfg.task, cfg.model.rating_head)
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = build_model_and_tokenizer(cfg, shards)
    return _MODELS[key]


LOSS_KINDS = {
    "next_item": [],
    "fgm": ["adversarial.method=fgm", "adversarial.epsilon=0.5"],
    "pgd": ["adversarial.method=pgd", "adversarial.epsilon=0.5", "adversarial.steps=2"],
    # A zero random start: FreeLB's noise would otherwise differ between a batch of 32 and two of 16.
    "freelb": ["adversarial.method=freelb", "adversarial.steps=2", "adversarial.init_magnitude=0.0"],
    "rating_classes": ["task=rating", "eval.metric=accuracy"],
    "rating_regression": ["task=rating", "eval.metric=accuracy", "model.rating_head=regression"],
}


@pytest.mark.parametrize("kind", sorted(LOSS_KINDS))
def test_accumulation_and_ranks_weigh_every_position_equally(sample_shards, kind):
    """2 x 16 accumulated (DeepSpeed divides by grad_accum) and 2 ranks x 16 (averaged as DDP does) give
    the gradient of 1 x 32 on the same 32 sequences, for every loss; a mean per micro-batch does not."""
    from data_shards.manifest import load_manifest, read_items
    from modeling.data import build_loader
    from modeling.loss import LossComputer, step_denominator, supervised_positions

    cfg = _cfg(
        f"data.shards={sample_shards}", "model.dropout=0.0", "data.num_workers=0",
        "adversarial.warmup_steps=0", *LOSS_KINDS[kind],
    )  # fmt: skip
    manifest = load_manifest(sample_shards)
    cfg.data.max_history = manifest["max_history"]
    model, tok = _model(sample_shards, cfg)
    model.train()
    items = read_items(sample_shards, manifest)
    whole = next(iter(build_loader(cfg, "train", tok, items, batch_size=32)))
    it = iter(build_loader(cfg, "train", tok, items, batch_size=16))
    halves = [next(it), next(it)]  # the same 32 sequences
    counts = [supervised_positions(b) for b in halves]
    assert sum(counts) == supervised_positions(whole) and counts[0] != counts[1]
    n = sum(counts)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = LossComputer(cfg)

    def grad(batch, denominator):
        loss, logs = loss_fn(model, batch, 0, denominator)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        flat = [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)]
        return torch.cat(flat), logs

    ref, ref_logs = grad(whole, step_denominator(n, 1, 1))
    accum = [grad(b, step_denominator(n, 2, 1)) for b in halves]
    ranks = [grad(b, step_denominator(n, 1, 2)) for b in halves]
    assert _rel(sum(g for g, _ in accum) / 2, ref) <= 1e-5  # DeepSpeed: loss / grad_accum
    assert _rel(sum(g for g, _ in ranks) / 2, ref) <= 1e-5  # DDP / ZeRO: mean over ranks
    # The logged losses (the monitor averages micro-batches) are the step's per-position means.
    for name in ("loss", "clean_loss", "adv_loss"):
        assert sum(logs[name] for _, logs in accum) / 2 == pytest.approx(ref_logs[name], rel=1e-5)
    assert ref_logs["loss"] == pytest.approx(float(loss_fn(model, whole, 0)[0].detach()), rel=1e-5)
    if kind == "next_item":
        # Before: each micro-batch's loss was the mean over its own positions (672 vs 763 here).
        old = sum(grad(b, None)[0] for b in halves) / 2
        assert _rel(old, grad(whole, None)[0]) > 0.03


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """40 users with 4-20 interactions each: 40 training records (one window each) of unequal lengths,
    so that 2 ranks x 16, 1 x (2 x 16) and 1 x 32 read the same 32 records in the first steps
    (data_shards.reader: rank r reads the contiguous range r of the epoch's order)."""
    import pandas as pd

    from configs import ShardsConfig
    from data_shards.build import build_shards

    d = tmp_path_factory.mktemp("small")
    rng = random.Random(0)
    rows = []
    for u in range(40):
        for t, i in enumerate(rng.sample(range(30), rng.randint(4, 20))):
            rows.append((f"u{u}", f"i{i}", 1000 * u + t, float(rng.randint(1, 5))))
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    log.to_csv(d / "log.csv", index=False)
    build_shards(d / "log.csv", d / "shards", ShardsConfig(min_user_interactions=3, rating_col="rating"))
    return d / "shards"


QUICK = ["logging.tensorboard=false", "train.log_interval=1", "zero.stage=0"]


def _train_records(run_dir: Path) -> dict[int, dict]:
    from tests.conftest import train_log

    return {r["step"]: r for r in train_log(run_dir) if r["kind"] == "train"}


def _ok(proc):
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.distributed
def test_accumulation_and_two_ranks_match_one_batch_end_to_end(small_shards, tmp_path):
    from tests.conftest import recgpt_train

    common = [*QUICK, "model.dropout=0.0", "train.max_steps=2", "train.eval_interval=2",
              "train.checkpoint_interval=2"]  # fmt: skip
    runs = {
        "1x32": (["train.micro_batch_size=32"], 1),
        "1x(2x16)": (["train.micro_batch_size=16", "train.grad_accum=2"], 1),
        "2x16": (["train.micro_batch_size=16"], 2),
    }
    logs = {}
    for name, (extra, nproc) in runs.items():
        out = tmp_path / name.replace("(", "").replace(")", "")
        _ok(recgpt_train(small_shards, out, [*common, *extra], nproc=nproc))
        logs[name] = _train_records(out)
    ref = logs["1x32"]
    for name in ("1x(2x16)", "2x16"):
        for step in (1, 2):
            for key in ("loss", "grad_norm"):
                got, want = logs[name][step][key], ref[step][key]
                assert got == pytest.approx(want, rel=1e-5), f"{name} step {step} {key}: {got} vs {want}"


def test_fp32_zero0_logs_the_clipping_norm_which_is_the_measured_norm(small_shards, tmp_path):
    """fp32 ZeRO-0 with clipping logs the norm DeepSpeed's clipping computes (trainer.engine.keep_clipping_norm)
    instead of a second pass over the gradients; at step 1 (same weights either way) it is the norm that
    the second pass (param_grad_norm, used without clipping) measures."""
    from tests.conftest import recgpt_train

    common = [
        *QUICK,
        "model.dropout=0.0",
        "train.max_steps=1",
        "train.eval_interval=0",
        "train.checkpoint_interval=1",
    ]
    norms = {}
    for clip in ("1.0", "0"):
        out = tmp_path / f"clip{clip}"
        _ok(recgpt_train(small_shards, out, [*common, f"optim.grad_clip={clip}"], nproc=1))
        norms[clip] = _train_records(out)[1]["grad_norm"]
    assert norms["1.0"] > 0 and norms["1.0"] == pytest.approx(norms["0"], rel=1e-5)


@pytest.mark.slow
def test_resume_with_larger_max_steps_follows_the_new_schedule_end_to_end(small_shards, tmp_path):
    from tests.conftest import recgpt_train

    common = [*QUICK, "schedule.warmup_steps=1", "train.eval_interval=3", "train.checkpoint_interval=3"]
    run, refused = tmp_path / "run", tmp_path / "refused"
    _ok(recgpt_train(small_shards, run, [*common, "train.max_steps=3"], nproc=1))
    shutil.copytree(run, refused)
    p = _ok(recgpt_train(small_shards, run, [*common, "train.max_steps=6"], nproc=1))
    assert "at step 3" in p.stdout
    assert "resume: train.max_steps 3 -> 6: the LR schedule now ends at step 6" in p.stdout
    steps = _train_records(run)
    # The logged lr is the one each step's update used (schedule index step - 1); before the fix it stayed
    # at the floor 3.0e-4 for steps 4-6 because the checkpoint's schedule (3 steps) came back.
    want = {s: 0.003 * LRSchedule(1, 6, "cosine", 0.1)(s - 1) for s in (4, 5, 6)}
    assert {s: steps[s]["lr"] for s in want} == pytest.approx(want)
    assert steps[4]["lr"] == pytest.approx(2.067e-3, rel=1e-3)

    # The run's config and the next checkpoint say what the optimizer does; the counters continued.
    ckpt = run / "checkpoints" / "step_00000006"
    assert load_config(run / "config.yaml", saved=True).train.max_steps == 6
    assert load_config(ckpt / "config.yaml", saved=True).train.max_steps == 6
    states = torch.load(ckpt / "ds" / "step_00000006" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["lr_scheduler"]["lr_lambdas"][0]["total_steps"] == 6
    straight = tmp_path / "straight"
    _ok(recgpt_train(small_shards, straight, [*common, "train.max_steps=6"], nproc=1))
    resumed, whole = (json.loads((d / "metrics.json").read_text()) for d in (run, straight))
    assert resumed["consumed_samples"] == whole["consumed_samples"] == 6 * 32
    assert resumed["consumed_tokens"] == whole["consumed_tokens"]

    # Settings the checkpoint cannot continue with: one line naming the key, before anything is built.
    p = recgpt_train(small_shards, refused, [*common, "train.max_steps=6", "model.n_layer=3"], nproc=1)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("recgpt train: error: model.n_layer: 3 here, 2 in the checkpoint")


@pytest.mark.slow
def test_a_non_finite_micro_batch_adds_nothing_and_is_counted(small_shards, tmp_path):
    """A non-finite loss: that micro-batch's backward runs with its gradients zeroed (no replacement, no
    extra collective); the ranks learn of it with the next step's collective. The step's N stays the
    count made before the step; consumed samples/tokens count every batch read."""
    from data_shards.manifest import load_manifest, read_items
    from modeling.data import build_loader
    from modeling.factory import load_model_for_eval
    from tests.conftest import recgpt_train

    out = tmp_path / "run"
    overrides = [*QUICK, "train.micro_batch_size=16", "train.grad_accum=2", "train.max_steps=3",
                 "train.eval_interval=3", "train.checkpoint_interval=3"]  # fmt: skip
    p = _ok(recgpt_train(small_shards, out, overrides, nproc=1, fault="nan:2:0"))
    assert (
        "step 2: non-finite loss in 1 micro-batch(es) over the ranks, which added no gradient (1 such"
        in p.stdout
    )
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = load_config(out / "config.yaml", saved=True, overrides=["data.num_workers=0"])
    _, tok = load_model_for_eval(cfg, out / "checkpoints" / "step_00000003" / "tokenizer", small_shards)
    loader = build_loader(cfg, "train", tok, read_items(small_shards, load_manifest(small_shards)))
    tokens = []
    while len(tokens) < 6:  # 2 batches an epoch: steps 1-3 read batches 0-5
        tokens += [int(b["attention_mask"].sum()) for b in loader]
    assert metrics["consumed_samples"] == 3 * 2 * 16
    assert metrics["consumed_tokens"] == sum(tokens[:6])
    records = _train_records(out)
    assert all(r["loss"] == r["loss"] for r in records.values())  # finite, logged
    assert [r.get("non_finite_micro_batches", 0) for _, r in sorted(records.items())] == [0, 1, 0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_steps_of_only_non_finite_losses_leave_the_weights_exactly(small_shards, tmp_path, stage):
    """Every loss NaN: every backward runs with its gradients zeroed before DeepSpeed accumulates them, so
    AdamW (no weight decay, zero moments) moves nothing: step 2's weights equal step 1's bit for bit, under
    ZeRO-0, ZeRO-2's bucketed reduction and ZeRO-3's partitioned one alike. The run ends (2 bad steps < max_bad_steps)."""
    from tests.conftest import recgpt_train
    from trainer.checkpoint import consolidated_state_dict

    out = tmp_path / "run"
    overrides = [*QUICK, f"zero.stage={stage}", "optim.weight_decay=0", "train.max_bad_steps=5",
                 "train.max_steps=2", "train.eval_interval=0", "train.checkpoint_interval=1",
                 "train.keep_last=2"]  # fmt: skip
    p = _ok(recgpt_train(small_shards, out, overrides, nproc=1, fault="nan:*:*"))
    assert "(2 such step(s) in a row)" in p.stdout  # the last step's count travels in the end's collective
    one = consolidated_state_dict(out / "checkpoints" / "step_00000001")
    two = consolidated_state_dict(out / "checkpoints" / "step_00000002")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


# --------------------------------------------------------------------------- collectives per step

COUNT_COLLECTIVES = """
import json, sys

import torch.distributed as dist

import trainer.distributed as D
import trainer.loop as L
from configs import load_config
from trainer.monitor import Monitor

count = 0
HELPERS = ("all_gather_tensor", "start_all_gather_tensor", "all_gather_object", "barrier")
RAW = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "barrier",
       "reduce", "gather", "scatter", "reduce_scatter", "all_to_all")


def counted(fn, only_from_trainer=False):
    def wrapped(*args, **kwargs):
        global count
        # The trainer's helpers skip the collective in one process: count the call, not the traffic.
        # Direct torch.distributed calls count when trainer code makes them (DeepSpeed's are its own).
        # A helper calling another (all_gather_tensor starts and waits) counts once.
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller != "trainer.distributed" and (not only_from_trainer or caller.startswith("trainer.")):
            count += 1
        return fn(*args, **kwargs)
    return wrapped


for name in HELPERS:
    fn = counted(getattr(D, name))
    setattr(D, name, fn)
    if hasattr(L, name):
        setattr(L, name, fn)
for name in RAW:
    if hasattr(dist, name):
        setattr(dist, name, counted(getattr(dist, name), only_from_trainer=True))

events = []
add_step, log_train = Monitor.add_step, Monitor.log_train


def on_step(self, stats):
    add_step(self, stats)
    events.append(["step", count])


def on_log(self, step, **kwargs):
    before = count
    out = log_train(self, step, **kwargs)
    events.append(["log", count - before])
    return out


Monitor.add_step, Monitor.log_train = on_step, on_log
L.train(load_config(sys.argv[1], sys.argv[2:]))
print("EVENTS " + json.dumps(events))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "grad_accum, fault",
    [(1, None), (2, "nan:2:0")],
    ids=["one-micro-batch", "accumulation-and-a-non-finite-one"],
)
def test_one_collective_per_step_and_logs_ride_on_it(small_shards, tmp_path, grad_accum, fault):
    """The hot path's collectives (each a host sync on GPU): one all-gather per step, whatever the
    accumulation and a non-finite micro-batch (N, the samples and tokens, the previous step's non-finite
    count), started before the forward and waited for after it; a logged step adds none (its window and
    memory maxima ride on the next step's) except the last step's log, which is written at once with its own. Counted in one process at the trainer's collective
    helpers, which skip the traffic there, and at torch.distributed for calls made by trainer code."""
    import subprocess
    import sys

    from tests.conftest import TINY, subprocess_env

    overrides = [f"data.shards={small_shards}", f"train.output_dir={tmp_path / 'run'}", *QUICK,
                 "train.micro_batch_size=8", f"train.grad_accum={grad_accum}", "train.max_steps=6",
                 "train.log_interval=3", "train.eval_interval=0", "train.checkpoint_interval=0"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", COUNT_COLLECTIVES, str(TINY), *overrides],
        env=subprocess_env(fault), capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("EVENTS "))[7:])
    hot, logs, end = {}, {}, 0  # end: the count when the previous step (and its log) was done
    for kind, value in events:
        if kind == "step":
            hot[len(hot) + 1], end = value - end, value
        else:
            logs[len(hot)] = value
            end += value
    assert hot == {s: 1 for s in range(1, 7)}
    assert logs == {3: 0, 6: 1}
