"""Atomic checkpoints on shared storage (layout: docs/DESIGN.md, "Run directory").

Write protocol (every rank runs :meth:`CheckpointManager.save`):

1. rank 0 creates ``checkpoints/.tmp-step_N`` (removing a stale one left by a crash);
2. every rank calls ``engine.save_checkpoint`` into ``.tmp-step_N/ds`` (a collective: DeepSpeed hangs
   when only rank 0 calls it) and writes its own reader state and RNG state;
3. barrier — after it, every rank's files are on disk;
4. rank 0 writes trainer_state.json, config.yaml, metrics.json, the tokenizer and ``COMPLETE``, renames
   ``.tmp-step_N`` to ``step_N``, replaces ``latest`` (and ``best``) atomically, and only then prunes
   older complete checkpoints (never the best);
5. barrier — every rank sees the published checkpoint before ``report`` is called.

A crash anywhere before the rename leaves a ``.tmp-*`` directory that nothing reads and ``latest``
pointing at the previous complete checkpoint. Resume (``train.resume=auto``) follows ``latest`` and
checks ``COMPLETE``; it never picks "the highest-numbered directory".

Resuming with a different world size is refused (plain ZeRO optimizer partitions are per rank, and
each rank's data cursor is saved for its own shard plan). To continue on another number of processes,
start a new run from consolidated weights (``recgpt export``, then ``model.name_or_path=EXPORT``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configs import (
    RESOLVED_CONFIG,
    CheckpointError,
    RecGPTConfig,
    atomic_write,
    load_config,
    one_line,
    save_resolved,
)
from trainer.distributed import barrier
from trainer.faults import Faults

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
DS_SUBDIR = "ds"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file() and (ckpt / "trainer_state.json").is_file()


def _read_pointer(root: Path, name: str) -> Path | None:
    p = root / name
    if not p.is_file():
        return None
    target = root / p.read_text().strip()
    return target if is_complete(target) else None


def resolve_checkpoint(path: str | os.PathLike, best: bool = False) -> Path:
    """A complete checkpoint directory from a run directory (latest or best) or a checkpoint path.

    Raises :class:`CheckpointError` naming the path when there is none or it is incomplete.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if (p / "trainer_state.json").exists() or (p / DS_SUBDIR).exists():
        if not is_complete(p):
            raise CheckpointError(f"{p}: incomplete checkpoint (no {COMPLETE} marker); use an earlier one")
        return p
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    which = "best" if best else "latest"
    ckpt = _read_pointer(root, which)
    if ckpt is None:
        raise CheckpointError(
            f"{p}: no complete checkpoint ({root / which} missing or points at an incomplete one)"
        )
    return ckpt


def find_resume_checkpoint(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """Apply ``train.resume``: auto (latest complete in output_dir, if any), never, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return _read_pointer(Path(output_dir) / CHECKPOINTS, "latest")
    return resolve_checkpoint(resume)


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from (dropout, FreeLB init), as tensors + JSON strings.

    Stored without pickled Python objects so it loads with ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *map(float, np_state[2:])]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Writes, publishes, prunes and loads the checkpoints of one run directory."""

    def __init__(
        self, output_dir: str | os.PathLike, rank: int, world_size: int, keep_last: int, faults: Faults
    ):
        self.root = Path(output_dir) / CHECKPOINTS
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.faults = faults

    # ------------------------------------------------------------------ write
    def save(
        self,
        engine,
        step: int,
        train_loader,
        trainer_state: dict[str, Any],
        cfg: RecGPTConfig,
        metrics: dict[str, Any],
        tokenizer,
        is_best: bool,
    ) -> Path:
        """Write checkpoint ``step`` with the protocol in the module docstring; returns its final path."""
        name = checkpoint_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.rank == 0:
            if tmp.exists():  # a crash left a half-written one behind
                shutil.rmtree(tmp)
            (tmp / "reader").mkdir(parents=True)
            (tmp / "rng").mkdir()
        barrier()
        # save_latest: ds/latest names the tag, so zero_to_fp32 and load_checkpoint need no tag.
        engine.save_checkpoint(str(tmp / DS_SUBDIR), tag=name, save_latest=True)
        rank_file = f"rank_{self.rank:05d}"
        (tmp / "reader" / f"{rank_file}.json").write_text(json.dumps(train_loader.state_dict()))
        torch.save(rng_state(), tmp / "rng" / f"{rank_file}.pt")
        self.faults.maybe_kill("kill_before_publish", step)
        barrier()
        if self.rank == 0:
            state = dict(trainer_state, world_size=self.world_size, checkpoint=name)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            save_resolved(cfg, tmp)
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            atomic_write(tmp / COMPLETE, f"{name}\n")
            if final.exists():  # the same step written again by a run restarted from an earlier one
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(self.root / "latest", name)
            if is_best:
                atomic_write(self.root / "best", name)
            self.prune()
        barrier()
        return final

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def prune(self) -> None:
        """Delete complete checkpoints beyond keep_last (never best or latest) and stale temp dirs."""
        keep = {p.name for p in self.complete_checkpoints()[-self.keep_last :]}
        for pointer in ("latest", "best"):
            target = _read_pointer(self.root, pointer)
            if target is not None:
                keep.add(target.name)
        for p in self.root.iterdir():
            stale_tmp = p.name.startswith(".tmp-step_")  # only called between saves: no write is in flight
            if (_NAME.match(p.name) and p.name not in keep) or stale_tmp:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ read
    def load(self, engine, ckpt: Path, train_loader) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore engine (weights, optimizer, scheduler), this rank's data cursor; return the
        trainer state and this rank's RNG state (applied by the loop right before the first step)."""
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state["world_size"] != self.world_size:
            raise CheckpointError(
                f"{ckpt}: written by {state['world_size']} processes, this run has {self.world_size}; "
                "resuming on a different number of processes is not supported (ZeRO partitions and data "
                "cursors are per rank). Start a new run from `recgpt export` of it (model.name_or_path=…) "
                "or resume with the original process count."
            )
        load_path, _ = engine.load_checkpoint(
            str(ckpt / DS_SUBDIR), tag=None, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"{ckpt / DS_SUBDIR}: DeepSpeed could not load this checkpoint")
        rank_file = f"rank_{self.rank:05d}"
        train_loader.load_state_dict(json.loads((ckpt / "reader" / f"{rank_file}.json").read_text()))
        rng = torch.load(ckpt / "rng" / f"{rank_file}.pt", weights_only=True)
        return state, rng


# --------------------------------------------------------------------------- consolidated weights


def read_trainer_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.json`` of a complete checkpoint (step, epoch, world_size, ...)."""
    path = Path(ckpt) / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({one_line(e)})") from None


def read_checkpoint_config(
    ckpt: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
) -> RecGPTConfig:
    """The resolved config saved in a checkpoint (older keys upgraded), with ``overrides`` applied."""
    path = Path(ckpt) / RESOLVED_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {RESOLVED_CONFIG} in the checkpoint")
    return load_config(path, overrides, saved=True)


def consolidated_state_dict(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of a complete checkpoint, on CPU, for any ZeRO stage and world size.

    ZeRO 1-3 (and bf16/fp16, whose fp32 master copy lives in the optimizer partitions) go through
    DeepSpeed's zero_to_fp32, which also restores frozen parameters (LoRA base weights). Plain fp32
    ZeRO-0 keeps the full weights in the module state dict. No checks: :func:`consolidate` is the
    checked, quiet entry point.
    """
    ds_dir = Path(ckpt) / DS_SUBDIR
    tag = (ds_dir / "latest").read_text().strip()
    tag_dir = ds_dir / tag
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    else:
        # DeepSpeed pickles its own bookkeeping next to the weights: this is our own file.
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = states["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def consolidate(ckpt: str | os.PathLike, world_size: int) -> dict[str, torch.Tensor]:
    """:func:`consolidated_state_dict` of ``ckpt`` (written by ``world_size`` ranks), checked and quiet.

    Missing or damaged rank files, and empty tensors (ZeRO-3 partitions saved without gathering), are
    one :class:`CheckpointError` naming the path instead of a shape error deep inside zero_to_fp32 or
    a merge that silently drops the training.
    """
    ds = Path(ckpt) / DS_SUBDIR
    if not (ds / "latest").is_file():
        raise CheckpointError(f"{ds}: no DeepSpeed checkpoint (ds/latest missing)")
    tag_dir = ds / (ds / "latest").read_text().strip()
    for pattern in ("*_optim_states.pt", "zero_pp_rank_*_model_states.pt"):
        found = len(list(tag_dir.glob(pattern)))
        if found and found != world_size:
            raise CheckpointError(f"{tag_dir}: {found} files {pattern} but the run had {world_size} ranks")
    try:
        # zero_to_fp32 prints progress bars and per-group lines: keep the CLI output to our own lines.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = consolidated_state_dict(ckpt)
    except Exception as e:  # torch.load/unpickling/zero_to_fp32 raise many types for a damaged checkpoint
        raise CheckpointError(
            f"{tag_dir}: cannot consolidate the DeepSpeed checkpoint ({one_line(e)})"
        ) from None
    # ZeRO-3 + LoRA can save adapters as torch.Size([0]) (peft#297): refuse any empty tensor, naming it.
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise CheckpointError(f"{ckpt}: empty tensors in the checkpoint ({', '.join(empty[:3])}); "
                              "ZeRO-3 partitions were saved without gathering")  # fmt: skip
    return state


def load_consolidated(model: torch.nn.Module, ckpt: str | os.PathLike, world_size: int) -> None:
    """Load :func:`consolidate` of ``ckpt`` into ``model`` (a RecModel rebuilt from the checkpoint's
    config.yaml and tokenizer) strictly: another model's weights are one :class:`CheckpointError`."""
    state = consolidate(ckpt, world_size)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches
        raise CheckpointError(
            f"{ckpt}: weights do not fit the model rebuilt from its config.yaml ({one_line(e)})"
        ) from None
    if missing or unexpected:
        what = [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {unexpected[:3]}"] * bool(
            unexpected
        )
        raise CheckpointError(
            f"{ckpt}: weights do not fit the model rebuilt from its config.yaml ({'; '.join(what)})"
        )
