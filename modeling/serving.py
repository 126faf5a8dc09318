"""Scoring with an export directory only: loading it, checking it, and ``recommend``.

What ``recgpt recommend`` and ``recgpt evaluate --model`` score with, and what the export's parity
check reloads. Only the directory is read (transformers' Auto classes, safetensors, its
``items.jsonl`` and ``config.yaml``); no checkpoint, shard directory or DeepSpeed is involved, and the
training schema (``configs.schema`` / ``configs.load``) is never imported: the saved ``config.yaml``
is read as plain YAML into an :class:`ExportSpec` of the few settings scoring needs.

A history (original item ids or exact titles) is mapped to item indices through ``items.jsonl``,
turned into a prompt by the same collate as training and evaluation (:class:`PromptSpec`) and scored
over every item at the position where training predicts the next item.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from configs.errors import ExportError, one_line
from configs.files import sha256_file
from modeling.collate import RATING_LEVELS_KEY, PromptSpec, first_item_token_id, make_collate
from modeling.ligr import register_auto_classes
from modeling.model import RecModel, is_tied

MANIFEST = "export_manifest.json"
ITEMS_FILE = "items.jsonl"
RATING_HEAD_FILE = "rating_head.safetensors"
CONFIG_FILE = "config.yaml"  # = configs.load.RESOLVED_CONFIG (not imported: it would load the schema)


# --------------------------------------------------------------------------- the export's settings

# ExportSpec field -> its key path in the saved config.
_SPEC_KEYS = {
    "task": ("task",),
    "prompt": ("model", "prompt"),
    "objective": ("train", "objective"),
    "max_history": ("data", "max_history"),
    "rating_head": ("model", "rating_head"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "exclude_seen": ("eval", "exclude_seen"),
}


@dataclass(frozen=True)
class ExportSpec:
    """What scoring needs of an export's saved training config (``config.yaml``).

    Every resolved config recgpt has written holds these keys under these names (``configs.load``'s
    ``upgrade_saved`` renames none of them); a missing one is an :class:`ExportError` naming it.
    """

    directory: Path
    task: str
    """next_item or rating (``task``)."""
    prompt: str
    """ids or text (``model.prompt``)."""
    objective: str
    """``train.objective`` (only the train split's labels depend on it)."""
    max_history: int | None
    """``data.max_history``; None: the training shards' window (recommend then keeps the whole history)."""
    rating_head: str
    """classes or regression (``model.rating_head``; task=rating only)."""
    trust_remote_code: bool
    """``model.trust_remote_code`` for the Auto classes."""
    exclude_seen: bool
    """``eval.exclude_seen`` of the run."""

    @classmethod
    def read(cls, directory: str | os.PathLike) -> ExportSpec:
        """The settings in ``directory/config.yaml``; :class:`ExportError` names the file and key."""
        path = Path(directory) / CONFIG_FILE
        try:
            tree = OmegaConf.to_container(OmegaConf.load(path))
        except Exception as e:  # OSError, YAML errors (with line numbers)
            raise ExportError(f"{path}: cannot read the export's config ({one_line(e)})") from None
        values: dict[str, Any] = {}
        for name, keys in _SPEC_KEYS.items():
            node: Any = tree
            for key in keys:
                if not isinstance(node, dict) or key not in node:
                    raise ExportError(f"{path}: no {'.'.join(keys)} in the export's config")
                node = node[key]
            values[name] = node
        return cls(directory=Path(directory), **values)

    def prompt_spec(self, history_length: int) -> PromptSpec:
        """The collate settings; ``history_length`` stands in for an unset ``data.max_history``."""
        return PromptSpec(self.task, self.prompt, self.objective, self.max_history or history_length)


class LoadedExport(NamedTuple):
    """What :func:`load_export` returns (unpacks as ``model, tokenizer, items, spec``)."""

    model: RecModel
    tokenizer: Any
    items: list[dict]
    spec: ExportSpec


# --------------------------------------------------------------------------- reading and checking


def file_hashes(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``directory`` except the manifest, by relative path."""
    d = Path(directory)
    return {
        p.relative_to(d).as_posix(): sha256_file(p)
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_export_items(directory: str | os.PathLike) -> list[dict]:
    """The rows of ``items.jsonl`` (``index`` 0..n-1 in order, ``token``, ``item_id``, ``title``, ...)."""
    path = Path(directory) / ITEMS_FILE
    try:
        items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read the item vocabulary ({one_line(e)})") from None
    if any(not isinstance(it, dict) or it.get("index") != i for i, it in enumerate(items)):
        raise ExportError(f"{path}: items must have index 0..{len(items) - 1} in order")
    return items


def verify_export(directory: str | os.PathLike) -> None:
    """Re-hash every file against the manifest (a damaged or edited export is refused)."""
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{d / MANIFEST}: cannot read the file hashes ({one_line(e)})") from None
    actual = file_hashes(d)
    bad = sorted(set(actual.items()) ^ set(files.items()))
    if bad:
        raise ExportError(f"{d}: files differ from {MANIFEST} ({bad[0][0]})")


def load_export(directory: str | os.PathLike, verify: bool = False) -> LoadedExport:
    """(RecModel, tokenizer, items, spec) of an export directory, fp32, eval mode, on CPU.

    ``verify`` re-hashes every file against the manifest first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A ligr export (model_type recgpt_ligr) resolves to recgpt's own classes (registered at import of
    # modeling.ligr; repeated here, it costs nothing): the copy of modeling/ligr.py in the export and its
    # auto_map are for loading without recgpt, and are never executed here (no trust_remote_code needed).
    register_auto_classes()
    d = Path(directory)
    missing = [f for f in (CONFIG_FILE, ITEMS_FILE, "config.json") if not (d / f).is_file()]
    if missing:
        raise ExportError(f"{d}: not a recgpt export directory (no {missing[0]})")
    if verify:
        verify_export(d)
    spec = ExportSpec.read(d)
    items = read_export_items(d)
    tokenizer = AutoTokenizer.from_pretrained(d)
    lm = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, trust_remote_code=spec.trust_remote_code
    )
    lm.config.use_cache = False
    ids = [it.get("token_id") for it in items]
    if not ids or ids != list(range(ids[0], ids[0] + len(items))) or ids[0] != first_item_token_id(tokenizer):
        raise ExportError(f"{d}: items.jsonl's token_id are not the tokenizer's contiguous item ids")
    levels = tokenizer.init_kwargs.get(RATING_LEVELS_KEY) or []
    model = RecModel(lm, torch.tensor(ids), tied=is_tied(lm),
                     rating_levels=[float(x) for x in levels] if spec.task == "rating" else None,
                     rating_head=spec.rating_head)  # fmt: skip
    if model.rating_head is not None:
        weights = load_file(str(d / RATING_HEAD_FILE))
        model.rating_head.load_state_dict(
            {"weight": weights["weight"].float(), "bias": weights["bias"].float()}
        )
    return LoadedExport(model.eval(), tokenizer, items, spec)


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_batch(model: RecModel, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Scores at each row's labelled position: item logits [B, num_items] (next_item) or rating
    outputs (rating) — the same quantities the metrics rank."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h = hidden[batch["labels"] != -100]
    return (model.rating_output(h) if task == "rating" else model.item_logits(h)).float()


_MEMO: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()
_MEMO_SIZE = 8


def _memo(kind: str, owners: tuple, key: tuple, build: Callable[[], Any]) -> Any:
    """What every request on one loaded export shares (the catalogue's lookups, the collate), built once
    per process for the same ``owners`` objects (the items list, the tokenizer) and ``key``, not per
    request: over 1M items each costs about a second (measured by ``benchmarks/scale.py``). The last
    ``_MEMO_SIZE`` are kept; an entry holds its owners, so their ids cannot be reused while it lives."""
    full = (kind, *map(id, owners), *key)
    hit = _MEMO.get(full)
    if hit is not None and all(a is b for a, b in zip(hit[0], owners)):
        _MEMO.move_to_end(full)
        return hit[1]
    value = build()
    _MEMO[full] = (owners, value)
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return value


def _catalogue(items: list[dict]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(original id -> index, exact title -> indices); titles repeat (remakes), ids do not."""

    def build() -> tuple[dict[str, int], dict[str, list[int]]]:
        by_id = {str(it["item_id"]): it["index"] for it in items}
        by_title: dict[str, list[int]] = {}
        for it in items:
            if it.get("title"):
                by_title.setdefault(it["title"], []).append(it["index"])
        return by_id, by_title

    return _memo("catalogue", (items,), (len(items),), build)


def resolve_history(entries: list[Any], items: list[dict], source: str) -> list[int]:
    """Item indices of ``entries`` (ids as numbers or strings, or exact titles), oldest first.

    ``source`` names where the entries came from (a file, an argument) in the error messages. Raises
    one error listing every unknown entry, or naming an ambiguous title with its candidates."""
    by_id, by_title = _catalogue(items)
    indices, unknown = [], []
    for entry in entries:
        if not isinstance(entry, (str, int)) or isinstance(entry, bool):
            raise ExportError(f"{source}: history entries must be item ids or titles, got {entry!r}")
        key = str(entry)
        as_id = by_id.get(key)
        as_title = by_title.get(key, []) if isinstance(entry, str) else []
        candidates = sorted({i for i in [as_id, *as_title] if i is not None})
        if not candidates:
            unknown.append(key)
        elif len(candidates) > 1:
            listed = "; ".join(
                f"id {items[i]['item_id']} ({items[i].get('title') or 'no title'})" for i in candidates
            )
            raise ExportError(
                f"{source}: {key!r} matches {len(candidates)} items: {listed} — give the id instead"
            )
        else:
            indices.append(candidates[0])
    if unknown:
        raise ExportError(
            f"{source}: unknown items (not in the export's {len(items)} items): {', '.join(unknown)}"
        )
    if not indices:
        raise ExportError(f"{source}: the history is empty")
    return indices


def recommend(
    model: RecModel,
    tokenizer,
    items: list[dict],
    spec: ExportSpec,
    history: list[int],
    k: int = 10,
    *,
    exclude_seen: bool = True,
) -> list[dict[str, Any]]:
    """Top-``k`` items after ``history`` (item indices, oldest first): rank, item_id, title, score (the
    item logit) and prob (softmax over all items). ``exclude_seen`` (the default, as
    ``eval.exclude_seen``) never returns an item of the history; ``k`` counts what is left."""
    if k < 1:
        raise ValueError(f"k: got {k}, must be >= 1")
    if spec.task != "next_item":
        raise ExportError(f"{spec.directory}: trained for task={spec.task}, recommend needs next_item")
    # The eval collate puts the label after the last history entry; the record's last item is only the
    # (unused) target, and history ratings (text prompts) are taken as the top level: a liked item.
    levels = tokenizer.init_kwargs.get(RATING_LEVELS_KEY) or [0.0]
    top = float(max(levels))
    record = {"user": "recommend", "items": [*history, history[-1]], "ratings": [top] * (len(history) + 1),
              "seen": list(history)}  # fmt: skip
    prompt = spec.prompt_spec(len(history))
    collate = _memo("collate", (tokenizer, items), (len(items), prompt),
                    lambda: make_collate(prompt, tokenizer, items, "test"))  # fmt: skip
    batch = collate([record])
    scores = score_batch(model, batch, spec.task)[0]
    probs = scores.softmax(-1)
    if exclude_seen:
        scores = scores.index_fill(0, torch.tensor(history), float("-inf"))
    k = min(k, int(torch.isfinite(scores).sum()))
    best = scores.topk(k)
    return [
        {
            "rank": r + 1,
            "item_id": items[i]["item_id"],
            "title": items[i].get("title"),
            "score": float(s),
            "prob": float(probs[i]),
        }
        for r, (s, i) in enumerate(zip(best.values.tolist(), best.indices.tolist()))
    ]
