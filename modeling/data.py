"""The one loader factory: a :class:`~data_shards.reader.ShardLoader` of a split, as training builds it.

Training, evaluation (during training and ``recgpt evaluate``), the export's parity check, the item
co-occurrence initialisation, the demo and every benchmark get their readers here, so the batch
size, seed, workers, corrupt-shard tolerance, padding and collate of a split are decided in one place.
"""

from __future__ import annotations

import os
from typing import Any

from configs import ConfigError, RecGPTConfig
from data_shards.manifest import read_items
from data_shards.reader import ShardLoader
from modeling.collate import PromptSpec, make_collate


def resolve_max_history(cfg: RecGPTConfig, manifest: dict[str, Any], shards: str | os.PathLike) -> int:
    """``data.max_history`` against the shards' window (``max_history`` of their manifest).

    null means the shards' window; a shorter value cuts records to their most recent items; a longer
    one is refused: the shards hold no more history than their window, so the model would silently get
    less than the config says.
    """
    window = int(manifest.get("max_history") or 0)
    asked = cfg.data.max_history
    if asked is None:
        if not window:
            raise ConfigError(f"data.max_history: {shards} does not say its window; set data.max_history")
        return window
    if window and asked > window:
        raise ConfigError(
            f"data.max_history: {asked} is longer than the windows of {shards} (built with "
            f"shards.max_history={window}); rebuild the shards with max_history >= {asked} or lower it"
        )
    return asked


def check_data_settings(cfg: RecGPTConfig, manifest: dict[str, Any], shards: str | os.PathLike) -> int:
    """What ``recgpt train`` (and ``recgpt tune``, for every candidate) checks of ``cfg`` against the
    shards' ``manifest`` before anything starts: the history window (:func:`resolve_max_history`) and
    the sampled negatives against the catalogue (``modeling.loss.check_num_negatives``). ConfigError
    naming the key; returns the resolved ``data.max_history``."""
    from modeling.loss import check_num_negatives

    max_history = resolve_max_history(cfg, manifest, shards)
    check_num_negatives(cfg, int(manifest["num_items"]), shards)
    return max_history


def build_loader(
    cfg: RecGPTConfig,
    split: str,
    tokenizer: Any = None,
    items: list[dict] | None = None,
    *,
    shards: str | os.PathLike | None = None,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    num_workers: int | None = None,
    seed: int | None = None,
    drop_last: bool | None = None,
) -> ShardLoader:
    """The reader of ``split`` for one rank, yielding :class:`~data_shards.records.Batch` es.

    train: ``train.micro_batch_size`` records per batch, shuffled by ``seed``, the remainder dropped
    so every rank has the same number of batches; valid/test: ``eval.batch_size``, written order, the
    last batches padded with ``pad`` rows, only the first ``eval.max_users`` records when it is set. ``tokenizer`` None yields lists of raw
    :class:`~data_shards.records.Record` instead of batches, covering the whole split: nothing is
    dropped, the last batch is completed with ``pad`` copies (skip them). ``shards`` defaults to ``data.shards``,
    ``items`` to its vocabulary, ``num_workers`` to ``data.num_workers``, ``seed`` to the run's ``seed``;
    ``drop_last`` overrides the rule above (the co-occurrence initialisation keeps its historical sample).
    Raises ConfigError (``data.max_history`` longer than the shards' window) or DataError (shards).
    """
    location = str(shards if shards is not None else cfg.data.shards)
    train = split == "train"
    loader = ShardLoader(
        location,
        split=split,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size or (cfg.train.micro_batch_size if train else cfg.eval.batch_size),
        seed=cfg.seed if seed is None else seed,
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        # Equal batch counts on every rank come from the plan: a rank with fewer batches would hang the
        # others at the next collective (PITFALLS "Data streaming").
        drop_last=(train and tokenizer is not None) if drop_last is None else drop_last,
        corrupt_tolerance=cfg.data.corrupt_shard_tolerance,
        prefetch_factor=cfg.data.prefetch_factor,
        # Eval splits hold one record per user, in written order: the first eval.max_users records are
        # the first users, on every rank's share of the plan alike (equal batch counts kept).
        max_records=None if train else cfg.eval.max_users,
    )
    if tokenizer is not None:
        spec = PromptSpec.from_config(cfg, resolve_max_history(cfg, loader.manifest, location))
        vocabulary = items if items is not None else read_items(location, loader.manifest)
        loader.collate_fn = make_collate(spec, tokenizer, vocabulary, split)
    return loader
