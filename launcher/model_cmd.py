"""``recgpt evaluate``, ``recgpt export`` and ``recgpt recommend``: argument parsing, calling the
library functions with typed arguments, and printing.

The libraries: ``trainer.evaluate`` (evaluate_checkpoint / evaluate_export), ``trainer.export``
(export_checkpoint) and ``modeling.serving`` (load_export, resolve_history, recommend).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from configs import ConfigError
from data_shards import storage

COMMANDS = ("evaluate", "export", "recommend")


def add_parsers(sub) -> None:
    """``recgpt evaluate``, ``recgpt export`` and ``recgpt recommend``."""
    e = sub.add_parser(
        "evaluate",
        help="full-ranking metrics of a checkpoint or an export on a split (one JSON line)",
        description="Evaluate a training checkpoint (--checkpoint) or an exported model (--model) on a split "
        "with the run's own config (key=value overrides apply to it). Runs distributed under torchrun. "
        "Prints one JSON line of metrics.",
    )
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        help="run directory (latest complete checkpoint) or one checkpoint directory; local or s3://…",
    )
    src.add_argument("--model", help="an export directory written by `recgpt export`; local or s3://…")
    e.add_argument("--data", help="shard directory (default: the one the run was trained on)")
    e.add_argument("--split", default="test", choices=["valid", "test"], help="split to score (default test)")
    e.add_argument(
        "--best", action="store_true", help="with a run directory: use the best checkpoint, not the latest"
    )
    e.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of the run's saved config, e.g. eval.exclude_seen=false adversarial.eval_epsilon=0.1",
    )

    # ------------------------------------------------------------------ export
    x = sub.add_parser(
        "export",
        help="consolidate ZeRO shards, merge LoRA, write a Hugging Face safetensors directory",
        description="Consolidate a DeepSpeed checkpoint of any ZeRO stage on CPU, fold LoRA into the base "
        "weights and write a plain Hugging Face model directory (safetensors, tokenizer, item vocabulary "
        "items.jsonl with each item's token id, manifest). Checks logits parity with the unmerged model. Prints one JSON line.",
    )
    x.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (its latest complete checkpoint; --best: its best) or one checkpoint directory",
    )
    x.add_argument(
        "--out", required=True, help="output directory or s3://… prefix (written atomically: manifest last)"
    )
    x.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="weight dtype (default export.dtype)"
    )
    x.add_argument("--best", action="store_true", help="export the best checkpoint of a run directory")
    x.add_argument(
        "--save-adapter",
        action="store_true",
        help="also write the PEFT adapter, before merging, to adapter/ (LoRA runs)",
    )
    x.add_argument("--force", action="store_true", help="replace an existing output directory")

    # ------------------------------------------------------------------ recommend
    r = sub.add_parser(
        "recommend",
        help="top-K items for a history, from an exported model directory only",
        description="Rank every item for a user history with an exported model directory (no checkpoint, "
        "no training code needed). Items of the history are left out unless --include-seen.",
    )
    r.add_argument("--model", required=True, help="export directory; local or s3://…")
    hist = r.add_mutually_exclusive_group(required=True)
    hist.add_argument("--history", help="original item ids, comma separated, oldest first")
    hist.add_argument("--history-file", help="JSON list of original item ids or exact titles, oldest first")
    r.add_argument("-k", type=int, default=10, help="how many items to return (default 10)")
    r.add_argument(
        "--include-seen",
        action="store_true",
        help="also recommend items of the history (default: left out, as eval.exclude_seen)",
    )
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")


def quiet_transformers() -> None:
    """CLI output is ours: no per-file progress bars from transformers' loading and saving."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    """One JSON line of metrics, printed by rank 0 (every rank computes the same)."""
    quiet_transformers()
    if args.model:
        from trainer.evaluate import evaluate_export

        line = evaluate_export(args.model, args.split, data=args.data, overrides=args.overrides)
    else:
        from trainer.evaluate import evaluate_checkpoint

        line = evaluate_checkpoint(
            args.checkpoint, args.split, data=args.data, best=args.best, overrides=args.overrides
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(line), flush=True)
    return 0


# --------------------------------------------------------------------------- export


def _export(args: argparse.Namespace) -> int:
    """Progress lines on stderr, then one JSON line (output directory, step, dtype, parity)."""
    from trainer.export import export_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_transformers()
    manifest = export_checkpoint(args.checkpoint, args.out, best=args.best, dtype=args.dtype,
                                 save_adapter=args.save_adapter, force=args.force)  # fmt: skip
    summary = {k: manifest[k] for k in ("source_checkpoint", "step", "dtype", "parity")}
    out = args.out if storage.is_url(args.out) else str(Path(args.out).absolute())
    print(json.dumps({"out": out, **summary}))
    return 0


# --------------------------------------------------------------------------- recommend


def _read_history(args: argparse.Namespace) -> tuple[list[Any], str]:
    if args.history is not None:
        return [x.strip() for x in args.history.split(",") if x.strip()], "--history"
    path = Path(args.history_file)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--history-file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(entries, list):
        raise ConfigError(f"--history-file {path}: expected a JSON list of item ids or titles")
    return entries, f"--history-file {path}"


def _table(rows: list[dict[str, Any]]) -> str:
    width = max([len("item_id")] + [len(str(r["item_id"])) for r in rows])
    lines = [f"{'rank':>4}  {'item_id':<{width}}  {'score':>9}  {'prob':>8}  title"]
    for r in rows:
        lines.append(
            f"{r['rank']:>4}  {str(r['item_id']):<{width}}  {r['score']:>9.4f}  {r['prob']:>8.5f}  {r['title'] or ''}"
        )
    return "\n".join(lines)


def _recommend(args: argparse.Namespace) -> int:
    """A table (or ``--json``) of the top-K items for the given history."""
    from modeling.serving import load_export, recommend, resolve_history

    if args.k < 1:
        raise ConfigError(f"-k: got {args.k}, must be >= 1")
    entries, source = _read_history(args)
    quiet_transformers()
    location = args.model
    if storage.is_url(location):  # an export in an object store: a verified local copy
        from trainer.remote import local_export

        location = local_export(location)
    model, tokenizer, items, spec = load_export(location)
    history = resolve_history(entries, items, source)
    exclude_seen = not args.include_seen
    rows = recommend(model, tokenizer, items, spec, history, args.k, exclude_seen=exclude_seen)
    if args.json:
        print(json.dumps({"model": str(args.model), "history": [items[i]["item_id"] for i in history],
                          "exclude_seen": exclude_seen, "recommendations": rows}, ensure_ascii=False))  # fmt: skip
    else:
        print(_table(rows))
    return 0


def run(args: argparse.Namespace) -> int:
    handlers = {"evaluate": _evaluate, "export": _export, "recommend": _recommend}
    return handlers[args.command](args)
