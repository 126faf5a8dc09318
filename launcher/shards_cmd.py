"""``recgpt shards build|inspect|verify``: argument parsing and printing; the work is in ``data_shards``."""

from __future__ import annotations

import argparse


# ------------------------------------------------------------------ shards
def add_parsers(sub) -> None:
    """``recgpt shards build|inspect|verify``."""
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


def run(args: argparse.Namespace) -> int:
    from data_shards import cli as shards_cli

    return getattr(shards_cli, args.shards_command)(args) or 0
