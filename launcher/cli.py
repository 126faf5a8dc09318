"""The ``recgpt`` command line: ``recgpt <subcommand> …`` or ``python -m launcher <subcommand> …``.

Argument parsing lives here; the work lives in the packages (imported lazily so ``--help`` is fast
and ``shards`` never imports torch's distributed stack). A :class:`~trainer.config.ConfigError` or a
:class:`UserError` becomes one line on stderr and exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from configs import ConfigError, RecgptError, load_config

EXIT_USAGE = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", help="YAML file of overrides (see configs/); defaults live in trainer/config.py"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotlist overrides applied last, e.g. train.max_steps=100",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recgpt",
        description="Fine-tune GPT-style language models for recommendation: "
        "WebDataset shards -> DeepSpeed ZeRO training (LoRA, adversarial) -> HF safetensors export.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    # ------------------------------------------------------------------ shards
    shards = sub.add_parser("shards", help="build, inspect and verify WebDataset shards of interaction logs")
    ssub = shards.add_subparsers(dest="shards_command", required=True, metavar="<action>")
    b = ssub.add_parser(
        "build",
        help="interaction logs -> leave-one-out split -> WebDataset shards + manifest",
        description="Read interaction logs, filter (k-core, rating threshold), split leave-one-out by time "
        "per user (ties by file order) and write train/valid/test WebDataset shards with a manifest.",
    )
    b.add_argument("input", help="log file, directory or .zip (MovieLens, Amazon JSONL, CSV/Parquet)")
    b.add_argument("--out", "-o", required=True, help="output shard directory (written atomically)")
    b.add_argument(
        "--format",
        default="auto",
        choices=["auto", "ml-100k", "ml-1m", "ml-latest", "amazon-2018", "amazon-2023", "csv", "parquet"],
        help="input format (auto: detect from file names)",
    )
    b.add_argument("--meta", help="item metadata file (Amazon meta JSONL; titles) when not next to the input")
    b.add_argument("--user-col", default="user_id", help="generic CSV/Parquet: user column")
    b.add_argument("--item-col", default="item_id", help="generic CSV/Parquet: item column")
    b.add_argument("--rating-col", default=None, help="generic CSV/Parquet: rating column (optional)")
    b.add_argument("--time-col", default="timestamp", help="generic CSV/Parquet: timestamp column")
    b.add_argument("--title-col", default=None, help="generic CSV/Parquet: item title column (optional)")
    b.add_argument(
        "--min-user-interactions", type=int, default=5, help="k-core: drop users with fewer (default 5)"
    )
    b.add_argument(
        "--min-item-interactions", type=int, default=1, help="k-core: drop items with fewer (default 1)"
    )
    b.add_argument(
        "--rating-threshold", type=float, default=None, help="keep only interactions rated >= this"
    )
    b.add_argument(
        "--max-history", type=int, default=50, help="history items per record (windows are max_history+1)"
    )
    b.add_argument(
        "--window-stride",
        type=int,
        default=None,
        help="training windows end every N items (default --max-history: each target once; smaller overlaps)",
    )
    b.add_argument(
        "--prefix-records",
        action="store_true",
        help="one training record per target (RecBole style, ~50x compute)",
    )
    b.add_argument("--records-per-member", type=int, default=256, help="records packed into one tar member")
    b.add_argument("--max-shard-mb", type=float, default=16.0, help="cap on one shard's size (default 16)")
    b.add_argument(
        "--skip-bad-lines", action="store_true", help="count and report malformed lines instead of stopping"
    )
    b.add_argument("--force", action="store_true", help="replace an existing output directory")
    i = ssub.add_parser("inspect", help="print a shard directory's statistics")
    i.add_argument("dir", help="shard directory (holding manifest.json)")
    i.add_argument("--json", action="store_true", help="print the manifest statistics as JSON")
    v = ssub.add_parser("verify", help="re-check every shard's size and sha256; exit 1 naming bad shards")
    v.add_argument("dir", help="shard directory (holding manifest.json)")

    # ------------------------------------------------------------------ train
    t = sub.add_parser(
        "train",
        help="train under DeepSpeed (one process, torchrun, or Ray Train with ray.num_workers > 0)",
        description="Train a GPT recommender. Runs as one process, unchanged under "
        "`torchrun --no-python --nproc_per_node N recgpt train …`, or through Ray Train when "
        "ray.num_workers > 0 (connects to RAY_ADDRESS when set, else starts a local Ray).",
    )
    _add_config_args(t)

    # ------------------------------------------------------------------ evaluate
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
    _add_config_args(e)

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
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "shards":
        from data_shards import cli as shards_cli

        return getattr(shards_cli, args.shards_command)(args) or 0
    if args.command == "train":
        cfg = load_config(args.config, args.overrides)
        if cfg.ray.num_workers > 0:
            if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
                raise ConfigError(
                    "ray.num_workers: > 0 cannot run under torchrun: launch one process, Ray starts the workers"
                )
            from launcher.ray_launch import train_with_ray

            return train_with_ray(cfg) or 0
        from trainer.loop import train

        train(cfg)
        return 0
    if args.command == "evaluate":
        from trainer.evaluate import evaluate_main

        return evaluate_main(args) or 0
    if args.command == "export":
        from modeling.export import export_main

        return export_main(args) or 0
    if args.command == "recommend":
        from modeling.recommend import recommend_main

        return recommend_main(args) or 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except RecgptError as e:
        print(f"recgpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
