"""Distributed full-ranking evaluation, during training and as ``recgpt evaluate``.

Every rank scores its share of the split (the reader pads the last batches so all ranks run the same
number of forwards — ZeRO-3 gathers parameters collectively), per-example outputs are gathered to
every rank and reduced by ``modeling.metrics.compute_metrics`` — so every rank holds the same metrics
(early stopping agrees) and 2 ranks give the single-process numbers exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from configs import ExportError, RecGPTConfig, load_config, one_line
from data_shards import storage


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(model: torch.nn.Module, loader, cfg: RecGPTConfig, device: torch.device) -> dict[str, float]:
    """Metrics of ``model`` (a RecModel or the DeepSpeed engine around it) on every record of ``loader``.

    With ``adversarial.eval_epsilon > 0`` the ``robust_*`` metrics under an FGM attack come too.
    Leaves the model in train mode if it was.
    """
    from modeling.metrics import compute_metrics, concat_outputs, eval_outputs

    was_training = model.training
    model.eval()
    outputs = []
    # The DataLoader draws its worker seed from the global RNG: keep evaluation out of the training
    # RNG stream so a resumed run draws the same dropout masks as an uninterrupted one.
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            outputs.append(eval_outputs(model, to_device(batch, device), cfg, cfg.adversarial.eval_epsilon))
    local = concat_outputs(outputs)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = concat_outputs([g for g in gathered if g])
    model.train(was_training)
    return compute_metrics(local, cfg)


# --------------------------------------------------------------------------- recgpt evaluate


def _score(
    cfg: RecGPTConfig, model, tokenizer, shards: str | os.PathLike, split: str, info
) -> dict[str, Any]:
    """Metrics of ``model`` on ``split`` of ``shards``, this rank's share, gathered (see :func:`evaluate`)."""
    from data_shards.manifest import read_items
    from modeling.data import build_loader

    model.to(info.device)
    loader = build_loader(cfg, split, tokenizer, read_items(shards), shards=shards,
                          rank=info.rank, world_size=info.world_size)  # fmt: skip
    metrics = evaluate(model, loader, cfg, info.device)
    head = {
        "data": str(shards) if storage.is_url(shards) else str(Path(shards)),
        "split": split,
        "exclude_seen": cfg.eval.exclude_seen,
    }
    return {**head, "ranking": "full", **metrics}


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    split: str = "test",
    *,
    data: str | os.PathLike | None = None,
    best: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Full-ranking metrics of a training checkpoint on ``split`` (valid or test).

    ``checkpoint``: a run directory (its latest complete checkpoint, or with ``best`` its best one) or
    one checkpoint; its consolidated weights are scored (any ZeRO stage and world size). ``data``: a
    shard directory (default: the run's ``data.shards``); ``overrides``: ``key=value`` applied to the
    checkpoint's config (e.g. ``eval.exclude_seen=false``). Sets up (or adopts) the process group and
    tears down one it created: runs as one process or under torchrun, each rank scoring its share.
    Returns ``{"checkpoint", "step", "data", "split", "exclude_seen", "ranking", **metrics}`` — the
    same on every rank.
    """
    from trainer.checkpoint import read_checkpoint_config, read_trainer_state, resolve_checkpoint
    from trainer.distributed import setup_distributed, teardown_distributed

    # A bad path or key is reported before the process group and DeepSpeed start (one line, at once).
    shown = None
    if storage.is_url(checkpoint):  # a run or checkpoint in an object store: a verified local copy
        from trainer.remote import local_copy

        checkpoint, shown = local_copy(str(checkpoint), best)
    ckpt = resolve_checkpoint(checkpoint, best=best)
    cfg = read_checkpoint_config(ckpt, overrides)
    shards = data or cfg.data.shards
    state = read_trainer_state(ckpt)
    info = setup_distributed()  # before anything imports deepspeed: it settles DS_ACCELERATOR
    try:
        from modeling.factory import load_model_for_eval
        from trainer.checkpoint import load_consolidated

        model, tokenizer = load_model_for_eval(cfg, ckpt / "tokenizer", shards)
        load_consolidated(model, ckpt, int(state.get("world_size", 1)))
        source = {"checkpoint": shown or str(ckpt), "step": state.get("step")}
        return {**source, **_score(cfg, model, tokenizer, shards, split, info)}
    finally:
        teardown_distributed(info)


def evaluate_export(
    model_dir: str | os.PathLike,
    split: str = "test",
    *,
    data: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Full-ranking metrics of an export directory (``recgpt export``) on ``split`` (valid or test).

    The export's weights are loaded as serving loads them (:func:`modeling.serving.load_export`); its
    ``config.yaml`` (the training config, with ``overrides`` applied) decides the evaluation settings.
    ``data`` (default: the run's ``data.shards``) must have the export's item vocabulary. Process
    group and return value as :func:`evaluate_checkpoint`, with ``"model"`` instead of ``"checkpoint"``.
    """
    from trainer.distributed import setup_distributed, teardown_distributed

    info = setup_distributed()
    try:
        from modeling.serving import MANIFEST, check_same_items, load_export

        if storage.is_url(model_dir):  # an export in an object store: a verified local copy
            from trainer.remote import local_export

            d = local_export(str(model_dir))
        else:
            d = Path(model_dir)
        model, tokenizer, items, _ = load_export(d)
        cfg = load_config(d / "config.yaml", overrides, saved=True)
        shards = data or cfg.data.shards
        check_same_items(items, shards)
        try:
            step = json.loads((d / MANIFEST).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{d / MANIFEST}: cannot read the step ({one_line(e)})") from None
        source = {"model": str(model_dir), "step": step}
        return {**source, **_score(cfg, model, tokenizer, shards, split, info)}
    finally:
        teardown_distributed(info)
