"""What a resumed run may change, and making the restored optimizer follow the settings of this run.

A checkpoint restores the weights, the optimizer and the LR scheduler as they were. Two kinds of
settings differ from that on resume:

- **fixed** (:data:`FIXED`, :func:`refuse_fixed_changes`, :func:`check_data`): the model's shape and
  architecture, the task and prompt, the item vocabulary and data build (the shards' fingerprint), the
  LoRA structure and freeze depth, the optimizer, ZeRO stage, precision, and the data order (seed). The
  checkpoint cannot be loaded into, or exactly continued with, another value: :class:`ConfigError`
  naming the key, raised before the model is built.
- **world size and micro-batch size** (:func:`batch_for_world_size`): a run may continue on another
  number of processes (elastic training). The global batch per optimizer step is kept — micro-batch
  size x accumulation steps are re-chosen for the new rank count — the reader re-plans the rest of
  the epoch (``data_shards.reader``), and the model and optimizer state are loaded through
  DeepSpeed's universal checkpoint (``trainer.checkpoint.CheckpointManager.load``).
- **schedule and optimizer** (:func:`apply_schedule`): ``train.max_steps`` / ``train.epochs`` (the
  schedule's horizon), ``schedule.*``, ``optim.lr``, ``optim.weight_decay`` and the settings of the
  run's optimizer (AdamW: ``optim.beta1/beta2``, ``optim.eps``; SGD: ``optim.momentum``,
  ``optim.nesterov``; the other optimizer's are ignored, as in training). DeepSpeed restores them from
  the checkpoint — torch's ``LambdaLR.state_dict`` saves the ``__dict__`` of a callable-object lambda,
  so :class:`~trainer.engine.LRSchedule` comes back with the old ``total_steps``, and the optimizer's
  param groups with the old lr/betas/eps/momentum/weight decay —
  and the run's config.yaml would then describe an optimizer that is not the one running. They are set
  from this run's config onto the restored scheduler and optimizer, one log line per change; the
  schedule follows the new horizon from the resumed step (the LR of step ``s + 1`` is
  ``optim.lr x LRSchedule(new settings)(s)``).

Every other setting simply takes effect from the resumed step on; :func:`other_changes` lists them for
one log line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs import ConfigError, RecGPTConfig, to_dict
from trainer.engine import LRSchedule, param_groups

Getter = Callable[[RecGPTConfig], Any]


def _lora(key: str) -> Getter:
    # The adapter structure matters only when adapters exist.
    return lambda c: getattr(c.lora, key) if c.lora.enabled else None


FIXED: dict[str, tuple[Getter, str]] = {
    "task": (lambda c: c.task, "the output heads and the loss differ"),
    "model.preset": (lambda c: c.model.preset, "another model"),
    "model.name_or_path": (lambda c: c.model.name_or_path, "another model"),
    "model.architecture": (lambda c: c.model.architecture, "another block layout"),
    "model.n_layer": (lambda c: c.model.shape()["n_layer"] if c.model.preset else None, "another shape"),
    "model.n_embd": (lambda c: c.model.shape()["n_embd"] if c.model.preset else None, "another shape"),
    "model.n_head": (lambda c: c.model.shape()["n_head"] if c.model.preset else None, "another shape"),
    # The resolved FFN width: null and the architecture's default multiplier are the same model.
    "model.ffn_multiplier": (lambda c: c.model.ffn_size() if c.model.preset else None, "another shape"),
    "model.prompt": (lambda c: c.model.prompt, "the model was trained on the other prompt layout"),
    "model.tokenizer_vocab_size": (
        lambda c: c.model.tokenizer_vocab_size if c.model.preset else None,
        "another tokenizer and embedding matrix",
    ),
    "model.rating_head": (lambda c: c.model.rating_head if c.task == "rating" else None, "another head"),
    "lora.enabled": (lambda c: c.lora.enabled, "other trainable parameters"),
    "model.trainable_layers": (lambda c: c.model.trainable_layers, "other trainable parameters"),
    "lora.method": (_lora("method"), "other adapters"),
    "lora.r": (_lora("r"), "other adapter shapes"),
    "lora.target_modules": (_lora("target_modules"), "other adapted modules"),
    "optim.name": (lambda c: c.optim.name, "another optimizer, another optimizer state"),
    "zero.stage": (lambda c: c.zero.stage, "the optimizer state is partitioned differently"),
    "train.precision": (lambda c: c.train.precision, "the optimizer state is laid out differently"),
    "seed": (lambda c: c.seed, "the data order of the epoch depends on it"),
    "train.init_from": (lambda c: c.train.init_from, "the run started from other weights"),
}
"""Settings a resumed run must keep: key -> (its value in a config, why it cannot change)."""

NOT_SETTINGS = ("train.resume", "train.output_dir", "data.shards")
"""Keys whose difference is no change of the training (where the files are; the data build is compared
by fingerprint)."""

SCHEDULE_KEYS = (
    "train.max_steps", "train.epochs", "schedule.warmup_steps", "schedule.decay", "schedule.min_lr_ratio",
    "optim.lr", "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps", "optim.momentum",
    "optim.nesterov",
)  # fmt: skip
"""Settings :func:`apply_schedule` sets on the restored scheduler and optimizer (and logs)."""


def refuse_fixed_changes(saved: RecGPTConfig, cfg: RecGPTConfig, ckpt: str | Path) -> None:
    """:class:`ConfigError` naming the first :data:`FIXED` key whose value differs from the checkpoint's."""
    for key, (get, why) in FIXED.items():
        old, new = get(saved), get(cfg)
        if old != new:
            raise ConfigError(
                f"{key}: {new!r} here, {old!r} in the checkpoint {ckpt}; it cannot change on resume "
                f"({why}). Set it back, or start a new run (train.resume=never or another train.output_dir)"
            )


def batch_for_world_size(
    saved: RecGPTConfig, saved_state: dict[str, Any], cfg: RecGPTConfig, world_size: int
) -> tuple[int, int, list[int], str | None]:
    """``(micro_batch_size, grad_accum, requested, message)`` for continuing a checkpoint on
    ``world_size`` ranks.

    The checkpoint ran ``W0`` ranks x ``saved.train.micro_batch_size`` x ``saved.train.grad_accum``
    records per optimizer step (its global batch G). ``requested`` is what the user's config asked for
    (``saved_state["requested_batch"]``, else the saved values). When this run's config still asks for
    the same and ``train.keep_global_batch`` is on, G is kept: per rank G / world_size records per step, as the largest micro-batch size ``d``
    not above the requested one that divides them and lets ``world_size x d`` divide the old
    ``W0 x micro-batch`` (so the rest of the epoch fills whole batches), the rest accumulated. When the
    config asks for other values, or keep_global_batch is off, the configured values rule (a change of
    the global batch, logged as one).
    ``message`` is the log line of a change (None: nothing changed). Raises :class:`ConfigError` when G
    cannot be split over ``world_size`` ranks.
    """
    w0 = int(saved_state["world_size"])
    mb0, acc0 = saved.train.micro_batch_size, saved.train.grad_accum
    g = w0 * mb0 * acc0
    requested = [int(x) for x in saved_state.get("requested_batch") or [mb0, acc0]]
    mb, acc = cfg.train.micro_batch_size, cfg.train.grad_accum
    if [mb, acc] != requested or not cfg.train.keep_global_batch:
        why = "train.keep_global_batch=false" if cfg.train.keep_global_batch is False else "as configured"
        new = world_size * mb * acc
        message = None if new == g else (
            f"resume: global batch {g} -> {new} ({why}: {world_size} ranks x micro_batch_size {mb} x "
            f"grad_accum {acc}; was {w0} x {mb0} x {acc0})"
        )  # fmt: skip
        return mb, acc, [mb, acc], message
    if world_size == w0:
        return mb0, acc0, requested, None
    per_rank = g // world_size
    fits = [
        d for d in range(min(mb, per_rank), 0, -1)
        if g % world_size == 0 and per_rank % d == 0 and (w0 * mb0) % (world_size * d) == 0
    ]  # fmt: skip
    if not fits:
        raise ConfigError(
            f"train.micro_batch_size: the checkpoint's global batch of {g} records ({w0} ranks x {mb0} x "
            f"{acc0} accumulation steps) cannot be split evenly over {world_size} ranks; resume on a "
            f"world size that divides {w0 * mb0}, or set train.keep_global_batch=false to train on with "
            f"{world_size} x train.micro_batch_size x train.grad_accum ({world_size * mb * acc} now)"
        )
    d = fits[0]
    message = (
        f"resume: world size {w0} -> {world_size}: global batch {g} kept as {world_size} ranks x "
        f"micro_batch_size {d} x grad_accum {per_rank // d} (was {w0} x {mb0} x {acc0})"
    )
    return d, per_rank // d, requested, message


def check_data(ckpt: str | Path, manifest: dict[str, Any], cfg: RecGPTConfig, saved: RecGPTConfig) -> None:
    """:class:`ConfigError` on ``data.shards`` when its build (manifest fingerprint: items and every
    shard) is not the one the checkpoint was trained on (its reader state's fingerprint)."""
    state = Path(ckpt) / "reader" / "rank_00000.json"
    try:
        trained_on = json.loads(state.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable cursor: CheckpointManager.load names the damaged file
    if trained_on != manifest.get("fingerprint"):
        raise ConfigError(
            f"data.shards: {cfg.data.shards} is another build of the data (fingerprint "
            f"{str(manifest.get('fingerprint'))[:12]}…) than the checkpoint {ckpt} was trained on "
            f"({trained_on[:12]}…, {saved.data.shards}); another item vocabulary or other records cannot "
            "continue it. Point data.shards at that build, or start a new run"
        )


def _flat(cfg: RecGPTConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k != "extra":
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out


def other_changes(saved: RecGPTConfig, cfg: RecGPTConfig) -> list[str]:
    """``key old -> new`` for every setting that differs from the checkpoint's config, except the fixed
    ones (refused), the schedule's (logged by :func:`apply_schedule`) and :data:`NOT_SETTINGS`."""
    old, new = _flat(saved), _flat(cfg)
    skip = set(FIXED) | set(SCHEDULE_KEYS) | set(NOT_SETTINGS)
    return [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if k not in skip and old.get(k) != new[k]]


def horizon_key(cfg: RecGPTConfig) -> str:
    """The setting that decides the schedule's last step."""
    return "train.max_steps" if cfg.train.max_steps else "train.epochs"


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def apply_schedule(engine, cfg: RecGPTConfig, total_steps: int, step: int) -> list[str]:
    """Set this run's schedule and optimizer settings onto the scheduler and optimizer that DeepSpeed
    restored from a checkpoint at ``step``; returns one log line per setting that changed.

    After it, ``engine.get_lr()`` is the LR the next step (``step + 1``) uses under the new settings,
    and the next checkpoint saves a scheduler that says what it does.
    """
    sched = engine.lr_scheduler
    groups = sched.optimizer.param_groups
    o, s = cfg.optim, cfg.schedule
    new = LRSchedule(s.warmup_steps, total_steps, s.decay, s.min_lr_ratio)
    fns = list({id(f): f for f in sched.lr_lambdas}.values())
    old = fns[0]
    old_lr = sched.base_lrs[0]
    lines = []
    if old.total_steps != new.total_steps:
        lines.append(
            f"resume: {horizon_key(cfg)} {old.total_steps} -> {new.total_steps}: the LR schedule now ends at "
            f"step {new.total_steps}"
        )
    for key, was, now in (
        ("schedule.warmup_steps", old.warmup_steps, new.warmup_steps),
        ("schedule.decay", old.decay, new.decay),
        ("schedule.min_lr_ratio", old.min_ratio, new.min_ratio),
        ("optim.lr", old_lr, o.lr),
    ):
        if was != now if isinstance(was, str) else not _same(float(was), float(now)):
            lines.append(f"resume: {key} {was} -> {now}: applied to the LR schedule from step {step + 1}")
    # Which groups decay (build_optimizer's layout: matrices, then biases and norms; empty ones dropped).
    decays = [bool(g["weight_decay"]) for g in param_groups(engine.module, 1.0)]
    if len(decays) != len(groups):
        raise RuntimeError(f"internal: {len(groups)} optimizer param groups, expected {len(decays)}")
    wanted = [o.weight_decay if d else 0.0 for d in decays]
    decayed = [g["weight_decay"] for g, d in zip(groups, decays) if d]
    # The settings of this run's optimizer (optim.name cannot change on resume); the other's are ignored.
    first = groups[0]
    if o.name == "sgd":
        own: dict[str, Any] = {"momentum": o.momentum, "nesterov": o.nesterov}
        settings = [
            ("optim.momentum", first["momentum"], o.momentum),
            ("optim.nesterov", first["nesterov"], o.nesterov),
        ]
    else:
        own = {"betas": (o.beta1, o.beta2), "eps": o.eps}
        settings = [
            ("optim.beta1", first["betas"][0], o.beta1),
            ("optim.beta2", first["betas"][1], o.beta2),
            ("optim.eps", first["eps"], o.eps),
        ]
    decayed_was = decayed[0] if decayed else o.weight_decay
    for key, was, now in [("optim.weight_decay", decayed_was, o.weight_decay), *settings]:
        if not _same(float(was), float(now)):
            lines.append(f"resume: {key} {was} -> {now}: applied to the optimizer from step {step + 1}")
    if not lines:
        return []

    was_lr = old_lr * old(sched.last_epoch)
    for f in fns:
        f.__dict__.update(new.__dict__)
    sched.base_lrs = [o.lr] * len(groups)
    lr = o.lr * new(sched.last_epoch)
    for g, wd in zip(groups, wanted):
        g.update(lr=lr, initial_lr=o.lr, weight_decay=wd, **own)
    sched._last_lr = [g["lr"] for g in groups]
    lines.append(f"resume: lr now {lr:.4g} (the checkpoint's schedule had {was_lr:.4g})")
    return lines
