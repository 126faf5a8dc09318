"""``recgpt shards build|inspect|verify``: argument parsing and printing; the work is in ``data_shards``.

The flags of ``shards build`` are generated from :class:`configs.ShardsConfig`: each field is a
``--kebab-case`` flag with the field's docstring as help and its default shown, so a flag, a YAML key
(``--config FILE``) and a ``key=value`` override are three spellings of one setting with one default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import typing
from typing import Any

from launcher.common import add_config_args


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(cls: type, name: str) -> Any:
    """The non-None type of a dataclass field (``int | None`` -> int)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_build_flags(p: argparse.ArgumentParser) -> None:
    from configs import ShardsConfig, field_docs
    from configs.schema import INPUT_FORMATS

    docs = field_docs(ShardsConfig)
    defaults = ShardsConfig()
    for f in dataclasses.fields(ShardsConfig):
        kind = _field_type(ShardsConfig, f.name)
        default = getattr(defaults, f.name)
        help_text = f"{docs[f.name]} [shards.{f.name}; default {default}]"
        # default=None: only flags given on the command line override the YAML file and the schema.
        if kind is bool:
            p.add_argument(_flag(f.name), action="store_true", default=None, help=help_text)
        else:
            choices = INPUT_FORMATS if f.name == "format" else None
            p.add_argument(_flag(f.name), type=kind, default=None, choices=choices, help=help_text)


def add_parsers(sub) -> None:
    """``recgpt shards build|inspect|verify``."""
    shards = sub.add_parser("shards", help="build, inspect and verify WebDataset shards of interaction logs")
    ssub = shards.add_subparsers(dest="shards_command", required=True, metavar="<action>")
    b = ssub.add_parser(
        "build",
        help="interaction logs -> leave-one-out split -> WebDataset shards + manifest",
        description="Read interaction logs, filter (k-core, rating threshold), split leave-one-out by time "
        "per user (ties by file order) and write train/valid/test WebDataset shards with a manifest. "
        "Settings come from configs.ShardsConfig: flags below, a YAML file (--config) or key=value.",
    )
    b.add_argument("input", help="log file, directory or .zip (MovieLens, Amazon JSONL, CSV/Parquet)")
    b.add_argument("--out", "-o", required=True, help="output shard directory (written atomically)")
    b.add_argument("--force", action="store_true", help="replace an existing output directory")
    _add_build_flags(b)
    add_config_args(b, example="shards.max_history=20")
    i = ssub.add_parser("inspect", help="print a shard directory's statistics")
    i.add_argument("dir", help="shard directory (holding manifest.json)")
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    v = ssub.add_parser("verify", help="re-check every shard's size and sha256; exit 1 naming bad shards")
    v.add_argument("dir", help="shard directory (holding manifest.json)")


def run(args: argparse.Namespace) -> int:
    return {"build": build, "inspect": inspect, "verify": verify}[args.shards_command](args)


def _command_line(input_path: str, out: str, cfg) -> str:
    """``recgpt shards build`` with every setting that differs from the default spelled out, so the
    manifest says how to rebuild the shards without the YAML file."""
    from configs import ShardsConfig

    parts = ["recgpt", "shards", "build", input_path, "--out", out]
    defaults = ShardsConfig()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        parts += [_flag(f.name)] if isinstance(value, bool) else [_flag(f.name), str(value)]
    return shlex.join(parts)


def build(args: argparse.Namespace) -> int:
    from configs import ShardsConfig, load_shards_config
    from data_shards.build import build_shards

    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ShardsConfig)
        if getattr(args, f.name) is not None
    }
    cfg = load_shards_config(args.config, args.overrides, values=flags)
    command = _command_line(args.input, args.out, cfg)
    if cfg.engine == "ray":  # Ray is imported only here, in the launcher (the layer contract)
        from launcher.ray_shards import build as build_with_ray

        manifest = build_with_ray(args.input, args.out, cfg, force=args.force, command=command)
    else:
        manifest = build_shards(args.input, args.out, cfg, force=args.force, command=command)
    for notice in manifest["source"].get("notices", []):
        print(f"note: {notice}", file=sys.stderr)
    skipped = manifest["source"]["skipped_lines"]
    if skipped:
        print(f"skipped {skipped} malformed lines (shards.skip_bad_lines)", file=sys.stderr)
    print(f"wrote {args.out}")
    _print_stats(manifest)
    return 0


def _print_stats(m: dict) -> None:
    from data_shards.manifest import SPLITS

    f = m["filters"]
    print(f"source        {m['source']['input']} ({m['source']['format']})")
    print(f"fingerprint   {m['fingerprint']}")
    print(f"users         {m['num_users']:,}")
    print(
        f"items         {m['num_items']:,} (ranking catalogue; {m['source']['metadata_items']:,} with metadata)"
    )
    print(f"interactions  {m['num_interactions']:,}")
    if "rows" in m:  # manifests before issue 14 lack the row accounting
        rows = m["rows"]
        removed = {reason: n for reason, n in rows["removed"].items() if n}
        detail = f" ({', '.join(f'{n:,} {reason}' for reason, n in removed.items())})" if removed else ""
        kept_dups = f"; {rows['duplicates_kept']:,} duplicate rows kept" if rows["duplicates_kept"] else ""
        print(
            f"rows          {rows['read']:,} read, {rows['kept']:,} kept, "
            f"{sum(removed.values()):,} removed{detail}{kept_dups}"
        )
    if "timestamp_unit" in m:
        src = m["source"]
        read_as = src.get("time_format")
        if src.get("time_unit_from") in ("magnitude", "shards.time_unit", "format"):
            read_as = f"{read_as} {src['time_unit']} (unit from {src['time_unit_from']})"
        print(f"timestamps    {read_as}; records hold {m['timestamp_unit']}")
    print(
        f"filters       users >= {f['min_user_interactions']}, items >= {f['min_item_interactions']}, "
        f"{'rating: all kept' if f['rating_threshold'] is None else 'rating >= ' + format(f['rating_threshold'], 'g')}; removed {f['removed_interactions']:,} interactions, "
        f"{f['removed_users']:,} users, {f['removed_items']:,} items"
    )
    if "period" in m:  # a periodic build (shards.base)
        per, base = m["period"], m["base"]
        print(
            f"base          {base['location']} ({base['num_items']:,} items, fingerprint {base['fingerprint'][:12]}…)"
        )
        print(
            f"new period    {per['interactions']:,} interactions, {per['users_active']:,} users active "
            f"({per['new_users']:,} new), {per['new_items']:,} new items; valid/test: {per['eval_users']:,} users' "
            f"last two new interactions; train: {per['new_train_records']:,} new + "
            f"{per['carried_train_records']:,} carried records"
        )
    print(f"ratings       {', '.join(f'{r:g}' for r in m['rating_levels'])}")
    print(
        f"max_history   {m['max_history']} (train records: {m['train_records']}, "
        f"{m['records_per_member']} per tar member)"
    )
    print(f"{'split':<8}{'records':>10}{'shards':>8}{'MiB':>10}")
    for split in SPLITS:
        s = m["splits"][split]
        mib = sum(x["bytes"] for x in s["shards"]) / 2**20
        print(f"{split:<8}{s['records']:>10,}{len(s['shards']):>8}{mib:>10.2f}")


def inspect(args: argparse.Namespace) -> int:
    from data_shards.manifest import load_manifest

    manifest = load_manifest(args.dir)
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        _print_stats(manifest)
    return 0


def verify(args: argparse.Namespace) -> int:
    from data_shards.manifest import verify as verify_location

    checked, problems = verify_location(args.dir)
    for p in problems:
        print(f"BAD {p}")
    if problems:
        print(f"{len(problems)} of {checked} files bad", file=sys.stderr)
        return 1
    print(f"ok: {checked} files match the manifest")
    return 0
