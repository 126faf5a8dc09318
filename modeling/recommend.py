"""``recgpt recommend``: top-K items for one history, from an export directory only.

The history (original item ids, or exact titles in a JSON file) is mapped to item indices through the
export's ``items.jsonl``, turned into a prompt by the same collate as training and evaluation (ids or
text format, from the export's ``config.yaml``) and scored over every item at the position where
training predicts the next item. No checkpoint, shard directory or DeepSpeed is involved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from configs import ExportError
from modeling.collate import RATING_LEVELS_KEY, PromptSpec, make_collate
from modeling.export import load_export, quiet_transformers, score_batch


def _catalogue(items: list[dict]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(original id -> index, exact title -> indices); titles repeat (remakes), ids do not."""
    by_id = {str(it["item_id"]): it["index"] for it in items}
    by_title: dict[str, list[int]] = {}
    for it in items:
        if it.get("title"):
            by_title.setdefault(it["title"], []).append(it["index"])
    return by_id, by_title


def resolve_history(entries: list[Any], items: list[dict], source: str) -> list[int]:
    """Item indices of ``entries`` (ids as numbers or strings, or exact titles), oldest first.

    Raises one error listing every unknown entry, or naming an ambiguous title with its candidates."""
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


def _read_history(args: argparse.Namespace) -> tuple[list[Any], str]:
    if args.history is not None:
        return [x.strip() for x in args.history.split(",") if x.strip()], "--history"
    path = Path(args.history_file)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"--history-file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(entries, list):
        raise ExportError(f"--history-file {path}: expected a JSON list of item ids or titles")
    return entries, f"--history-file {path}"


def recommend(
    model, tokenizer, items: list[dict], cfg, history: list[int], k: int, exclude_seen: bool
) -> list[dict[str, Any]]:
    """Top-``k`` items after ``history`` (item indices, oldest first): rank, item_id, title, score (the
    item logit) and prob (softmax over all items)."""
    if cfg.task != "next_item":
        raise ExportError(f"recommend: this export was trained for task={cfg.task}, not next_item")
    # The eval collate puts the label after the last history entry; the record's last item is only the
    # (unused) target, and history ratings (text prompts) are taken as the top level: a liked item.
    levels = tokenizer.init_kwargs.get(RATING_LEVELS_KEY) or [0.0]
    top = float(max(levels))
    record = {"user": "recommend", "items": [*history, history[-1]], "ratings": [top] * (len(history) + 1),
              "seen": list(history)}  # fmt: skip
    spec = PromptSpec.from_config(cfg, cfg.data.max_history or len(history))
    batch = make_collate(spec, tokenizer, items, "test")([record])
    scores = score_batch(model, batch, cfg.task)[0]
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


def _table(rows: list[dict[str, Any]]) -> str:
    width = max([len("item_id")] + [len(str(r["item_id"])) for r in rows])
    lines = [f"{'rank':>4}  {'item_id':<{width}}  {'score':>9}  {'prob':>8}  title"]
    for r in rows:
        lines.append(
            f"{r['rank']:>4}  {str(r['item_id']):<{width}}  {r['score']:>9.4f}  {r['prob']:>8.5f}  {r['title'] or ''}"
        )
    return "\n".join(lines)


def recommend_main(args: argparse.Namespace) -> int:
    """``recgpt recommend``: a table (or ``--json``) of the top-K items for the given history."""
    if args.k < 1:
        raise ExportError(f"-k: got {args.k}, must be >= 1")
    entries, source = _read_history(args)
    quiet_transformers()
    model, tokenizer, items, cfg = load_export(args.model)
    history = resolve_history(entries, items, source)
    rows = recommend(model, tokenizer, items, cfg, history, args.k, args.exclude_seen)
    if args.json:
        print(json.dumps({"model": str(args.model), "history": [items[i]["item_id"] for i in history],
                          "exclude_seen": args.exclude_seen, "recommendations": rows}, ensure_ascii=False))  # fmt: skip
    else:
        print(_table(rows))
    return 0
