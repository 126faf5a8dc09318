"""Property-based tests of ``shards build`` (Hypothesis): generated logs with ties, sub-second times,
exact duplicates, short users and missing values, written in random file order as CSV, Parquet and JSON
lines with their times in random representations (epoch s/ms/us/ns integers, decimal seconds, ISO 8601
with Z or UTC offsets, Parquet timestamp columns of any unit, with or without a time zone).

Properties: each user's test target is the latest event by full-resolution time then file order and
the valid target the one before; no valid/test event is in a training record; every row is counted
(read = kept + removed by reason); the same events give byte-identical shards in every format and
representation (the manifest fingerprint); a rebuild is byte-identical.

Size: 3 x ``EXAMPLES_SPLIT`` + ``EXAMPLES_FORMATS`` = 130 examples (2 and 3 builds each), about 20 s
on a 2-core machine. ``database=None``: nothing is written into the checkout.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import DataError, ShardsConfig
from data_shards.build import build_shards
from data_shards.manifest import read_items
from data_shards.reader import ShardLoader

EXAMPLES_SPLIT = 30  # per format
EXAMPLES_FORMATS = 40
MIN_USER = 4  # users with 3 distinct events: k_core; fewer: too_short
COMMON = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

UNIT_US = {"s": 10**6, "ms": 10**3, "us": 1}


@dataclass(frozen=True)
class Event:
    user: str
    item: str | None  # None: the row misses its item (a missing value)
    t_us: int  # microseconds since the epoch
    rating: float


@st.composite
def logs(draw) -> list[Event]:
    """File-ordered rows: 1-7 users with 1-9 events each over a few distinct times (ties), at a drawn
    resolution (1 s ... 1 us), some rows repeated exactly or with another rating, a few missing an item."""
    base_s = draw(st.integers(1_000_000_000, 4_000_000_000))  # 2001 .. 2096
    step_us = draw(st.sampled_from([10**6, 10**5, 10**3, 1]))
    id_style = draw(st.sampled_from(["prefixed", "numeric"]))
    users = [
        f"u{k}" if id_style == "prefixed" else ["7", "007", "10", "2"][k % 4] + "0" * (k // 4)
        for k in range(7)
    ]
    events = []
    for user in users[: draw(st.integers(1, 7))]:
        for _ in range(draw(st.integers(1, 9))):
            item = draw(st.integers(0, 6))
            events.append(
                Event(
                    user,
                    f"i{item}" if id_style == "prefixed" else str(10 + item),
                    base_s * 10**6 + draw(st.integers(0, 12)) * step_us,
                    draw(st.sampled_from([1.0, 2.5, 4.0, 5.0])),
                )
            )
    repeats = draw(st.lists(st.tuples(st.integers(0, 10**6), st.booleans()), max_size=6))
    for k, same_rating in repeats:  # an exact duplicate (same user, item, time), maybe another rating
        e = events[k % len(events)]
        events.append(Event(e.user, e.item, e.t_us, e.rating if same_rating else 3.0))
    for k in draw(st.lists(st.integers(0, 10**6), max_size=2)):
        e = events[k % len(events)]
        events.append(Event(e.user, None, e.t_us + 1, e.rating))
    order = draw(st.permutations(range(len(events))))
    return [events[k] for k in order]


def reference(events: list[Event]) -> tuple[dict[str, list[Event]], dict[str, int]]:
    """Every kept user's events in leave-one-out order (time, then file order) and the removal counts."""
    removed = dict.fromkeys(
        ["bad_line", "missing_value", "duplicate", "rating_threshold", "too_short", "k_core"], 0
    )
    seen, per_user = set(), {}
    for e in events:  # file order
        if e.item is None:
            removed["missing_value"] += 1
        elif (e.user, e.item, e.t_us) in seen:
            removed["duplicate"] += 1
        else:
            seen.add((e.user, e.item, e.t_us))
            per_user.setdefault(e.user, []).append(e)
    kept = {}
    for user, evs in per_user.items():
        if len(evs) < 3:
            removed["too_short"] += len(evs)
        elif len(evs) < MIN_USER:
            removed["k_core"] += len(evs)
        else:
            kept[user] = sorted(evs, key=lambda e: e.t_us)  # stable: ties keep file order
    return kept, removed


# --------------------------------------------------------------------------- writing one log many ways


def _exact_units(events: list[Event]) -> list[str]:
    return [u for u, us in UNIT_US.items() if all(e.t_us % us == 0 for e in events)]


def _iso(t_us: int, offset_minutes: int) -> str:
    tz = dt.timezone(dt.timedelta(minutes=offset_minutes))
    t = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=t_us)
    text = t.astimezone(tz).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def time_text(t_us: int, rep: str, k: int) -> str:
    """One time as text: an epoch integer in some unit, decimal seconds, or ISO 8601."""
    if rep in UNIT_US:
        return str(t_us // UNIT_US[rep])
    if rep == "ns":
        return str(t_us * 1000)
    if rep == "decimal":
        return f"{t_us // 10**6}.{t_us % 10**6:06d}"
    return _iso(t_us, 0 if rep == "iso-z" else [120, -330, 0, 545][k % 4])


TEXT_REPS = ["decimal", "ns", "iso-z", "iso-offset"]  # exact at any resolution (+ units: _exact_units)


def write_log(events: list[Event], fmt: str, rep: str, d: Path) -> Path:
    """``events`` as a generic CSV, JSON-lines or Parquet log with times written as ``rep``."""
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["user_id", "item_id", "rating", "timestamp"])
        for k, e in enumerate(events):
            w.writerow([e.user, e.item or "", e.rating, time_text(e.t_us, rep, k)])
        (d / "log.csv").write_text(buf.getvalue())
        return d / "log.csv"
    if fmt == "jsonl":
        lines = []
        for k, e in enumerate(events):
            t = time_text(e.t_us, rep, k)
            value = json.dumps(t) if rep.startswith("iso") else t  # epoch times as JSON numbers
            item = "" if e.item is None and k % 2 else f', "item_id": {json.dumps(e.item)}'  # absent or null
            lines.append(
                f'{{"user_id": {json.dumps(e.user)}{item}, "rating": {e.rating}, "timestamp": {value}}}'
            )
        (d / "log.jsonl").write_text("\n".join(lines) + "\n")
        return d / "log.jsonl"
    assert fmt == "parquet"
    if rep.startswith("timestamp"):  # "timestamp[unit]" or "timestamp[unit,tz]"
        unit, _, tz = rep[len("timestamp[") : -1].partition(",")
        per = {"s": 10**6, "ms": 10**3, "us": 1}
        ints = [e.t_us // per[unit] if unit in per else e.t_us * 1000 for e in events]
        times = pa.array(ints, pa.timestamp(unit, tz=tz or None))
    elif rep in UNIT_US or rep == "ns":
        times = pa.array([int(time_text(e.t_us, rep, k)) for k, e in enumerate(events)], pa.int64())
    else:
        times = pa.array([time_text(e.t_us, rep, k) for k, e in enumerate(events)], pa.string())
    table = pa.table(
        {
            "user_id": [e.user for e in events],
            "item_id": [e.item for e in events],
            "rating": pa.array([e.rating for e in events], pa.float64()),
            "timestamp": times,
        }
    )
    pq.write_table(table, d / "log.parquet")
    return d / "log.parquet"


def representations(events: list[Event], fmt: str) -> list[str]:
    exact = _exact_units(events)
    reps = TEXT_REPS + exact
    if fmt == "parquet":
        reps += [f"timestamp[{u}{tz}]" for u in [*exact, "ns"] for tz in ("", ",UTC", ",Asia/Kolkata")]
    return reps


CFG = ShardsConfig(rating_col="rating", min_user_interactions=MIN_USER, skip_bad_lines=True)


# --------------------------------------------------------------------------- reading shards back


def shard_view(out: Path, unit: str) -> dict[str, dict[str, list[tuple[str, int, float]]]]:
    """{split: {user: [(item id, time in us, rating), ...]}}; train: every record's events, concatenated."""
    items = [it["item_id"] for it in read_items(out)]
    to_us = {"s": 10**6, "ms": 10**3, "us": 1, "ns": None}[unit]
    view: dict[str, dict[str, list]] = {}
    for split in ("train", "valid", "test"):
        loader = ShardLoader(out, split, batch_size=1, num_workers=0, shuffle=False, drop_last=False)
        view[split] = {}
        for [r] in loader:
            times = [t * to_us if to_us else t // 1000 for t in r["timestamps"]]
            events = zip((items[i] for i in r["items"]), times, r["ratings"])
            view[split].setdefault(r["user"], []).extend(events)
    return view


def check_build(events: list[Event], out: Path, manifest: dict) -> None:
    kept, removed = reference(events)
    rows = manifest["rows"]
    assert rows["removed"] == removed
    assert rows["read"] == len(events) == rows["kept"] + sum(rows["removed"].values())
    assert rows["kept"] == manifest["num_interactions"] == sum(len(v) for v in kept.values())
    view = shard_view(out, manifest["timestamp_unit"])
    assert set(view["test"]) == set(view["valid"]) == set(kept)
    for user, evs in kept.items():
        order = [(e.item, e.t_us, e.rating) for e in evs]  # duplicates: the first row's rating
        assert view["test"][user] == order  # the whole history fits the window: the full order
        assert view["valid"][user] == order[:-1]
        train = view["train"].get(user, [])
        # No leak: the valid and test events (item and time: unique per user once duplicates are
        # dropped) are in no training record; training holds exactly the events before them.
        assert not {order[-1], order[-2]} & set(train)
        assert set(train) == set(order[:-2]) if len(order) > 3 else train == []


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@settings(COMMON, max_examples=EXAMPLES_SPLIT)
@given(events=logs(), data=st.data())
def test_split_tells_the_truth(fmt, events, data, tmp_path_factory):
    """Targets by full-resolution time then file order, no leak, counts reconcile, rebuild identical."""
    rep = data.draw(st.sampled_from(representations(events, fmt)), label="rep")
    d = tmp_path_factory.mktemp("p")
    src = write_log(events, fmt, rep, d / "src")
    if not reference(events)[0]:  # no user has enough events: one clear error, nothing written
        with pytest.raises(DataError, match="no interactions"):
            build_shards(src, d / "out", CFG)
        return
    manifest = build_shards(src, d / "out", CFG)
    check_build(events, d / "out", manifest)
    assert build_shards(src, d / "again", CFG)["fingerprint"] == manifest["fingerprint"]


@settings(COMMON, max_examples=EXAMPLES_FORMATS)
@given(events=logs(), data=st.data())
def test_same_events_same_shards_in_every_format(events, data, tmp_path_factory):
    """CSV, JSON lines and Parquet, each with its times written another way: byte-identical shards."""
    if not reference(events)[0]:
        return
    d = tmp_path_factory.mktemp("f")
    fingerprints = {}
    for fmt in ("csv", "jsonl", "parquet"):
        rep = data.draw(st.sampled_from(representations(events, fmt)), label=f"{fmt} rep")
        manifest = build_shards(write_log(events, fmt, rep, d / fmt), d / f"out-{fmt}", CFG)
        fingerprints[f"{fmt}:{rep}"] = manifest["fingerprint"]
    check_build(events, d / "out-csv", manifest)
    assert len(set(fingerprints.values())) == 1, fingerprints
