"""Writing an export: a trained (unmerged) RecModel -> a plain Hugging Face model directory for serving.

:func:`write_export` gets the model exactly as trained (PEFT-wrapped under LoRA, fp32, eval mode), its
tokenizer, the item vocabulary, the resolved config and a few held-out batches (the checkpoint side —
resolving, consolidating ZeRO shards, rebuilding the model — is ``trainer.export``). It

1. scores the batches with the unmerged model, then PEFT ``merge_and_unload`` (LoRA deltas, trained
   item-token rows of the embeddings and head folded into the base weights);
2. writes the directory into ``.<name>.tmp-<pid>`` beside OUT and checks what was written (no pickle
   files, no wrapper key names, special-token ids that agree with the tokenizer);
3. reloads it exactly as serving and ``evaluate --model`` do (:func:`modeling.serving.load_export`)
   and requires its scores to match step 1's (:data:`PARITY_TOLERANCE`);
4. hashes every file into ``export_manifest.json`` and renames the directory to OUT (an existing OUT
   is replaced only with ``force``, and only once the new one is complete).

Runs on CPU and never initialises DeepSpeed (merging LoRA under an initialised engine breaks,
LLaMA-Factory#2081).

Directory layout (everything but the manifest, config.yaml, items.jsonl and the rating head is what
``save_pretrained`` writes; no pickle files)::

    config.json generation_config.json model*.safetensors [model.safetensors.index.json]
    tokenizer.json tokenizer_config.json    the base tokenizer; item i is token id recgpt_first_item_token_id + i
    items.jsonl                             {"index", "token_id", "item_id", "title", ...} per item
    config.yaml                             resolved training config (prompt format, max_history, task)
    rating_head.safetensors                 task=rating only: weight, bias, levels (recgpt-specific)
    adapter/                                save_adapter: the PEFT adapter alone (before merging)
    warm_start.json source_items.jsonl      train.init_from runs: the source (step, data build, item
                                            counts, item_init) and its item vocabulary (the old one)
    export_manifest.json                    source checkpoint, step, metrics, config, parity, sha256 of files
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from configs import ExportError, RecGPTConfig, publish_dir, save_resolved, to_dict
from modeling.collate import first_item_token_id
from modeling.factory import sync_special_ids
from modeling.model import RecModel
from modeling.serving import (
    ITEMS_FILE,
    MANIFEST,
    RATING_HEAD_FILE,
    file_hashes,
    load_export,
    score_batch,
)

log = logging.getLogger("recgpt.export")

FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max |exported - unmerged| item logit on the parity batches. fp32 only differs by the rounding of the
# merge; 16-bit weights round every weight (bf16: 8 mantissa bits, fp16: 11), so their bound is
# relative to the largest reference logit: tolerance * max(1, max |logit|).
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
# Substrings of state-dict keys that only PEFT/DeepSpeed wrappers produce; serving stacks reject them.
WRAPPER_KEY_PARTS = ("base_model.model", "lora_", "modules_to_save", "trainable_tokens", "token_adapter")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class ExportSource:
    """Where the weights came from, recorded in the manifest."""

    checkpoint: str
    """The checkpoint directory (``source_checkpoint``)."""
    step: int | None
    trainer_state: dict[str, Any]
    """Its ``trainer_state.json``."""
    metrics: dict[str, Any] | None
    """Its ``metrics.json`` (None when it has none)."""
    world_size: int
    """Processes that wrote it."""
    run_dir: str | None = None
    """The run directory holding it, if any."""
    extra_files: dict[str, bytes] | None = None
    """Files the checkpoint carries into the export (a warm-started run's ``warm_start.json`` and
    ``source_items.jsonl``: where it came from and the source's item vocabulary)."""
    warm_start: dict[str, Any] | None = None
    """The parsed ``warm_start.json`` (recorded in the manifest as ``warm_start``), or None."""


def check_out(out: str | os.PathLike, force: bool) -> Path:
    """``out`` as an absolute path; an existing one is refused unless ``force``."""
    path = Path(out).absolute()
    if path.exists() and not force:
        raise ExportError(f"{path}: already exists (--force replaces it)")
    return path


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise ExportError(f"export.dtype: got {name!r}, allowed: {', '.join(DTYPES)}")
    return name


# --------------------------------------------------------------------------- writing


def _weight_keys(directory: Path) -> list[str]:
    keys: list[str] = []
    for f in sorted(directory.glob("*.safetensors")):
        if f.name == RATING_HEAD_FILE:
            continue
        with safe_open(str(f), framework="pt") as st:
            keys += list(st.keys())
    return keys


def _check_written(directory: Path) -> None:
    """What serving stacks trip over: pickles, wrapper key names, disagreeing special-token ids."""
    pickles = [p.name for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ExportError(f"{directory}: pickle files written ({', '.join(pickles)})")
    keys = _weight_keys(directory)
    bad = [k for k in keys if any(part in k for part in WRAPPER_KEY_PARTS)]
    if not keys or bad:
        raise ExportError(f"{directory}: weights with wrapper key names {bad[:3]} (or none at all)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    want = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    for name in ("config.json", "generation_config.json"):
        got = json.loads((directory / name).read_text())
        diff = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
        if diff:
            raise ExportError(
                f"{directory / name}: special token ids {diff} differ from the tokenizer's {want}"
            )


def _write_items(path: Path, items: list[dict], tokenizer) -> None:
    first = first_item_token_id(tokenizer)
    with open(path, "w") as f:
        for it in items:
            row = {"index": it["index"], "token_id": first + it["index"]}
            row.update({k: v for k, v in it.items() if k != "index"})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _save_rating_head(model: RecModel, path: Path, dtype: torch.dtype) -> dict[str, Any] | None:
    if model.rating_head is None:
        return None
    tensors = {
        "weight": model.rating_head.weight.detach().to(dtype).contiguous(),
        "bias": model.rating_head.bias.detach().to(dtype).contiguous(),
        "levels": model.rating_values.detach().float().contiguous(),
    }
    kind = "regression" if model.regression else "classes"
    save_file(tensors, str(path), metadata={"kind": kind})
    return {"file": path.name, "kind": kind, "levels": model.rating_values.tolist(),
            "usage": "scores = last_hidden_state @ weight.T + bias at the position after the item (classes: one "
                     "logit per level; regression: the rating)"}  # fmt: skip


def _merged_lm(model: RecModel):
    """The plain HF causal LM with LoRA and trained token rows folded in (PEFT merge, on CPU)."""
    lm = model.lm
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()
    return lm


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished directory to ``out``; an existing one (``force``) is moved aside first and only
    deleted once the new one is in place, so ``out`` is never half-written."""
    umask = os.umask(0)
    os.umask(umask)
    # safetensors writes 0600 files; serving accounts on shared storage must be able to read them.
    for p in tmp.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)
    if out.exists():
        check_out(out, force)  # appeared while we were writing
    publish_dir(tmp, out)


def check_parity(
    directory: Path, batches: list[dict], reference: list[torch.Tensor], task: str, dtype_name: str
) -> dict[str, Any]:
    """Reload ``directory`` as serving does and compare its scores with the unmerged model's."""
    model = load_export(directory, verify=False).model
    diff = 0.0
    scale = 1.0
    for batch, ref in zip(batches, reference):
        got = score_batch(model, batch, task)
        diff = max(diff, float((got - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    tolerance = PARITY_TOLERANCE[dtype_name] * (1.0 if dtype_name == "fp32" else scale)
    examples = sum(int(r.shape[0]) for r in reference)
    if diff > tolerance:
        raise ExportError(f"{directory}: parity check failed: exported {dtype_name} scores differ from the "
                          f"unmerged model's by {diff:.3e} > {tolerance:.3e} on {examples} held-out "
                          "examples")  # fmt: skip
    return {"batches": len(batches), "examples": examples, "max_abs_diff": diff, "tolerance": tolerance,
            "split": "valid", "compared": "rating outputs" if task == "rating" else "item logits"}  # fmt: skip


def write_export(
    out: str | os.PathLike,
    model: RecModel,
    tokenizer,
    items: list[dict],
    cfg: RecGPTConfig,
    batches: list[dict[str, torch.Tensor]],
    source: ExportSource,
    *,
    dtype: str | None = None,
    save_adapter: bool = False,
    force: bool = False,
    max_shard_size: str | None = None,
) -> dict[str, Any]:
    """Write the export of ``model`` to ``out`` atomically; returns the manifest.

    ``model``: the trained RecModel, unmerged (PEFT-wrapped under LoRA), fp32, eval mode, on CPU — it
    is merged in place. ``batches``: held-out batches for the parity check (scored before the merge).
    ``dtype`` (fp32/bf16/fp16) defaults to ``export.dtype``, ``max_shard_size`` to
    ``export.max_shard_size``; ``save_adapter`` also writes the PEFT adapter, before merging, to
    ``adapter/``; ``force`` replaces an existing ``out``. Raises :class:`ExportError` (one line) on
    bad input and when a check fails; ``out`` is then left untouched.
    """
    t0 = time.time()
    out = check_out(out, force)
    dtype_name = check_dtype(dtype or cfg.export.dtype)
    if save_adapter and not cfg.lora.enabled:
        raise ExportError(f"{source.checkpoint}: no adapter to save (lora.enabled was false in this run)")
    reference = [score_batch(model, b, cfg.task) for b in batches]

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if save_adapter:
            model.lm.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
        lm = _merged_lm(model)
        lm.config.use_cache = True  # training switched it off; generation wants it
        sync_special_ids(lm, tokenizer)
        lm.to(DTYPES[dtype_name])
        lm.save_pretrained(str(tmp), max_shard_size=max_shard_size or cfg.export.max_shard_size)
        if not (tmp / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(lm.config).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _write_items(tmp / ITEMS_FILE, items, tokenizer)
        for name, data in (source.extra_files or {}).items():
            (tmp / name).write_bytes(data)
        save_resolved(cfg, tmp)
        rating_head = _save_rating_head(model, tmp / RATING_HEAD_FILE, DTYPES[dtype_name])
        _check_written(tmp)
        parity = check_parity(tmp, batches, reference, cfg.task, dtype_name)
        manifest = {
            "format": "recgpt-export",
            "format_version": FORMAT_VERSION,
            "source_checkpoint": source.checkpoint,
            "run_dir": source.run_dir,
            "step": source.step,
            "trainer_state": source.trainer_state,
            "metrics": source.metrics,
            "config": to_dict(cfg),
            "dtype": dtype_name,
            "zero_stage": cfg.zero.stage,
            "world_size": source.world_size,
            "lora": {
                "enabled": cfg.lora.enabled,
                "merged": cfg.lora.enabled,
                "adapter_dir": ADAPTER_DIR if save_adapter else None,
            },  # fmt: skip
            "task": cfg.task,
            "prompt": cfg.model.prompt,
            "num_items": len(items),
            "item_token_ids": [int(model.item_token_ids[0]), int(model.item_token_ids[-1])],
            "items_file": ITEMS_FILE,
            "rating_head": rating_head,
            "special_token_ids": {
                "bos": tokenizer.bos_token_id,
                "eos": tokenizer.eos_token_id,
                "pad": tokenizer.pad_token_id,
            },  # fmt: skip
            "parity": parity,
            "warm_start": source.warm_start,
            "files": file_hashes(tmp),
            "created_unix": int(time.time()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("export written to %s in %.1f s (parity max abs diff %.2e)", out, time.time() - t0,
             parity["max_abs_diff"])  # fmt: skip
    return manifest
