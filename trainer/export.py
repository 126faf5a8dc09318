"""A training checkpoint -> an export directory (``recgpt export``).

The checkpoint side of exporting: resolve the checkpoint (run directory -> ``latest``/``best``,
``COMPLETE`` required) and verify every file its ``COMPLETE`` lists (size and sha256: a damaged
checkpoint is refused naming the file, never exported from another one), read its ``config.yaml``, consolidate the ZeRO shards of any stage and world
size (:func:`trainer.checkpoint.consolidate`), rebuild the *unmerged* model (base + adapters) around
the checkpoint's tokenizer and load the weights strictly, take the first ``export.parity_batches``
batches of the valid split, and hand all of it to :func:`modeling.export.write_export`, which merges,
writes, checks parity and publishes. Runs on CPU and never initialises DeepSpeed.

Object stores: a checkpoint at an ``s3://…`` URL is downloaded and verified first
(:func:`trainer.remote.local_copy`); an ``s3://…`` OUT is written and checked locally, then published
with :func:`data_shards.storage.publish` (uploaded under a temporary prefix, copied into place,
``export_manifest.json`` last).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from configs import DataError, ExportError, RecGPTConfig, one_line
from data_shards import storage
from data_shards.storage import is_url
from modeling.data import build_loader
from modeling.export import ExportSource, check_dtype, check_out, write_export
from modeling.factory import load_model_for_eval, read_vocabulary
from modeling.serving import MANIFEST
from trainer.checkpoint import (
    CHECKPOINTS,
    load_consolidated,
    read_checkpoint_config,
    read_trainer_state,
    resolve_checkpoint,
)
from trainer.warm_start import RECORD, read_record_files

log = logging.getLogger("recgpt.export")


def parity_batches(cfg: RecGPTConfig, tokenizer, items: list[dict]) -> list[dict[str, torch.Tensor]]:
    """The first ``export.parity_batches`` batches of the valid split (held out from training)."""
    if cfg.export.parity_batches == 0:
        return []
    batches = []
    for batch in build_loader(cfg, "valid", tokenizer, items, num_workers=0):
        batches.append(batch)
        if len(batches) == cfg.export.parity_batches:
            break
    return batches


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    best: bool = False,
    dtype: str | None = None,
    save_adapter: bool = False,
    force: bool = False,
    max_shard_size: str | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint`` (a run directory — its latest, or with ``best`` its best checkpoint — or
    one checkpoint) to ``out``; returns the manifest.

    ``dtype`` defaults to the run's ``export.dtype``, ``max_shard_size`` to its ``export.max_shard_size``;
    ``save_adapter`` also writes the PEFT adapter, before merging, to ``adapter/``; ``force`` replaces
    an existing ``out``. Raises :class:`CheckpointError` (a missing, incomplete, damaged or
    mismatching checkpoint), :class:`DataError` (the run's ``data.shards``) or :class:`ExportError`
    (writing, parity), each one line; ``out`` is then left untouched.
    """
    # Export consolidates on the CPU: say so before anything imports deepspeed, which otherwise warns
    # that it fell back to the CPU accelerator.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    remote_out = str(out) if is_url(out) else None
    if remote_out is not None:  # written locally, then published in the store (storage.publish)
        if storage.listdir(remote_out) and not force:
            raise ExportError(f"{remote_out}: already exists (--force replaces it)")
        staging = Path(tempfile.mkdtemp(prefix="recgpt-export-"))
        atexit.register(shutil.rmtree, staging, ignore_errors=True)
        out = staging / "export"
    out = check_out(out, force)
    if dtype is not None:
        check_dtype(dtype)
    shown = None
    if is_url(checkpoint):  # a run or checkpoint in an object store: a verified local copy
        from trainer.remote import local_copy

        checkpoint, shown = local_copy(str(checkpoint), best)
    ckpt = resolve_checkpoint(checkpoint, best=best, verify=True).absolute()  # one sha256 pass
    state = read_trainer_state(ckpt)
    cfg = read_checkpoint_config(ckpt)
    world_size = int(state.get("world_size", 1))
    log.info("export %s (step %s, %d rank%s, zero stage %d) -> %s", ckpt, state.get("step"), world_size,
             "" if world_size == 1 else "s",
             cfg.zero.stage, out)  # fmt: skip
    try:
        _, items = read_vocabulary(cfg.data.shards)
        model, tokenizer = load_model_for_eval(cfg, ckpt / "tokenizer", cfg.data.shards)
        load_consolidated(model, ckpt, world_size)
        model = model.float().eval()
        batches = parity_batches(cfg, tokenizer, items)
    except DataError as e:  # the run's shard directory (item vocabulary, parity batches)
        raise type(e)(f"data.shards: {one_line(e)}") from None
    extra = read_record_files(ckpt)
    source = ExportSource(
        extra_files=extra,
        warm_start=json.loads(extra[RECORD]) if RECORD in extra else None,
        checkpoint=shown or str(ckpt),
        step=state.get("step"),
        trainer_state=state,
        metrics=_read_json(ckpt / "metrics.json"),
        world_size=world_size,
        run_dir=(
            shown.rsplit("/", 2)[0]
            if shown and f"/{CHECKPOINTS}/" in shown
            else None
            if shown
            else str(ckpt.parent.parent)
            if ckpt.parent.name == CHECKPOINTS
            else None
        ),  # fmt: skip
    )
    manifest = write_export(out, model, tokenizer, items, cfg, batches, source, dtype=dtype,
                            save_adapter=save_adapter, force=force, max_shard_size=max_shard_size)  # fmt: skip
    if remote_out is not None:
        t0 = time.perf_counter()
        storage.publish(out, remote_out, marker=MANIFEST, force=force)
        shutil.rmtree(out.parent, ignore_errors=True)
        log.info("export published to %s in %.1f s", remote_out, time.perf_counter() - t0)
    return manifest
