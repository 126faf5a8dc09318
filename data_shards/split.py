"""Filters (rating threshold, k-core) and the leave-one-out split into train/valid/test records.

Per user, interactions are ordered by timestamp (int64 at the log's full resolution, see
``data_shards.ingest``) and then by original file order (a stable tie-break),
so the same input always gives the same split and a test target never sits inside a training window:
test = the last interaction, valid = the second to last, train = the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from configs import DataError, ShardsConfig
from configs.schema import MIN_USER_INTERACTIONS
from data_shards.records import Record


def apply_filters(
    frame: pd.DataFrame,
    filters: ShardsConfig,
    known_users: set[str] | None = None,
    known_items: set[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``shards.rating_threshold``, then users with fewer than the leave-one-out minimum of events
    (``too_short``), then the k-core (``shards.min_user_interactions`` / ``min_item_interactions``)
    until stable: dropping items can push users below the minimum. ``known_users`` / ``known_items``
    (a periodic build: the base's) are exempt from the minimums: they passed them in the base.

    Every count is of distinct events (user, item, timestamp): rows repeating one, kept with
    ``shards.duplicates=keep``, do not count. The stats hold the settings, what was removed
    (``removed_interactions/users/items``) and ``removed_by`` reason: rating_threshold, too_short, k_core.
    """
    before = {"interactions": len(frame), "users": frame["user"].nunique(), "items": frame["item"].nunique()}
    removed_by = {"rating_threshold": 0, "too_short": 0, "k_core": 0}
    if filters.rating_threshold is not None:
        keep = frame["rating"] >= filters.rating_threshold
        removed_by["rating_threshold"] = int((~keep).sum())
        frame = frame[keep]
    # 1 for each distinct event, 0 for a row repeating one (only with shards.duplicates=keep).
    weight = None
    if filters.duplicates == "keep":
        weight = (~frame.duplicated(["user", "item", "timestamp"])).astype(np.int64)

    def counts(by: str) -> pd.Series:
        if weight is None:
            return frame.groupby(by)["item" if by == "user" else "user"].transform("size")
        return weight.loc[frame.index].groupby(frame[by]).transform("sum")

    def exempt(by: str, known: set[str] | None) -> pd.Series | bool:
        return False if not known else frame[by].astype(str).isin(known)

    keep = (counts("user") >= MIN_USER_INTERACTIONS) | exempt("user", known_users)
    removed_by["too_short"] = int((~keep).sum())
    frame = frame[keep]
    while True:
        keep = ((counts("user") >= filters.min_user_interactions) | exempt("user", known_users)) & (
            (counts("item") >= filters.min_item_interactions) | exempt("item", known_items)
        )
        if keep.all():
            break
        removed_by["k_core"] += int((~keep).sum())
        frame = frame[keep]
    if frame.empty:
        raise DataError(
            f"no interactions left after filtering (shards.min_user_interactions={filters.min_user_interactions}, "
            f"shards.min_item_interactions={filters.min_item_interactions}, "
            f"shards.rating_threshold={filters.rating_threshold}) of {before['interactions']} read"
        )
    stats = {
        "min_user_interactions": filters.min_user_interactions,
        "min_item_interactions": filters.min_item_interactions,
        "rating_threshold": filters.rating_threshold,
        "removed_interactions": before["interactions"] - len(frame),
        "removed_users": before["users"] - frame["user"].nunique(),
        "removed_items": before["items"] - frame["item"].nunique(),
        "removed_by": removed_by,
    }
    return frame, stats


def natural_order(ids: np.ndarray) -> np.ndarray:
    """Sorted distinct ids: numerically when every id is a (non-negative, int64) integer (MovieLens),
    else as strings; ids keep their spelling ("007" stays "007")."""
    uniq = np.unique(ids.astype(str))
    if all(s.isascii() and s.isdigit() and len(s) <= 18 for s in uniq):
        return uniq[np.argsort(uniq.astype(np.int64), kind="stable")]
    return uniq


@dataclass
class Sequences:
    """Every user's chronological interactions in dense indices (CSR layout)."""

    users: np.ndarray  # dense uid -> original user id
    items: np.ndarray  # dense item index -> original item id
    item_counts: np.ndarray  # interactions per dense item
    offsets: np.ndarray  # user u's interactions are [offsets[u], offsets[u+1])
    item_idx: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray

    def user(self, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = slice(self.offsets[u], self.offsets[u + 1])
        return self.item_idx[s], self.ratings[s], self.timestamps[s]


def sequences(frame: pd.DataFrame) -> Sequences:
    """Dense indices and per-user order: timestamp, then original file order (``frame.index``)."""
    users, items = natural_order(frame["user"].to_numpy()), natural_order(frame["item"].to_numpy())
    uid = pd.Index(users).get_indexer(frame["user"].astype(str))
    iid = pd.Index(items).get_indexer(frame["item"].astype(str))
    ts = frame["timestamp"].to_numpy(np.int64)
    order = np.lexsort((frame.index.to_numpy(), ts, uid))  # last key sorts first
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(uid, minlength=len(users)), out=offsets[1:])
    return Sequences(
        users=users,
        items=items,
        item_counts=np.bincount(iid, minlength=len(items)),
        offsets=offsets,
        item_idx=iid[order],
        ratings=frame["rating"].to_numpy(np.float64)[order],
        timestamps=ts[order],
    )


def train_windows(
    n: int, max_history: int, prefix_records: bool = False, stride: int | None = None
) -> list[tuple[int, int]]:
    """[start, end) windows over a training sequence of length n, oldest first.

    Windows hold at most ``max_history + 1`` items and end every ``stride`` items counting back from
    the newest one. The default stride ``max_history`` overlaps windows by one item, so every position
    1..n-1 is a target exactly once (the last item of one window is the first input of the next). A
    smaller stride repeats targets with longer histories: evaluation always sees up to ``max_history``
    items before a target, while a target late in a non-overlapping window sees only half that on
    average. With ``prefix_records`` there is one window per target instead (RecBole style).
    """
    if prefix_records:
        return [(max(0, t - max_history), t + 1) for t in range(1, n)]
    stride = max_history if stride is None else stride
    windows = []
    end = n
    while end >= 2:
        start = max(0, end - max_history - 1)
        windows.append((start, end))
        if start == 0:
            break
        end -= stride
    return windows[::-1]


def _record(seqs: Sequences, u: int, lo: int, hi: int) -> Record:
    items, ratings, times = seqs.user(u)
    return {
        "user": str(seqs.users[u]),
        "uid": u,
        "items": items[lo:hi].tolist(),
        "ratings": ratings[lo:hi].tolist(),
        "timestamps": times[lo:hi].tolist(),
    }


def train_records(
    seqs: Sequences, max_history: int, prefix_records: bool = False, stride: int | None = None
) -> Iterator[Record]:
    """Training records in one fixed pseudo-random order over all users' windows.

    The reader shuffles shards and records within a shard, so a shard must already hold a sample of
    the whole log: written user by user, a shard of prefix records would hold ~100 users and the model
    would see only them for a whole shard's worth of steps instead of a sample of every user.

    ``first_new_target``: index (within ``items``) of the first target that no earlier window of the
    user holds; ``train.objective=new`` supervises only from there, so each target is trained once,
    with the longest history the windows give it.
    """
    plan = []  # per user [windows, 4]: (user, lo, hi, first_new_target); records are built lazily
    for u in range(len(seqs.users)):
        n_train = int(seqs.offsets[u + 1] - seqs.offsets[u]) - 2
        windows = np.asarray(train_windows(n_train, max_history, prefix_records, stride), dtype=np.int64)
        if not len(windows):  # a single training item: nothing to predict
            continue
        lo, hi = windows[:, 0], windows[:, 1]
        covered = np.concatenate([[1], np.maximum.accumulate(hi)[:-1]])  # targets < covered: earlier windows
        plan.append(np.stack([np.full_like(lo, u), lo, hi, np.maximum(1, covered - lo)], axis=1))
    plan_arr = np.concatenate(plan) if plan else np.zeros((0, 4), dtype=np.int64)
    for i in np.random.default_rng(0).permutation(len(plan_arr)):
        u, lo, hi, first_new = (int(x) for x in plan_arr[i])
        record = _record(seqs, u, lo, hi)
        record["first_new_target"] = first_new
        yield record


def eval_records(seqs: Sequences, split: str, max_history: int) -> Iterator[Record]:
    """One record per user: the last max_history items before the target, then the target; ``seen``
    holds every earlier item (the whole history), so exclude_seen masks more than the window."""
    back = {"valid": 2, "test": 1}[split]
    for u in range(len(seqs.users)):
        items = seqs.user(u)[0]
        target = len(items) - back
        rec = _record(seqs, u, max(0, target - max_history), target + 1)
        rec["seen"] = np.unique(items[:target]).tolist()
        yield rec


def user_histories(seqs: Sequences, max_history: int) -> Iterator[dict[str, Any]]:
    """One line per user for ``histories.jsonl`` (what a periodic build continues): the last
    ``max_history + 1`` items, every item seen before the last one, and ``untrained`` = 2 (the valid
    and test targets, which no training window holds)."""
    for u in range(len(seqs.users)):
        items, ratings, times = seqs.user(u)
        keep = slice(max(0, len(items) - max_history - 1), len(items))
        yield {
            "user": str(seqs.users[u]),
            "uid": u,
            "items": items[keep].tolist(),
            "ratings": ratings[keep].tolist(),
            "timestamps": times[keep].tolist(),
            "seen": np.unique(items[:-1]).tolist(),
            "untrained": 2,
        }
