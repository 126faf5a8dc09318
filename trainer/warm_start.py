"""``train.init_from``: read the model a run starts from, and what the run records about it.

A source is an export directory (``recgpt export``: merged weights, ``items.jsonl``) or a checkpoint
(a run directory — its latest complete checkpoint — or one checkpoint directory: verified, its ZeRO
shards consolidated, LoRA merged; its item vocabulary is read from the run's ``data.shards``, which
must still be readable), local or in an object store (``s3://…``: a verified local copy is read).
:func:`load_source` returns a :class:`modeling.warm_start.WarmStart`; the
factory copies its weights, item rows by item id.

It must be the same model as this run's: task, preset or ``model.name_or_path``, block layout, shape,
prompt format and tokenizer size are compared with the source's config, one :class:`ConfigError`
line naming the key. LoRA may differ (the source's adapters are merged; this run may add its own).

The run records its source in :data:`RECORD` (``warm_start.json``: the source, its step and data
build, the item counts, ``model.item_init``) and the source's vocabulary in :data:`SOURCE_ITEMS`
(``source_items.jsonl``); both go into every checkpoint and from there into the export, whose
``items.jsonl`` is the new vocabulary.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from configs import CheckpointError, ConfigError, DataError, ExportError, RecGPTConfig, load_config, one_line
from configs.files import sha256_bytes
from data_shards import storage
from modeling.warm_start import WarmStart

log = logging.getLogger("recgpt.warm_start")

RECORD = "warm_start.json"
SOURCE_ITEMS = "source_items.jsonl"
# Settings the source must share with this run: key -> (getter, why); shapes and prompts (LoRA may differ).
SAME_MODEL = (
    "task",
    "model.preset",
    "model.name_or_path",
    "model.architecture",
    "model.n_layer",
    "model.n_embd",
    "model.n_head",
    "model.ffn_multiplier",
    "model.prompt",
    "model.tokenizer_vocab_size",
    "model.rating_head",
)


def check_same_model(source: RecGPTConfig, cfg: RecGPTConfig, where: str) -> None:
    """:class:`ConfigError` naming the first :data:`SAME_MODEL` key that differs from the source's."""
    from trainer.resume import FIXED

    for key in SAME_MODEL:
        get, why = FIXED[key]
        old, new = get(source), get(cfg)
        if old != new:
            raise ConfigError(
                f"train.init_from: {key} is {new!r} here, {old!r} in {where}; warm starting needs the same "
                f"model ({why})"
            )


def _data_info(shards: str) -> dict[str, Any]:
    """Location and fingerprint (plus its base's, for a periodic build) of a shard location, if readable."""
    from data_shards.manifest import load_manifest

    try:
        m = load_manifest(shards)
    except DataError:
        return {"location": shards, "fingerprint": None}
    return {"location": shards, "fingerprint": m["fingerprint"],
            "base_fingerprint": (m.get("base") or {}).get("fingerprint")}  # fmt: skip


def _from_export(d: Path) -> WarmStart:
    from modeling.serving import MANIFEST, load_export

    try:
        model, tokenizer, items, _ = load_export(d, verify=True)
        manifest = json.loads((d / MANIFEST).read_text())
    except (ExportError, OSError, ValueError) as e:
        raise ConfigError(f"train.init_from: {one_line(e)}") from None
    cfg = load_config(d / "config.yaml", saved=True)
    head = None
    if model.rating_head is not None:
        head = {k: v.detach().float().clone() for k, v in model.rating_head.state_dict().items()}
    state = {k: v.detach().float().clone() for k, v in model.lm.state_dict().items()}
    info = {"source": str(d), "kind": "export", "step": manifest.get("step"),
            "source_checkpoint": manifest.get("source_checkpoint"), "data": _data_info(str(cfg.data.shards))}  # fmt: skip
    return WarmStart(str(d), "export", cfg, state, d, items, int(model.item_token_ids[0]), head, info)


def _from_checkpoint(path: Path) -> WarmStart:
    from modeling.factory import load_model_for_eval, read_vocabulary
    from trainer.checkpoint import (
        load_consolidated,
        read_checkpoint_config,
        read_trainer_state,
        resolve_checkpoint,
    )

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation reads files; no device is needed
    try:
        ckpt = resolve_checkpoint(path, verify=True)
        cfg = read_checkpoint_config(ckpt)
        state = read_trainer_state(ckpt)
        _, items = read_vocabulary(cfg.data.shards)
        model, tokenizer = load_model_for_eval(cfg, ckpt / "tokenizer", cfg.data.shards)
        load_consolidated(model, ckpt, int(state.get("world_size", 1)))
    except (CheckpointError, DataError) as e:
        raise ConfigError(f"train.init_from: {one_line(e)}") from None
    lm = model.lm.merge_and_unload() if hasattr(model.lm, "merge_and_unload") else model.lm
    head = None
    if model.rating_head is not None:
        head = {k: v.detach().float().clone() for k, v in model.rating_head.state_dict().items()}
    weights = {k: v.detach().float().clone() for k, v in lm.state_dict().items()}
    info = {"source": str(path), "kind": "checkpoint", "checkpoint": str(ckpt), "step": state.get("step"),
            "data": _data_info(str(cfg.data.shards))}  # fmt: skip
    first = int(model.item_token_ids[0])
    return WarmStart(str(path), "checkpoint", cfg, weights, ckpt / "tokenizer", items, first, head, info)


def load_source(cfg: RecGPTConfig) -> WarmStart:
    """The model ``train.init_from`` names, checked against ``cfg`` (one ConfigError line otherwise)."""
    given = str(cfg.train.init_from)
    path = Path(given)
    if storage.is_url(given):  # an export or a run/checkpoint in an object store: a verified local copy
        from trainer.remote import local_copy, local_export

        try:
            if storage.exists(storage.join(given.rstrip("/"), "export_manifest.json")):
                path = local_export(given)
            else:
                path = local_copy(given)[0]
        except (CheckpointError, DataError, ExportError) as e:
            raise ConfigError(f"train.init_from: {one_line(e)}") from None
    if not path.exists():
        raise ConfigError(f"train.init_from: {path}: no such export, run or checkpoint directory")
    with torch.random.fork_rng(devices=[]):  # reading a source must not move this run's RNG streams
        warm = _from_export(path) if (path / "export_manifest.json").is_file() else _from_checkpoint(path)
    warm.source = warm.info["source"] = given
    check_same_model(warm.config, cfg, f"{warm.kind} {path}")
    log.info(
        "train.init_from: %s %s (step %s, %d items)", warm.kind, path, warm.info.get("step"), len(warm.items)
    )
    return warm


def record_files(
    warm: WarmStart, cfg: RecGPTConfig, items: list[dict], manifest: dict[str, Any]
) -> dict[str, bytes]:
    """:data:`RECORD` and :data:`SOURCE_ITEMS` of a warm-started run (call after the model is built:
    the item counts are the factory's)."""
    source_items = b"".join(
        json.dumps({"index": i, "item_id": str(it["item_id"]), "title": it.get("title", "")},
                   ensure_ascii=False).encode() + b"\n"
        for i, it in enumerate(warm.items)
    )  # fmt: skip
    record = {
        **warm.info,
        "source_items": {"file": SOURCE_ITEMS, "count": len(warm.items), "sha256": sha256_bytes(source_items)},
        "new_items": {"file": "items.jsonl (the export's own)", "count": len(items),
                      "data": cfg.data.shards, "fingerprint": manifest.get("fingerprint"),
                      "base_fingerprint": (manifest.get("base") or {}).get("fingerprint")},
        "lora": cfg.lora.enabled,
        "fresh": "optimizer, schedule and step start anew",
    }  # fmt: skip
    return {
        RECORD: (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(),
        SOURCE_ITEMS: source_items,
    }


def read_record_files(directory: str | os.PathLike) -> dict[str, bytes]:
    """The warm-start files of a checkpoint or run directory ({} for a run that started from scratch)."""
    d = Path(directory)
    return {name: (d / name).read_bytes() for name in (RECORD, SOURCE_ITEMS) if (d / name).is_file()}
