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

from configs import ConfigError, ExportError, RecGPTConfig, load_config, one_line
from data_shards import storage
from trainer.distributed import all_gather_object


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
        local = concat_outputs([g for g in all_gather_object(local) if g])
    model.train(was_training)
    return compute_metrics(local, cfg)


# --------------------------------------------------------------------------- recgpt evaluate


def _score(
    cfg: RecGPTConfig, model, tokenizer, shards: str | os.PathLike, split: str, info, model_items: list[dict]
) -> dict[str, Any]:
    """Metrics of ``model`` (whose vocabulary is ``model_items``) on ``split`` of ``shards``, this
    rank's share, gathered (see :func:`evaluate`).

    Shards with another item vocabulary (a later period's periodic build scored by an earlier model)
    are translated by item id (:class:`modeling.collate.RemappedCollate`): items new since the model was
    trained cannot be recommended by it; examples whose target is one count as misses and are reported
    (``unknown_targets``, ``unknown_target_fraction``; :func:`modeling.metrics.compute_metrics`).
    """
    from data_shards.manifest import read_items
    from modeling.collate import RemappedCollate, item_remap
    from modeling.data import build_loader

    model.to(info.device)
    data_items = read_items(shards)
    remap = item_remap(model_items, data_items)
    if remap is not None and cfg.task != "next_item":
        raise ExportError(f"{shards}: another item vocabulary ({len(data_items)} items) than the model's "
                          f"({len(model_items)}); task={cfg.task} needs the model's own")  # fmt: skip
    loader = build_loader(cfg, split, tokenizer, model_items, shards=shards,
                          rank=info.rank, world_size=info.world_size)  # fmt: skip
    if remap is not None:
        loader.collate_fn = RemappedCollate(loader.collate_fn, remap)
    metrics = evaluate(model, loader, cfg, info.device)
    head = {
        "data": str(shards) if storage.is_url(shards) else str(Path(shards)),
        "split": split,
        "exclude_seen": cfg.eval.exclude_seen,
    }
    if remap is not None:
        head["vocabulary"] = {"model_items": len(model_items), "data_items": len(data_items),
                              "data_items_unknown_to_model": sum(i < 0 for i in remap)}  # fmt: skip
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
        from data_shards.manifest import read_items
        from modeling.factory import load_model_for_eval
        from trainer.checkpoint import load_consolidated

        # The model is rebuilt on the vocabulary it was trained with: ``data``'s when it is that one,
        # else its run's shards (``data`` is then another build, e.g. a later period, translated by id).
        vocabulary = shards
        try:
            model, tokenizer = load_model_for_eval(cfg, ckpt / "tokenizer", shards)
        except ConfigError:  # the tokenizer was built for another item vocabulary
            vocabulary = cfg.data.shards
            model, tokenizer = load_model_for_eval(cfg, ckpt / "tokenizer", vocabulary)
        load_consolidated(model, ckpt, int(state.get("world_size", 1)))
        source = {"checkpoint": shown or str(ckpt), "step": state.get("step")}
        return {**source, **_score(cfg, model, tokenizer, shards, split, info, read_items(vocabulary))}
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
    ``data`` (default: the run's ``data.shards``) may be another build of the items (a later period):
    see :func:`_score` for how items unknown to the model are counted. Process
    group and return value as :func:`evaluate_checkpoint`, with ``"model"`` instead of ``"checkpoint"``.
    """
    from trainer.distributed import setup_distributed, teardown_distributed

    info = setup_distributed()
    try:
        from modeling.serving import MANIFEST, load_export

        if storage.is_url(model_dir):  # an export in an object store: a verified local copy
            from trainer.remote import local_export

            d = local_export(str(model_dir))
        else:
            d = Path(model_dir)
        model, tokenizer, items, _ = load_export(d)
        cfg = load_config(d / "config.yaml", overrides, saved=True)
        shards = data or cfg.data.shards
        try:
            step = json.loads((d / MANIFEST).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{d / MANIFEST}: cannot read the step ({one_line(e)})") from None
        source = {"model": str(model_dir), "step": step}
        return {**source, **_score(cfg, model, tokenizer, shards, split, info, items)}
    finally:
        teardown_distributed(info)
