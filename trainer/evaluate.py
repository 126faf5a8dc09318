"""Distributed full-ranking evaluation, during training and as ``recgpt evaluate``.

Every rank scores its share of the split (the reader pads the last batches so all ranks run the same
number of forwards — ZeRO-3 gathers parameters collectively), per-example outputs are gathered to
every rank and reduced by ``modeling.metrics.compute_metrics`` — so every rank holds the same metrics
(early stopping agrees) and 2 ranks give the single-process numbers exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from configs import ConfigError, RecGPTConfig


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


def _model_from_checkpoint(args: argparse.Namespace):
    """(cfg, model, tokenizer, shards, description) for ``--checkpoint RUN_DIR[/CKPT]``."""
    from configs import load_config
    from modeling.factory import load_model_for_eval
    from trainer.checkpoint import CheckpointError, consolidated_state_dict, resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint, best=args.best)
    cfg = load_config(ckpt / "config.yaml", args.overrides, saved=True)
    shards = args.data or cfg.data.shards
    model, tokenizer = load_model_for_eval(cfg, ckpt / "tokenizer", shards)
    missing, unexpected = model.load_state_dict(consolidated_state_dict(ckpt), strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{ckpt}: weights do not fit the model rebuilt from its config ({what})")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return cfg, model, tokenizer, shards, {"checkpoint": str(ckpt), "step": state["step"]}


def _model_from_export(args: argparse.Namespace):
    """(cfg, model, tokenizer, shards, description) for ``--model EXPORT_DIR`` (see modeling.export)."""
    from modeling.export import check_same_items, load_export

    model, tokenizer, items, cfg = load_export(args.model, overrides=args.overrides)
    shards = args.data or cfg.data.shards
    check_same_items(items, shards)
    manifest = json.loads((Path(args.model) / "export_manifest.json").read_text())
    return cfg, model, tokenizer, shards, {"model": str(args.model), "step": manifest["step"]}


def evaluate_main(args: argparse.Namespace) -> int:
    """``recgpt evaluate``: print one JSON line of metrics (rank 0); runs distributed under torchrun."""
    from data_shards.manifest import read_items
    from modeling.data import build_loader
    from trainer.distributed import setup_distributed, teardown_distributed

    if args.config:
        raise ConfigError(
            "--config: evaluate uses the checkpoint's own config; pass key=value overrides only"
        )
    info = setup_distributed()
    try:
        cfg, model, tokenizer, shards, source = (
            _model_from_export if args.model else _model_from_checkpoint
        )(args)
        model.to(info.device)
        loader = build_loader(cfg, args.split, tokenizer, read_items(shards), shards=shards,
                              rank=info.rank, world_size=info.world_size)  # fmt: skip
        metrics = evaluate(model, loader, cfg, info.device)
        if info.is_main:
            line = {
                **source,
                "data": str(Path(shards)),
                "split": args.split,
                "exclude_seen": cfg.eval.exclude_seen,
            }
            print(json.dumps({**line, "ranking": "full", **metrics}), flush=True)
    finally:
        teardown_distributed(info)
    return 0
