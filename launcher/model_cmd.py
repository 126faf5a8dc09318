"""``recgpt evaluate``, ``recgpt export`` and ``recgpt recommend``: argument parsing, calling the
library functions with typed arguments, and printing."""

from __future__ import annotations

import argparse

from launcher.common import add_config_args

COMMANDS = ("evaluate", "export", "recommend")


def add_parsers(sub) -> None:
    """``recgpt evaluate``, ``recgpt export`` and ``recgpt recommend``."""
    e = sub.add_parser(
        "evaluate",
        help="full-ranking metrics of a checkpoint or an export on a split (one JSON line)",
        description="Evaluate a training checkpoint (--checkpoint) or an exported model (--model) on a split. "
        "Runs distributed under torchrun. Prints one JSON line of metrics.",
    )
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", help="run directory (latest complete checkpoint) or one checkpoint directory"
    )
    src.add_argument("--model", help="an export directory written by `recgpt export`")
    e.add_argument("--data", help="shard directory (default: the one the run was trained on)")
    e.add_argument("--split", default="test", choices=["valid", "test"], help="split to score (default test)")
    e.add_argument(
        "--best", action="store_true", help="with a run directory: use the best checkpoint, not the latest"
    )
    add_config_args(e)

    # ------------------------------------------------------------------ export
    x = sub.add_parser(
        "export",
        help="consolidate ZeRO shards, merge LoRA, write a Hugging Face safetensors directory",
        description="Consolidate a DeepSpeed checkpoint of any ZeRO stage on CPU, fold LoRA into the base "
        "weights and write a plain Hugging Face model directory (safetensors, tokenizer with item tokens, "
        "item vocabulary, manifest). Checks logits parity with the unmerged model.",
    )
    x.add_argument("--checkpoint", required=True, help="run directory or one checkpoint directory")
    x.add_argument("--out", required=True, help="output directory (written atomically)")
    x.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="weight dtype (default export.dtype)"
    )
    which = x.add_mutually_exclusive_group()
    which.add_argument("--best", action="store_true", help="export the best checkpoint of a run directory")
    which.add_argument(
        "--latest", action="store_true", help="export the latest complete checkpoint (default)"
    )
    x.add_argument("--adapter-only", action="store_true", help="also write the PEFT adapter alone (adapter/)")
    x.add_argument("--force", action="store_true", help="replace an existing output directory")

    # ------------------------------------------------------------------ recommend
    r = sub.add_parser(
        "recommend",
        help="top-K items for a history, from an exported model directory only",
        description="Rank every item for a user history with an exported model directory (no checkpoint, "
        "no training code needed).",
    )
    r.add_argument("--model", required=True, help="export directory")
    hist = r.add_mutually_exclusive_group(required=True)
    hist.add_argument("--history", help="original item ids, comma separated, oldest first")
    hist.add_argument("--history-file", help="JSON list of original item ids or exact titles, oldest first")
    r.add_argument("-k", type=int, default=10, help="how many items to return (default 10)")
    r.add_argument("--exclude-seen", action="store_true", help="never recommend an item of the history")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.command == "evaluate":
        from trainer.evaluate import evaluate_main

        return evaluate_main(args) or 0
    if args.command == "export":
        from modeling.export import export_main

        return export_main(args) or 0
    from modeling.recommend import recommend_main

    return recommend_main(args) or 0
