"""Atomic, verifiable checkpoints on shared storage (layout: docs/DESIGN.md, "Run directory").

Write protocol (every rank runs :meth:`CheckpointManager.save`):

1. rank 0 removes a stale ``checkpoints/.tmp-step_N`` left by a crash; every rank creates it (on a
   run directory that is not shared — one staging directory per node, :mod:`trainer.remote` — each
   node holds the files its ranks write);
2. every rank calls ``engine.save_checkpoint`` into ``.tmp-step_N/ds`` (a collective: DeepSpeed hangs
   when only rank 0 calls it) and writes its own reader state and RNG state; rank 0 writes
   trainer_state.json, config.yaml, metrics.json and the tokenizer;
3. barrier — after it, every rank's files are on disk;
4. every rank hashes the files it owns (:func:`file_owners`: the ones it wrote), in parallel; rank 0
   gathers the lists and writes, last, ``COMPLETE``: a JSON document listing every file of the
   checkpoint with its size and sha256 (below); renames ``.tmp-step_N`` to ``step_N``, replaces
   ``latest`` (and ``best``) atomically, and only then prunes older complete checkpoints (never
   latest, best, or anything newer than latest);
5. barrier — every rank sees the published checkpoint before ``report`` is called.

A crash anywhere before the rename leaves a ``.tmp-*`` directory that nothing reads and ``latest``
pointing at the previous complete checkpoint. Resume (``train.resume=auto``) follows ``latest``; it
never picks "the highest-numbered directory".

``COMPLETE`` (format_version 1)::

    {"format_version": 1, "checkpoint": "step_00000020", "step": 20, "world_size": 2,
     "files": {"ds/step_00000020/mp_rank_00_model_states.pt": {"bytes": 123, "sha256": "…"}, …}}

``files`` holds every file under the checkpoint directory except ``COMPLETE`` itself (paths relative,
``/``-separated). :func:`verify_checkpoint` checks that each is present with its size, then its sha256.
Checkpoints of earlier versions have the one text line ``step_N`` there: complete but unverifiable;
they are used as they are, with one line saying so.

Damage (a missing file, another size, another sha256 — bit rot, a half-copied directory):

* ``train.resume=auto`` (:func:`find_resume_checkpoint`) verifies ``latest``'s target, then the older
  complete checkpoints newest first, and resumes from the first that verifies, with one stderr line
  naming every checkpoint skipped and its bad file; when none verifies, :class:`CheckpointError`
  naming the newest one's bad file (never a silent start from scratch). Rank 0 decides and broadcasts
  the decision (or the error) to the other ranks, so every rank resumes from the same checkpoint and
  only one process reads the checkpoint's bytes.
* An explicit checkpoint (``train.resume=PATH``, ``recgpt export``, ``recgpt evaluate --checkpoint``,
  :func:`resolve_checkpoint`) that does not verify is a :class:`CheckpointError` naming the file —
  no fallback.

Cost: one sha256 pass over the checkpoint's bytes at save (each rank its own files, after the
barrier) and at resume/export/evaluate (``recgpt evaluate`` under torchrun: every rank
verifies on its own). sha256 runs at ~1-2 GB/s per core (1.4 GB/s measured on a 2-core CI box), so
a checkpoint of a few GB adds a few seconds to each save and each resume; the tiny test run's
checkpoint (9 files, 12.4 MiB) takes 0.01-0.03 s.

Resuming on a different world size (elastic training): ZeRO >= 1 partitions the optimizer state (and
ZeRO-3 the weights) per rank, so the checkpoint's ``ds/`` state is first converted to DeepSpeed's
*universal checkpoint* (``deepspeed.checkpoint.ds_to_universal``: one file per parameter with its fp32
weight and optimizer moments, independent of the rank count; :func:`to_universal`) into
``checkpoints/.tmp-step_N-universal`` and loaded from there by an engine built with
``"checkpoint": {"load_universal": true}``; the directory is deleted after the load (or, after a crash,
by the next prune). ZeRO-0 keeps the optimizer whole and loads directly. Every rank continues the data
plan from rank 0's reader state re-planned over the new ranks (``data_shards.reader``); the RNG streams
start afresh (seeded by seed, rank and step).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from configs import (
    RESOLVED_CONFIG,
    CheckpointError,
    RecGPTConfig,
    atomic_write,
    load_config,
    one_line,
    publish_dir,
    save_resolved,
    sha256_file,
)
from trainer.distributed import all_gather_object, barrier, broadcast_object
from trainer.faults import Faults

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
DS_SUBDIR = "ds"
_NAME = re.compile(r"^step_(\d{8})$")
COMPLETE_FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint name (``step_00000020`` -> 20; None for any other name)."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def is_complete(ckpt: Path) -> bool:
    """Published (has its ``COMPLETE`` marker and trainer state); says nothing about damage."""
    return (ckpt / COMPLETE).is_file() and (ckpt / "trainer_state.json").is_file()


def _is_main() -> bool:
    """Rank 0 of the process group (or of torchrun's environment before one exists)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _notice(text: str) -> None:
    """One line on stderr, from rank 0 only."""
    if _is_main():
        print(f"recgpt: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- COMPLETE: list and verify


def local_files(ckpt: str | os.PathLike) -> list[str]:
    """Relative paths of the regular files under ``ckpt`` except ``COMPLETE``, sorted."""
    ckpt = Path(ckpt)
    return sorted(
        rel
        for path in ckpt.rglob("*")
        if (rel := path.relative_to(ckpt).as_posix()) != COMPLETE and path.is_file() and not path.is_symlink()
    )


def checkpoint_files(ckpt: str | os.PathLike, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``ckpt`` except ``COMPLETE`` (or of
    the relative paths ``only``)."""
    ckpt = Path(ckpt)
    return {
        rel: {"bytes": (ckpt / rel).stat().st_size, "sha256": sha256_file(ckpt / rel)}
        for rel in (local_files(ckpt) if only is None else only)
    }


# DeepSpeed's per-rank files (zero_pp_rank_<r>_mp_rank_00_*) and recgpt's (reader/rank_<r>.json, rng/…).
_RANK_TAG = re.compile(r"zero_pp_rank_(\d+)_|(?:^|/)rank_(\d+)\.")


def file_owners(everyone: list[list[str]]) -> dict[str, int]:
    """``{relative path: rank}``: which rank hashes and uploads each checkpoint file.

    ``everyone[r]``: the files rank ``r`` sees in its copy of the checkpoint (its node's disk). A file
    named for a rank that sees it belongs to that rank (each rank hashes and uploads what it wrote, in
    parallel); any other file to the lowest rank that sees it (rank 0's files, or a name no rule knows:
    never dropped). On one machine every rank sees every file; across machines each sees its node's.
    """
    seen = [set(names) for names in everyone]
    owners: dict[str, int] = {}
    for rank, names in enumerate(everyone):
        for rel in names:
            if rel in owners:
                continue
            m = _RANK_TAG.search(rel)
            tagged = int(m.group(1) or m.group(2)) if m else -1
            owners[rel] = tagged if 0 <= tagged < len(seen) and rel in seen[tagged] else rank
    return owners


def write_complete(
    ckpt: str | os.PathLike,
    name: str,
    step: int,
    world_size: int,
    files: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``ckpt/COMPLETE`` (atomically, last): the file list with sizes and sha256 (``files``, as
    :func:`checkpoint_files` gives it; default: hash every file under ``ckpt`` now); returns it."""
    doc = {
        "format_version": COMPLETE_FORMAT_VERSION,
        "checkpoint": name,
        "step": step,
        "world_size": world_size,
        "files": checkpoint_files(ckpt) if files is None else dict(sorted(files.items())),
    }
    atomic_write(Path(ckpt) / COMPLETE, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def _read_complete(ckpt: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(document, None)``; ``(None, None)`` for an old one-line ``step_N`` marker; ``(None, problem)``
    when the marker is missing or unreadable."""
    try:
        text = (ckpt / COMPLETE).read_text()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{COMPLETE}: {'missing' if isinstance(e, FileNotFoundError) else one_line(e)}"
    if re.fullmatch(r"step_\d+", text.strip()):
        return None, None
    try:
        doc = json.loads(text)
        files = doc["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise ValueError("'files' is not {path: {bytes, sha256}}")
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{COMPLETE}: unreadable ({one_line(e)})"
    return doc, None


def checkpoint_damage(ckpt: str | os.PathLike) -> tuple[str | None, bool]:
    """``(problem, verified)`` of a checkpoint: ``problem`` is ``"<file>: <what>"`` for the first bad
    file (``None`` when every listed file is present with its size and sha256); ``verified`` is False
    for an old-format ``COMPLETE`` that lists no files (nothing could be checked).

    Sizes are checked for every file before any is hashed, so a missing or truncated file is found
    without reading gigabytes."""
    ckpt = Path(ckpt)
    doc, problem = _read_complete(ckpt)
    if doc is None:
        if problem is None and not (ckpt / "trainer_state.json").is_file():
            problem = "trainer_state.json: missing"
        return problem, False
    files = doc["files"]
    for rel, want in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel}: missing", True
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{rel}: {size} bytes, {COMPLETE} lists {want['bytes']}", True
    for rel, want in files.items():
        try:
            digest = sha256_file(ckpt / rel)
        except OSError as e:
            return f"{rel}: unreadable ({one_line(e)})", True
        if digest != want["sha256"]:
            return f"{rel}: sha256 differs", True
    return None, True


_UNVERIFIABLE = f"has an old-format {COMPLETE} marker (no file list) and cannot be verified"


def verify_checkpoint(ckpt: str | os.PathLike) -> bool:
    """Check every file ``COMPLETE`` lists (presence, size, sha256); returns True when verified, False
    for an old-format checkpoint (usable, unverifiable — the caller says so once). Raises
    :class:`CheckpointError` naming the checkpoint and its first bad file."""
    problem, verified = checkpoint_damage(ckpt)
    if problem is not None:
        raise CheckpointError(f"{ckpt}: damaged checkpoint ({problem}); use an earlier checkpoint")
    return verified


# --------------------------------------------------------------------------- find a checkpoint


def _read_pointer(root: Path, name: str) -> Path | None:
    p = root / name
    if not p.is_file():
        return None
    target = root / p.read_text().strip()
    return target if is_complete(target) else None


def _complete_checkpoints(root: Path, marker_only: bool = False) -> list[Path]:
    """Complete checkpoints under ``root`` (with ``marker_only``: every one with a ``COMPLETE``, even
    if other files are gone — damaged, for :func:`checkpoint_damage` to name), oldest first."""
    if not root.is_dir():
        return []
    done = (lambda p: (p / COMPLETE).is_file()) if marker_only else is_complete
    found = [p for p in root.iterdir() if _NAME.match(p.name) and done(p)]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(path: str | os.PathLike, best: bool = False, *, verify: bool = True) -> Path:
    """A complete checkpoint directory from a run directory (latest or best) or a checkpoint path.

    With ``verify`` (the default) every file its ``COMPLETE`` lists is checked (:func:`verify_checkpoint`;
    an old-format checkpoint is used with one line saying it cannot be verified). Raises
    :class:`CheckpointError` naming the path when there is none, it is incomplete, or it is damaged
    (naming the file) — an explicit checkpoint never falls back to another one.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if (p / "trainer_state.json").exists() or (p / DS_SUBDIR).exists():
        if not is_complete(p):
            raise CheckpointError(f"{p}: incomplete checkpoint (no {COMPLETE} marker); use an earlier one")
        ckpt = p
    else:
        root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
        which = "best" if best else "latest"
        ckpt = _read_pointer(root, which)
        if ckpt is None:
            raise CheckpointError(
                f"{p}: no complete checkpoint ({root / which} missing or points at an incomplete one)"
            )
    if verify and not verify_checkpoint(ckpt):
        _notice(f"checkpoint {ckpt} {_UNVERIFIABLE}; using it as it is")
    return ckpt


def _auto_resume(output_dir: Path) -> Path | None:
    """``train.resume=auto`` on one process: the newest checkpoint that verifies, starting at
    ``latest``'s target (see the module docstring); None for a run directory without checkpoints."""
    root = output_dir / CHECKPOINTS
    published = _complete_checkpoints(root, marker_only=True)[::-1]  # newest first
    pointer = root / "latest"
    latest = pointer.read_text().strip() if pointer.is_file() else None
    skipped: list[tuple[str, str]] = []  # (checkpoint, "<file>: <what>")
    if latest is not None:
        if not (root / latest / COMPLETE).is_file():
            gone = "directory missing" if not (root / latest).is_dir() else f"{COMPLETE}: missing"
            skipped.append((latest, gone))
        latest_step = step_of(latest)
        if latest_step is not None:  # newer ones belong to a timeline a resume has abandoned
            published = [c for c in published if step_of(c.name) <= latest_step]
    for ckpt in published:
        problem, verified = checkpoint_damage(ckpt)
        if problem is not None:
            skipped.append((ckpt.name, problem))
            continue
        if skipped or not verified:
            damaged = [f"checkpoint {name} is damaged ({what})" for name, what in skipped]
            tail = "" if verified else f", which {_UNVERIFIABLE}"
            _notice("; ".join([*damaged, f"resuming from {ckpt.name}{tail}"]))
        return ckpt
    if skipped:
        name, what = skipped[0]
        n = len(skipped) - 1
        earlier = f"none of the {n} earlier complete checkpoints verifies" if n else "no earlier complete one"
        raise CheckpointError(
            f"{root / name}: damaged checkpoint ({what}), and {earlier}; "
            "repair or remove it, or start over with train.resume=never"
        )
    return None


def find_resume_checkpoint(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """Apply ``train.resume``: auto (the newest checkpoint of output_dir that verifies, falling back
    past damaged ones with one line; None when there is none), never, or a path (verified, no fallback).

    In a process group, rank 0 decides (hashing the checkpoint once) and broadcasts the decision or
    its error: every rank resumes from the same checkpoint or raises the same :class:`CheckpointError`.
    """
    if resume == "never":
        return None

    def decide() -> Path | None:
        return _auto_resume(Path(output_dir)) if resume == "auto" else resolve_checkpoint(resume)

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return decide()
    outcome: list[Any] = [None]
    error: BaseException | None = None
    # Sent relative to output_dir (or the resume path): a staging run directory has another local
    # path on every node.
    base = Path(output_dir) if resume == "auto" else Path(resume)
    if dist.get_rank() == 0:
        try:
            found = decide()
            if found is not None and found.is_relative_to(base):
                found = found.relative_to(base)
            outcome[0] = {"path": None if found is None else str(found)}
        except Exception as e:  # every rank must leave the broadcast, then raise the same error
            error = e
            why = str(e)
            if not isinstance(e, CheckpointError):
                why = f"rank 0 could not choose the checkpoint to resume from ({type(e).__name__}: {one_line(e)})"
            outcome[0] = {"error": why}
    outcome = [broadcast_object(outcome[0], src=0)]
    if error is not None:
        raise error
    if "error" in outcome[0]:
        raise CheckpointError(outcome[0]["error"])
    return None if outcome[0]["path"] is None else base / outcome[0]["path"]


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
        self,
        output_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        keep_last: int,
        faults: Faults,
        extra_files: dict[str, bytes] | None = None,
    ):
        self.root = Path(output_dir) / CHECKPOINTS
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.faults = faults
        self.owned: list[str] = []
        """Relative paths of the last checkpoint's files this rank hashed (and uploads to a store)."""
        self.written: Path | None = None
        """This rank's local copy of the last checkpoint (the temp dir on a node without rank 0)."""
        self.conversion_s: float | None = None
        """Wall time of this rank's universal-checkpoint conversion at the last :meth:`load` (None: none)."""
        self.extra_files = dict(extra_files or {})
        """Small files every checkpoint carries (name -> bytes; a warm start's record), listed in COMPLETE."""

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
        if self.rank == 0 and tmp.exists():  # a crash left a half-written one behind
            shutil.rmtree(tmp)
        barrier()
        # Every rank: on a run directory that is not shared (a staging directory per node) each node
        # holds the files its ranks write.
        (tmp / "reader").mkdir(parents=True, exist_ok=True)
        (tmp / "rng").mkdir(exist_ok=True)
        # save_latest: ds/latest names the tag, so zero_to_fp32 and load_checkpoint need no tag.
        engine.save_checkpoint(str(tmp / DS_SUBDIR), tag=name, save_latest=True)
        rank_file = f"rank_{self.rank:05d}"
        (tmp / "reader" / f"{rank_file}.json").write_text(json.dumps(train_loader.state_dict()))
        torch.save(rng_state(), tmp / "rng" / f"{rank_file}.pt")
        self.faults.maybe_kill("kill_before_publish", step)
        if self.rank == 0:
            state = dict(trainer_state, world_size=self.world_size, checkpoint=name)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            save_resolved(cfg, tmp)
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            for fname, data in self.extra_files.items():
                (tmp / fname).write_bytes(data)
        barrier()
        # Each rank hashes the files it owns (file_owners), in parallel; rank 0 lists them all.
        everyone = all_gather_object(local_files(tmp))
        owners = file_owners(everyone)
        self.owned = [rel for rel in everyone[self.rank] if owners[rel] == self.rank]
        listed = all_gather_object(checkpoint_files(tmp, self.owned))
        if self.rank == 0:
            files = {rel: entry for part in listed for rel, entry in part.items()}
            write_complete(tmp, name, step, self.world_size, files)  # last: lists every file above
            # The same step may be written again by a run resumed from an earlier checkpoint: the old
            # directory is renamed aside and deleted only once the new one is in place.
            publish_dir(tmp, final)
            atomic_write(self.root / "latest", name)
            if is_best:
                atomic_write(self.root / "best", name)
            self.prune()
        barrier()
        # Where this rank's copy is: published, or (a node without rank 0's disk) still the temp dir.
        self.written = final if (final / COMPLETE).is_file() else tmp
        return final

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return _complete_checkpoints(self.root)

    def prune(self) -> None:
        """Delete complete checkpoints beyond keep_last and stale temp dirs.

        Never deleted: ``latest``, ``best``, and checkpoints newer than ``latest`` (left by a timeline a
        resume abandoned — e.g. the damaged one it fell back from; the run overwrites them when it gets
        there). keep_last counts the checkpoints up to ``latest`` only, so such leftovers never push
        out the checkpoints this run can still fall back to.
        """
        complete = self.complete_checkpoints()
        pointers = {}
        for pointer in ("latest", "best"):
            p = self.root / pointer
            if p.is_file():
                pointers[pointer] = p.read_text().strip()
        latest_step = step_of(pointers.get("latest", ""))
        if latest_step is not None:
            newer = {p.name for p in complete if step_of(p.name) > latest_step}
            complete = [p for p in complete if p.name not in newer]
        else:
            newer = set()
        keep = {p.name for p in complete[-self.keep_last :]} | newer | set(pointers.values())
        for p in self.root.iterdir():
            # Only called between saves, so no write is in flight: temp dirs and the old copy a
            # publish_dir renamed aside (a crash right before deleting it) are stale.
            stale = p.name.startswith(".tmp-step_") or (p.name.startswith(".step_") and ".old-" in p.name)
            if (_NAME.match(p.name) and p.name not in keep) or stale:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ read
    def universal_dir(self, ckpt: Path) -> Path:
        """Where :meth:`load` converts ``ckpt`` to a universal checkpoint (a stale temp dir for prune)."""
        return self.root / f".tmp-{ckpt.name}-universal"

    def load(
        self,
        engine,
        ckpt: Path,
        train_loader,
        universal: bool = False,
        convert: bool = False,
        drop_remainder: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore engine (weights, optimizer, scheduler) and the data cursor; return the trainer
        state and this rank's RNG state (applied by the loop right before the first step; None when the
        world size changed: the loop seeds fresh streams).

        ``universal``: load through DeepSpeed's universal checkpoint (another world size under ZeRO
        >= 1; the engine was built with ``load_universal``); ``convert``: this rank converts (one per
        node-local run directory), the others wait at a barrier; ``drop_remainder``: records of the
        epoch's rest that fill no batch of the new plan are left out with a warning (a global batch
        deliberately changed) instead of refused. Raises :class:`CheckpointError`."""
        state = json.loads((ckpt / "trainer_state.json").read_text())
        resized = state["world_size"] != self.world_size
        if universal:
            root = self.universal_dir(ckpt)
            if convert:
                self.conversion_s = to_universal(ckpt, root)
            barrier()
            try:
                load_path, _ = engine.load_checkpoint(
                    str(root), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
                )
            finally:
                barrier()
                if convert:
                    shutil.rmtree(root, ignore_errors=True)
        else:
            load_path, _ = engine.load_checkpoint(
                str(ckpt / DS_SUBDIR), tag=None, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if load_path is None:
            raise CheckpointError(f"{ckpt / DS_SUBDIR}: DeepSpeed could not load this checkpoint")
        rank_file = f"rank_{self.rank:05d}"
        # Another world size: every rank re-plans from rank 0's cursor (the ranks were in lockstep).
        reader = ckpt / "reader" / f"{'rank_00000' if resized else rank_file}.json"
        reader_state = json.loads(reader.read_text())
        replan = resized or reader_state["batch_size"] != train_loader.batch_size
        train_loader.load_state_dict(reader_state, replan=replan, drop_remainder=drop_remainder)
        rng = None if resized else torch.load(ckpt / "rng" / f"{rank_file}.pt", weights_only=True)
        return state, rng


# --------------------------------------------------------------------------- universal checkpoints


def to_universal(ckpt: str | os.PathLike, dest: str | os.PathLike) -> float:
    """Convert the DeepSpeed state of complete checkpoint ``ckpt`` (``ds/<tag>``, ZeRO 1-3, any world
    size) to DeepSpeed's universal format in ``dest/<tag>``, with DeepSpeed's own converter
    (``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state``: state that ZeRO-3 or
    frozen LoRA weights leave out of the optimizer files is filled in). Written to a temp dir, renamed
    into place; returns the wall time in seconds. Raises :class:`CheckpointError` with the converter's
    last line."""
    import subprocess
    import time

    ckpt, dest = Path(ckpt), Path(dest)
    tag = (ckpt / DS_SUBDIR / "latest").read_text().strip()
    tmp = dest.parent / f"{dest.name}.part-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    # A subprocess: the converter is a script (its own worker pools, prints); one worker each keeps
    # it inside the rank's CPU share.
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
         str(ckpt / DS_SUBDIR / tag), "--output_folder", str(tmp / tag), "--inject_missing_state",
         "--num_extract_workers", "1", "--num_merge_workers", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise CheckpointError(
            f"{ckpt}: conversion to DeepSpeed's universal checkpoint failed: {lines[-1] if lines else proc.returncode}"
        )
    (tmp / "latest_universal").write_text(tag)
    os.replace(tmp, dest)
    return time.perf_counter() - t0


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
    DeepSpeed's zero_to_fp32, which also restores frozen parameters (LoRA base weights; at stage 1
    from the module state dict). Plain fp32
    ZeRO-0 keeps the full weights in the module state dict. No checks: :func:`consolidate` is the
    checked, quiet entry point.
    """
    ds_dir = Path(ckpt) / DS_SUBDIR
    tag = (ds_dir / "latest").read_text().strip()
    tag_dir = ds_dir / tag
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
        # DeepSpeed saves frozen parameters (LoRA / freeze-tuning base weights) for zero_to_fp32 only
        # from stage 2 on; at stage 1 they are in the module state dict, whole (ZeRO-1 partitions no
        # weights).
        module = tag_dir / "mp_rank_00_model_states.pt"
        if module.is_file():
            states = torch.load(module, map_location="cpu", weights_only=False)
            if states.get("ds_config", {}).get("zero_optimization", {}).get("stage") == 1:
                sd = {**{k: v for k, v in states["module"].items() if k not in sd}, **sd}
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
