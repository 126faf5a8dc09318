"""Periodic builds (``shards.base``): the interactions of a new period on top of the previous build.

``recgpt shards build NEW_LOGS --base OLD_SHARDS --out NEW_SHARDS`` is what a daily or weekly job runs:
NEW_LOGS holds **only the interactions after the base period** (what arrived since), never the whole
log again; the base build supplies everything the new one needs of the past:

* **item vocabulary**: every base item keeps its index (so an old model's item rows stay valid); items
  first seen in the new period are appended in the natural order of their ids (numeric for MovieLens),
  so the same inputs always give the same indices. ``count`` adds both periods.
* **histories**: each user's last ``max_history + 1`` items (with ratings, times and the whole set of
  items seen) come from the base — its ``histories.jsonl`` when it is itself a periodic build, else its
  test records, which hold exactly that. A user's new interactions continue that history: training
  windows and evaluation records reach back into the base period.
* **split**: valid/test are each user's second-to-last and last interaction **inside the new period**
  (users with at least two new interactions); "before vs after re-tuning" is measured on events no
  model trained on the base has seen. Every other not yet trained event is a training target: the
  new period's, and the base's own valid/test targets (held out there, trainable now).
* **train split**: the base's training records are carried over (``shards.carry_base_train``, the
  default: the new shards then hold every period, what a from-scratch run trains on), or left out
  (false: only the new targets, each with its history from the base — what re-tuning trains on).
  Both share the valid/test shards byte for byte, so their models are scored on the same records.

Filters: the rating threshold applies to the new log; users and items of the base are always kept
(they passed the base's k-core), new users need ``shards.min_user_interactions`` new interactions and
new items ``shards.min_item_interactions``. A new interaction older than the same user's last base
interaction means the input overlaps the base period (e.g. the whole log was passed): refused. The
base's history window, window stride, prefix records and rating threshold must be the ones of this
build; another id source (another format's ids, another generic id column) is refused — one line each.

Every build writes ``histories.jsonl`` (one line per user: the tail of the history, the items seen
before its last item, and ``untrained``: how many trailing items no training record targets), so the
next period can be built on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from configs import DataError, ShardsConfig, one_line
from configs.schema import TIME_UNITS
from data_shards.manifest import load_manifest, read_items, read_url, resolve
from data_shards.reader import ShardLoader
from data_shards.records import Record
from data_shards.split import Sequences, natural_order, train_windows

HISTORIES = "histories.jsonl"
GENERIC_FORMATS = ("csv", "parquet", "jsonl")
# Settings that shape records: a periodic build must use the base's (its records are carried or continued).
SAME_AS_BASE = ("max_history", "window_stride", "prefix_records", "rating_threshold")


def _base_error(location: str, message: str) -> DataError:
    return DataError(f"shards.base: {location}: {message}")


@dataclass
class Tail:
    """The end of a user's history in the base build."""

    items: list[int]
    ratings: list[float]
    timestamps: list[int]
    seen: list[int]  # every item before the last of ``items`` (the whole history, not only the tail)
    untrained: int  # trailing items of ``items`` that no training record of the base targets


@dataclass
class Base:
    """What a periodic build reads of the previous one."""

    location: str
    manifest: dict[str, Any]
    items: list[dict]
    users: list[str]  # base uid -> user id
    tails: dict[str, Tail] = field(default_factory=dict)


def check_settings(location: str, manifest: dict[str, Any], cfg: ShardsConfig) -> None:
    """DataError naming the first record-shaping setting that differs from the base's."""
    saved = manifest.get("shards_config") or {}
    for key in SAME_AS_BASE:
        if key in saved and saved[key] != getattr(cfg, key):
            raise DataError(
                f"shards.{key}: {getattr(cfg, key)!r} here, {saved[key]!r} in the base {location}; a periodic "
                "build continues the base's records and must keep its setting"
            )


def check_id_source(location: str, manifest: dict[str, Any], fmt: str, cfg: ShardsConfig) -> None:
    """The new log's user/item ids must be the base's kind of ids (one line naming the setting)."""
    saved = manifest.get("shards_config") or {}
    base_fmt = manifest.get("source", {}).get("format", "")
    if base_fmt in GENERIC_FORMATS and fmt in GENERIC_FORMATS:
        for key in ("user_col", "item_col"):
            if key in saved and saved[key] != getattr(cfg, key):
                raise DataError(
                    f"shards.{key}: {getattr(cfg, key)!r} here, {saved[key]!r} in the base {location}; "
                    "ids from another column are another vocabulary"
                )
    elif base_fmt not in GENERIC_FORMATS and fmt not in GENERIC_FORMATS and base_fmt != fmt:
        raise DataError(
            f"shards.format: the input is {fmt}, the base {location} was built from {base_fmt}; "
            "their ids are not the same items"
        )


def read_base(location: str, cfg: ShardsConfig) -> Base:
    """Manifest, vocabulary and per-user history tails of the base build (a path or URL)."""
    try:
        manifest = load_manifest(location)
        check_settings(location, manifest, cfg)
        items = read_items(location, manifest)
        tails: dict[str, Tail] = {}
        uids: dict[str, int] = {}
        if manifest.get("histories_file"):
            data = read_url(resolve(location, manifest["histories_file"]))
            if hashlib.sha256(data).hexdigest() != manifest.get("histories_sha256"):
                raise _base_error(location, f"{manifest['histories_file']}: sha256 differs from the manifest")
            for line in data.splitlines():
                if line.strip():
                    h = json.loads(line)
                    uids[h["user"]] = int(h["uid"])
                    tails[h["user"]] = Tail(
                        h["items"], h["ratings"], h["timestamps"], h["seen"], h["untrained"]
                    )
        else:  # a plain build: its test records hold each user's tail; valid and test targets untrained
            loader = ShardLoader(
                location, "test", batch_size=256, num_workers=0, shuffle=False, drop_last=False
            )
            for batch in loader:
                for r in batch:
                    if not r.get("pad"):
                        uids[r["user"]] = int(r["uid"])
                        tails[r["user"]] = Tail(r["items"], r["ratings"], r["timestamps"], r["seen"], 2)
    except DataError as e:
        text = one_line(e)
        raise DataError(text if text.startswith("shards.") else f"shards.base: {text}") from None
    users = sorted(uids, key=uids.__getitem__)
    if [uids[u] for u in users] != list(range(len(users))) or len(users) != manifest["num_users"]:
        raise _base_error(location, f"expected one history per user, uid 0..{manifest['num_users'] - 1}")
    return Base(location, manifest, items, users, tails)


def base_train_records(base: Base, scale: int) -> Iterator[Record]:
    """The base's training records as written (pad copies skipped), timestamps times ``scale``."""
    loader = ShardLoader(
        base.location, "train", batch_size=256, num_workers=0, shuffle=False, drop_last=False
    )
    for batch in loader:
        for r in batch:
            if not r.get("pad"):
                if scale != 1:
                    r["timestamps"] = [t * scale for t in r["timestamps"]]
                yield r


def common_unit(base_unit: str, new_unit: str) -> tuple[str, int, int]:
    """(the finer unit, factor for base times, factor for new times): both periods in one unit."""
    b, n = TIME_UNITS.index(base_unit), TIME_UNITS.index(new_unit)
    unit = TIME_UNITS[max(b, n)]
    return unit, 10 ** (3 * (max(b, n) - b)), 10 ** (3 * (max(b, n) - n))


def period_sequences(frame: pd.DataFrame, base: Base) -> Sequences:
    """The new period's interactions in the combined vocabulary: base users and items first, in their
    base order, then new ones in natural order; per user by timestamp, then file order. ``item_counts``
    adds both periods."""
    known_items = [str(it["item_id"]) for it in base.items]
    known = set(known_items)
    new_items = [i for i in natural_order(frame["item"].to_numpy()) if i not in known]
    items = np.array(known_items + new_items, dtype=object)
    base_users = set(base.users)
    new_users = [u for u in natural_order(frame["user"].to_numpy()) if u not in base_users]
    users = np.array(base.users + new_users, dtype=object)
    uid = pd.Index(users).get_indexer(frame["user"].astype(str))
    iid = pd.Index(items).get_indexer(frame["item"].astype(str))
    ts = frame["timestamp"].to_numpy(np.int64)
    order = np.lexsort((frame.index.to_numpy(), ts, uid))
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(uid, minlength=len(users)), out=offsets[1:])
    counts = np.bincount(iid, minlength=len(items))
    counts[: len(known_items)] += np.array([int(it.get("count", 0)) for it in base.items], dtype=np.int64)
    return Sequences(
        users=users,
        items=items,
        item_counts=counts,
        offsets=offsets,
        item_idx=iid[order],
        ratings=frame["rating"].to_numpy(np.float64)[order],
        timestamps=ts[order],
    )


def check_chronology(seqs: Sequences, base: Base, source: str) -> None:
    """DataError when a user's new interaction is older than their last base interaction."""
    late = 0
    first = None
    for u, user in enumerate(seqs.users[: len(base.users)]):
        _, _, times = seqs.user(u)
        tail = base.tails[user]
        if len(times) and times[0] < tail.timestamps[-1]:
            late += int((times < tail.timestamps[-1]).sum())
            first = first or str(user)
    if late:
        raise DataError(
            f"{source}: {late} interactions are older than the same user's last interaction in the base "
            f"(first: user {first!r}); the input of a periodic build holds only what came after the base period"
        )


@dataclass
class Period:
    """Every record of a periodic build, and what the manifest says about the period."""

    train: list[Record]
    valid: list[Record]
    test: list[Record]
    histories: list[dict[str, Any]]
    stats: dict[str, Any]


def period_records(seqs: Sequences, base: Base, cfg: ShardsConfig, base_scale: int) -> Period:
    """Records of the combined histories (module docstring); train records in one seeded random order."""
    max_history, stride = cfg.max_history, cfg.window_stride
    train: list[Record] = []
    valid: list[Record] = []
    test: list[Record] = []
    histories: list[dict[str, Any]] = []
    active = 0
    for u, user in enumerate(seqs.users):
        user = str(user)
        new_items, new_ratings, new_times = seqs.user(u)
        tail = base.tails.get(user)
        if tail is not None:
            items = list(tail.items) + new_items.tolist()
            ratings = list(tail.ratings) + new_ratings.tolist()
            times = [t * base_scale for t in tail.timestamps] + new_times.tolist()
            seen0 = set(tail.seen)
            first_target = len(tail.items) - tail.untrained  # earlier targets were trained in the base
        else:
            items, ratings, times = new_items.tolist(), new_ratings.tolist(), new_times.tolist()
            seen0, first_target = set(), 1
        active += bool(len(new_items))
        n = len(items)
        has_eval = len(new_items) >= 2
        n_train = n - 2 if has_eval else n
        covered = max(1, first_target)  # targets before it are trained already
        for lo, hi in train_windows(n_train, max_history, cfg.prefix_records, stride):
            if hi - 1 < covered:  # no untrained target in this window
                continue
            train.append({"user": user, "uid": u, "items": items[lo:hi], "ratings": ratings[lo:hi],
                          "timestamps": times[lo:hi], "first_new_target": max(1, covered - lo)})  # fmt: skip
            covered = max(covered, hi)
        if has_eval:
            for split, target in ((valid, n - 2), (test, n - 1)):
                lo = max(0, target - max_history)
                split.append({"user": user, "uid": u, "items": items[lo : target + 1],
                              "ratings": ratings[lo : target + 1], "timestamps": times[lo : target + 1],
                              "seen": sorted(seen0.union(items[:target]))})  # fmt: skip
        keep = max_history + 1
        histories.append({"user": user, "uid": u, "items": items[-keep:], "ratings": ratings[-keep:],
                          "timestamps": times[-keep:], "seen": sorted(seen0.union(items[:-1])),
                          "untrained": 2 if has_eval else 0})  # fmt: skip
    new_targets = len(train)
    if cfg.carry_base_train:
        train.extend(base_train_records(base, base_scale))
    order = np.random.default_rng(0).permutation(len(train))
    stats = {
        "users_active": active,
        "new_users": len(seqs.users) - len(base.users),
        "new_items": len(seqs.items) - len(base.items),
        "eval_users": len(test),
        "new_train_records": new_targets,
        "carried_train_records": len(train) - new_targets,
    }
    return Period([train[i] for i in order], valid, test, histories, stats)
