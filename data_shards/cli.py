"""``recgpt shards build|inspect|verify``: the work behind the subcommands parsed in ``launcher/cli.py``.

Bad input raises :class:`~data_shards.errors.DataError`; the launcher prints it as one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from data_shards.build import build_shards
from data_shards.ingest import Columns
from data_shards.manifest import SPLITS, load_manifest
from data_shards.manifest import verify as verify_location
from data_shards.split import Filters


def _command_line(args: argparse.Namespace) -> str:
    """The build command with every option spelled out, so the manifest says how to rebuild it."""
    parts = ["recgpt", "shards", "build", args.input, "--out", args.out, "--format", args.format]
    options = {
        "--meta": args.meta,
        "--user-col": args.user_col,
        "--item-col": args.item_col,
        "--rating-col": args.rating_col,
        "--time-col": args.time_col,
        "--title-col": args.title_col,
        "--min-user-interactions": args.min_user_interactions,
        "--min-item-interactions": args.min_item_interactions,
        "--rating-threshold": args.rating_threshold,
        "--max-history": args.max_history,
        "--window-stride": args.window_stride,
        "--records-per-member": args.records_per_member,
        "--max-shard-mb": args.max_shard_mb,
    }
    parts += [str(x) for opt, value in options.items() if value is not None for x in (opt, value)]
    parts += [
        flag
        for flag, on in (("--prefix-records", args.prefix_records), ("--skip-bad-lines", args.skip_bad_lines))
        if on
    ]
    return shlex.join(parts)


def build(args: argparse.Namespace) -> int:
    manifest = build_shards(
        args.input,
        args.out,
        fmt=args.format,
        meta=args.meta,
        columns=Columns(args.user_col, args.item_col, args.rating_col, args.time_col, args.title_col),
        filters=Filters(args.min_user_interactions, args.min_item_interactions, args.rating_threshold),
        max_history=args.max_history,
        prefix_records=args.prefix_records,
        window_stride=args.window_stride,
        records_per_member=args.records_per_member,
        max_shard_bytes=int(args.max_shard_mb * 2**20),
        skip_bad_lines=args.skip_bad_lines,
        force=getattr(args, "force", False),
        command=_command_line(args),
    )
    skipped = manifest["source"]["skipped_lines"]
    if skipped:
        print(f"skipped {skipped} malformed lines (--skip-bad-lines)", file=sys.stderr)
    print(f"wrote {args.out}")
    _print_stats(manifest)
    return 0


def _print_stats(m: dict) -> None:
    f = m["filters"]
    print(f"source        {m['source']['input']} ({m['source']['format']})")
    print(f"fingerprint   {m['fingerprint']}")
    print(f"users         {m['num_users']:,}")
    print(
        f"items         {m['num_items']:,} (ranking catalogue; {m['source']['metadata_items']:,} with metadata)"
    )
    print(f"interactions  {m['num_interactions']:,}")
    print(
        f"filters       users >= {f['min_user_interactions']}, items >= {f['min_item_interactions']}, "
        f"rating >= {f['rating_threshold']}; removed {f['removed_interactions']:,} interactions, "
        f"{f['removed_users']:,} users, {f['removed_items']:,} items"
    )
    print(f"ratings       {', '.join(f'{r:g}' for r in m['rating_levels'])}")
    print(
        f"max_history   {m['max_history']} (train records: {m['train_records']}, {m['records_per_member']} per tar member)"
    )
    print(f"{'split':<8}{'records':>10}{'shards':>8}{'MiB':>10}")
    for split in SPLITS:
        s = m["splits"][split]
        mib = sum(x["bytes"] for x in s["shards"]) / 2**20
        print(f"{split:<8}{s['records']:>10,}{len(s['shards']):>8}{mib:>10.2f}")


def inspect(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.dir)
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        _print_stats(manifest)
    return 0


def verify(args: argparse.Namespace) -> int:
    checked, problems = verify_location(args.dir)
    for p in problems:
        print(f"BAD {p}")
    if problems:
        print(f"{len(problems)} of {checked} files bad", file=sys.stderr)
        return 1
    print(f"ok: {checked} files match the manifest")
    return 0
