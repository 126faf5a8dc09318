"""``recgpt export``: a training checkpoint -> a plain Hugging Face model directory for serving.

Runs in its own process on CPU and never initialises DeepSpeed (merging LoRA under an initialised
engine breaks, LLaMA-Factory#2081). Steps:

1. resolve the checkpoint (run directory -> ``latest``/``best``; ``COMPLETE`` required);
2. consolidate the ZeRO shards of any stage and world size into one fp32 state dict (DeepSpeed's
   ``zero_to_fp32`` through :func:`trainer.checkpoint.consolidated_state_dict`);
3. rebuild the *unmerged* model (base + adapters) from the checkpoint's config.yaml and tokenizer with
   modeling's factory and load the weights strictly (another model's checkpoint -> clear error; an
   empty adapter tensor, the ZeRO-3 pitfall, is refused before that);
4. score ``export.parity_batches`` held-out (valid) batches with it, then PEFT ``merge_and_unload``
   (LoRA deltas, trained item-token rows of the embeddings and head folded into the base weights);
5. write the directory into ``.<name>.tmp-<pid>`` beside DIR, reload it exactly as serving and
   ``evaluate --model`` do (:func:`load_export`) and require its logits to match step 4's
   (:data:`PARITY_TOLERANCE`), hash every file into ``export_manifest.json`` and rename it to DIR.

Directory layout (everything but the manifest, config.yaml, items.jsonl and the rating head is what
``save_pretrained`` writes; no pickle files)::

    config.json generation_config.json model*.safetensors [model.safetensors.index.json]
    tokenizer.json tokenizer_config.json    tokenizer with the <item_i> tokens
    items.jsonl                             {"index", "token", "token_id", "item_id", "title", ...} per item
    config.yaml                             resolved training config (prompt format, max_history, task)
    rating_head.safetensors                 task=rating only: weight, bias, levels (recgpt-specific)
    adapter/                                --adapter-only: the PEFT adapter alone (before merging)
    export_manifest.json                    source checkpoint, step, metrics, config, parity, sha256 of files
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from configs import ExportError, RecGPTConfig, load_config, save_resolved, to_dict
from modeling.collate import RATING_LEVELS_KEY
from modeling.factory import _is_tied, _sync_special_ids, item_token, load_model_for_eval, read_vocabulary
from modeling.model import RecModel

log = logging.getLogger("recgpt.export")

FORMAT_VERSION = 1
MANIFEST = "export_manifest.json"
ITEMS_FILE = "items.jsonl"
RATING_HEAD_FILE = "rating_head.safetensors"
ADAPTER_DIR = "adapter"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max |exported - unmerged| item logit on the parity batches. fp32 only differs by the rounding of the
# merge; 16-bit weights round every weight (bf16: 8 mantissa bits, fp16: 11), so their bound is
# relative to the largest reference logit: tolerance * max(1, max |logit|).
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
# Substrings of state-dict keys that only PEFT/DeepSpeed wrappers produce; serving stacks reject them.
WRAPPER_KEY_PARTS = ("base_model.model", "lora_", "modules_to_save", "trainable_tokens", "token_adapter")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# --------------------------------------------------------------------------- checkpoint -> unmerged model


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _consolidate(ckpt: Path, world_size: int) -> dict[str, torch.Tensor]:
    """fp32 state dict of every rank's ZeRO shards; missing/damaged rank files become one clear line."""
    from trainer.checkpoint import DS_SUBDIR, consolidated_state_dict

    ds = ckpt / DS_SUBDIR
    if not (ds / "latest").is_file():
        raise ExportError(f"{ds}: no DeepSpeed checkpoint (ds/latest missing)")
    tag_dir = ds / (ds / "latest").read_text().strip()
    # A rank whose files are missing would otherwise surface as a shape error deep inside zero_to_fp32.
    for pattern in ("*_optim_states.pt", "zero_pp_rank_*_model_states.pt"):
        found = len(list(tag_dir.glob(pattern)))
        if found and found != world_size:
            raise ExportError(f"{tag_dir}: {found} files {pattern} but the run had {world_size} ranks")
    try:
        # zero_to_fp32 prints progress bars and per-group lines: keep the CLI output to our own lines.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return consolidated_state_dict(ckpt)
    except Exception as e:  # torch.load/unpickling/zero_to_fp32 raise many types for a damaged checkpoint
        raise ExportError(
            f"{tag_dir}: cannot consolidate the DeepSpeed checkpoint ({_one_line(e)})"
        ) from None


def _check_nonempty(state: dict[str, torch.Tensor], ckpt: Path) -> None:
    # ZeRO-3 + LoRA can save adapters as torch.Size([0]) (peft#297): merging them would silently drop
    # the training. Refuse any empty tensor, naming it.
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise ExportError(f"{ckpt}: empty tensors in the checkpoint ({', '.join(empty[:3])}); "
                          "ZeRO-3 partitions were saved without gathering")  # fmt: skip


def _load_strict(model: RecModel, state: dict[str, torch.Tensor], ckpt: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches
        raise ExportError(
            f"{ckpt}: weights do not fit the model rebuilt from its config.yaml ({_one_line(e)})"
        ) from None
    if missing or unexpected:
        what = [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {unexpected[:3]}"] * bool(
            unexpected
        )
        raise ExportError(
            f"{ckpt}: weights do not fit the model rebuilt from its config.yaml ({'; '.join(what)})"
        )


def read_checkpoint_config(ckpt: Path) -> RecGPTConfig:
    path = ckpt / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{ckpt}: no config.yaml in the checkpoint")
    return load_config(path, saved=True)


def rebuild_unmerged(ckpt: Path, cfg: RecGPTConfig, world_size: int) -> tuple[RecModel, Any, list[dict]]:
    """(model, tokenizer, items): the trained model exactly as in training (PEFT-wrapped under LoRA),
    fp32, eval mode, on CPU, from the checkpoint's ZeRO shards."""
    _, items = read_vocabulary(cfg.data.shards)
    model, tokenizer = load_model_for_eval(cfg, ckpt / "tokenizer", cfg.data.shards)
    state = _consolidate(ckpt, world_size)
    _check_nonempty(state, ckpt)
    _load_strict(model, state, ckpt)
    return model.float().eval(), tokenizer, items


# --------------------------------------------------------------------------- scoring (parity, recommend)


@torch.no_grad()
def score_batch(model: RecModel, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Scores at each row's labelled position: item logits [B, num_items] (next_item) or rating
    outputs (rating) — the same quantities the metrics rank."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h = hidden[batch["labels"] != -100]
    return (model.rating_output(h) if task == "rating" else model.item_logits(h)).float()


def parity_batches(cfg: RecGPTConfig, tokenizer, items: list[dict]) -> list[dict[str, torch.Tensor]]:
    """The first ``export.parity_batches`` batches of the valid split (held out from training)."""
    from modeling.data import build_loader

    if cfg.export.parity_batches == 0:
        return []
    loader = build_loader(cfg, "valid", tokenizer, items, num_workers=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == cfg.export.parity_batches:
            break
    return batches


# --------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` except the manifest, by relative path."""
    return {
        p.relative_to(directory).as_posix(): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _weight_keys(directory: Path) -> list[str]:
    keys: list[str] = []
    for f in sorted(directory.glob("*.safetensors")):
        if f.name == RATING_HEAD_FILE:
            continue
        with safe_open(str(f), framework="pt") as st:
            keys += list(st.keys())
    return keys


def _check_written(directory: Path, tokenizer_dir: Path) -> None:
    """What serving stacks trip over: pickles, wrapper key names, disagreeing special-token ids."""
    pickles = [p.name for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ExportError(f"{directory}: pickle files written ({', '.join(pickles)})")
    keys = _weight_keys(directory)
    bad = [k for k in keys if any(part in k for part in WRAPPER_KEY_PARTS)]
    if not keys or bad:
        raise ExportError(f"{directory}: weights with wrapper key names {bad[:3]} (or none at all)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
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
    with open(path, "w") as f:
        for it in items:
            token = item_token(it["index"])
            row = {"index": it["index"], "token": token, "token_id": tokenizer.convert_tokens_to_ids(token)}
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


def _dtype_name(dtype: str | None, cfg: RecGPTConfig) -> str:
    name = dtype or cfg.export.dtype
    if name not in DTYPES:
        raise ExportError(f"--dtype: got {name!r}, allowed: {', '.join(DTYPES)}")
    return name


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    best: bool = False,
    dtype: str | None = None,
    adapter: bool = False,
    force: bool = False,
    max_shard_size: str | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint`` (a run directory or one checkpoint) to ``out``; returns the manifest.

    ``dtype`` defaults to the run's ``export.dtype``, ``max_shard_size`` to its ``export.max_shard_size``.
    Raises :class:`ExportError` (one line) on bad input and when the parity check fails; ``out`` is then
    left untouched.
    """
    from trainer.checkpoint import CheckpointError, resolve_checkpoint

    t0 = time.time()
    out = Path(out).absolute()
    if out.exists() and not force:
        raise ExportError(f"--out: {out} exists (use --force to replace it)")
    try:
        ckpt = resolve_checkpoint(checkpoint, best=best).absolute()
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    cfg = read_checkpoint_config(ckpt)
    dtype_name = _dtype_name(dtype, cfg)
    world_size = int(state.get("world_size", 1))
    log.info("export %s (step %s, %d ranks, zero stage %d) -> %s", ckpt, state.get("step"), world_size,
             cfg.zero.stage, out)  # fmt: skip

    model, tokenizer, items = rebuild_unmerged(ckpt, cfg, world_size)
    batches = parity_batches(cfg, tokenizer, items)
    reference = [score_batch(model, b, cfg.task) for b in batches]

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if adapter:
            if not hasattr(model.lm, "peft_config"):
                raise ExportError("--adapter-only: this run has no adapter (lora.enabled was false)")
            model.lm.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
        lm = _merged_lm(model)
        lm.config.use_cache = True  # training switched it off; generation wants it
        _sync_special_ids(lm, tokenizer)
        lm.to(DTYPES[dtype_name])
        lm.save_pretrained(str(tmp), max_shard_size=max_shard_size or cfg.export.max_shard_size)
        if not (tmp / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(lm.config).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _write_items(tmp / ITEMS_FILE, items, tokenizer)
        save_resolved(cfg, tmp)
        rating_head = _save_rating_head(model, tmp / RATING_HEAD_FILE, DTYPES[dtype_name])
        _check_written(tmp, tmp)
        parity = check_parity(tmp, batches, reference, cfg.task, dtype_name)
        manifest = {
            "format": "recgpt-export",
            "format_version": FORMAT_VERSION,
            "source_checkpoint": str(ckpt),
            "run_dir": str(ckpt.parent.parent) if ckpt.parent.name == "checkpoints" else None,
            "step": state.get("step"),
            "trainer_state": state,
            "metrics": _read_json(ckpt / "metrics.json"),
            "config": to_dict(cfg),
            "dtype": dtype_name,
            "zero_stage": cfg.zero.stage,
            "world_size": world_size,
            "lora": {
                "enabled": cfg.lora.enabled,
                "merged": cfg.lora.enabled,
                "adapter_dir": ADAPTER_DIR if adapter else None,
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
            "files": file_hashes(tmp),
            "created_unix": int(time.time()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("export written to %s in %.1f s (parity max abs diff %.2e)", out, time.time() - t0,
             parity["max_abs_diff"])  # fmt: skip
    return manifest


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory to ``out``; an existing one (--force) is moved aside first and only
    deleted once the new one is in place, so ``out`` is never half-written."""
    umask = os.umask(0)
    os.umask(umask)
    # safetensors writes 0600 files; serving accounts on shared storage must be able to read them.
    for p in tmp.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def check_parity(
    directory: Path, batches: list[dict], reference: list[torch.Tensor], task: str, dtype_name: str
) -> dict[str, Any]:
    """Reload ``directory`` as serving would and compare its scores with the unmerged model's."""
    model, *_ = load_export(directory, verify=False)
    diff = 0.0
    scale = 1.0
    for batch, ref in zip(batches, reference):
        got = score_batch(model, batch, task)
        diff = max(diff, float((got - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    tolerance = PARITY_TOLERANCE[dtype_name] * (1.0 if dtype_name == "fp32" else scale)
    examples = sum(int(r.shape[0]) for r in reference)
    if diff > tolerance:
        raise ExportError(f"parity check failed: exported {dtype_name} scores differ from the unmerged model's by "
                          f"{diff:.3e} > {tolerance:.3e} on {examples} held-out examples")  # fmt: skip
    return {"batches": len(batches), "examples": examples, "max_abs_diff": diff, "tolerance": tolerance,
            "split": "valid", "compared": "rating outputs" if task == "rating" else "item logits"}  # fmt: skip


# --------------------------------------------------------------------------- reading an export


def read_export_items(directory: str | os.PathLike) -> list[dict]:
    path = Path(directory) / ITEMS_FILE
    try:
        items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read the item vocabulary ({_one_line(e)})") from None
    if any(it.get("index") != i for i, it in enumerate(items)):
        raise ExportError(f"{path}: items must have index 0..{len(items) - 1} in order")
    return items


def verify_export(directory: str | os.PathLike) -> None:
    """Re-hash every file against the manifest (a damaged or edited export is refused)."""
    d = Path(directory)
    manifest = json.loads((d / MANIFEST).read_text())
    actual = file_hashes(d)
    bad = sorted(set(actual.items()) ^ set(manifest["files"].items()))
    if bad:
        raise ExportError(f"{d}: files differ from {MANIFEST} ({bad[0][0]})")


def check_same_items(items: list[dict], shards: str | os.PathLike) -> None:
    """Refuse to score an export on shards built with another item vocabulary (indices would differ)."""
    _, shard_items = read_vocabulary(shards)
    ours, theirs = [str(it["item_id"]) for it in items], [str(it["item_id"]) for it in shard_items]
    if ours != theirs:
        raise ExportError(f"--data: {shards} has another item vocabulary ({len(theirs)} items) than the export "
                          f"({len(ours)} items)")  # fmt: skip


def load_export(
    directory: str | os.PathLike, verify: bool = False, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[RecModel, Any, list[dict], RecGPTConfig]:
    """(RecModel, tokenizer, items, resolved training config) of an export directory, fp32, eval mode.

    Only the directory is read (transformers' Auto classes + safetensors): what ``recommend`` and
    ``evaluate --model`` score with. ``verify`` re-hashes every file against the manifest first;
    ``overrides`` (``key=value``) apply to the saved config (e.g. eval.exclude_seen=false).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(directory)
    missing = [f for f in ("config.yaml", ITEMS_FILE, "config.json") if not (d / f).is_file()]
    if missing:
        raise ExportError(f"{d}: not a recgpt export directory (no {missing[0]})")
    if verify:
        verify_export(d)
    cfg = load_config(d / "config.yaml", overrides, saved=True)
    items = read_export_items(d)
    tokenizer = AutoTokenizer.from_pretrained(d)
    lm = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code
    )
    lm.config.use_cache = False
    ids = tokenizer.convert_tokens_to_ids([item_token(i) for i in range(len(items))])
    if not ids or ids != list(range(ids[0], ids[0] + len(items))):
        raise ExportError(f"{d}: the tokenizer lacks contiguous <item_i> tokens for the {len(items)} items")
    levels = tokenizer.init_kwargs.get(RATING_LEVELS_KEY) or []
    model = RecModel(lm, torch.tensor(ids), tied=_is_tied(lm),
                     rating_levels=[float(x) for x in levels] if cfg.task == "rating" else None,
                     rating_head=cfg.model.rating_head)  # fmt: skip
    if model.rating_head is not None:
        head = load_file(str(d / RATING_HEAD_FILE))
        model.rating_head.load_state_dict({"weight": head["weight"].float(), "bias": head["bias"].float()})
    return model.eval(), tokenizer, items, cfg


# --------------------------------------------------------------------------- CLI


def quiet_transformers() -> None:
    """CLI output is ours: no per-file progress bars from transformers' loading and saving."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def export_main(args: argparse.Namespace) -> int:
    """``recgpt export``: prints one JSON line (output directory, step, parity) on success."""
    from configs import DataError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_transformers()
    try:
        manifest = export_checkpoint(args.checkpoint, args.out, best=args.best, dtype=args.dtype,
                                     adapter=args.adapter_only, force=args.force)  # fmt: skip
    except DataError as e:  # the run's shard directory (item vocabulary, parity batches)
        raise ExportError(f"data.shards: {e}") from None
    summary = {k: manifest[k] for k in ("source_checkpoint", "step", "dtype", "parity")}
    print(json.dumps({"out": str(Path(args.out).absolute()), **summary}))
    return 0
