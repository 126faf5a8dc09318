"""data_shards: readers of every format, filters, leave-one-out, shard build, verify, and ShardLoader
(equal batch counts, exactly-once coverage, exact resume, corruption) on small synthetic logs and one
build of the bundled ml-latest-small sample."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from configs import ConfigError, CorruptShardError, DataError, ShardsConfig
from data_shards import reader as reader_mod
from data_shards.build import build_shards
from data_shards.manifest import load_manifest, read_items, verify
from data_shards.reader import ShardLoader
from data_shards.split import train_windows
from launcher.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "ml-latest-small.zip"


# --------------------------------------------------------------------------- synthetic logs


def synthetic_log(n_users: int = 12, n_items: int = 15, seed: int = 0) -> pd.DataFrame:
    """Interactions in file order (users interleaved), 6..20 per user, some equal timestamps, no exact
    duplicates (same user, item and timestamp: test_duplicate_rows has those)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(6, 21))
        times = np.sort(rng.integers(1_000_000, 1_000_040, size=n))  # narrow range: ties happen
        for i, t in zip(rng.integers(1, n_items + 1, size=n), times):
            rows.append((f"{u + 1}", f"{i}", float(rng.integers(1, 11)) / 2, int(t)))
    rows = [rows[i] for i in rng.permutation(len(rows))]  # file order != time order
    log = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    return log.drop_duplicates(["user", "item", "timestamp"]).reset_index(drop=True)


def expected_targets(log: pd.DataFrame) -> tuple[dict[str, str], dict[str, str]]:
    """Leave-one-out targets by plain pandas: stable sort by time keeps file order among ties."""
    ordered = log.sort_values("timestamp", kind="stable").groupby("user", sort=False)["item"]
    return ordered.nth(-1).groupby(log["user"]).first().to_dict(), ordered.nth(-2).groupby(
        log["user"]
    ).first().to_dict()


def targets_from_shards(out: Path, split: str) -> dict[str, str]:
    items = read_items(out)
    loader = ShardLoader(out, split, batch_size=1, num_workers=0)
    return {r["user"]: items[r["items"][-1]]["item_id"] for batch in loader for r in batch}


def title(i: str) -> str:
    return f"Movie {i}, the sequel é"


def write_format(fmt: str, log: pd.DataFrame, d: Path) -> tuple[Path, dict]:
    """Write ``log`` in ``fmt`` under d; (input path, build kwargs)."""
    d.mkdir(parents=True, exist_ok=True)
    items = sorted(log["item"].unique(), key=int)
    if fmt == "ml-100k":
        log.to_csv(d / "u.data", sep="\t", header=False, index=False)
        flags = "|".join(["0"] * 8 + ["1"] + ["0"] * 10)
        (d / "u.item").write_bytes(
            "".join(f"{i}|{title(i)}|01-Jan-1995||http://x|{flags}\n" for i in items).encode("latin-1")
        )
    elif fmt == "ml-1m":
        (d / "ratings.dat").write_text(
            "".join(f"{u}::{i}::{r:g}::{t}\n" for u, i, r, t in log.itertuples(index=False))
        )
        (d / "movies.dat").write_bytes("".join(f"{i}::{title(i)}::Drama\n" for i in items).encode("latin-1"))
    elif fmt == "ml-latest":
        log.set_axis(["userId", "movieId", "rating", "timestamp"], axis=1).to_csv(
            d / "ratings.csv", index=False
        )
        pd.DataFrame({"movieId": items, "title": [title(i) for i in items], "genres": "Drama"}).to_csv(
            d / "movies.csv", index=False
        )
    elif fmt == "amazon-2018":
        with gzip.open(d / "Books_5.json.gz", "wt") as f:
            for u, i, r, t in log.itertuples(index=False):
                f.write(
                    json.dumps(
                        {
                            "reviewerID": f"A{u}",
                            "asin": f"B{i}",
                            "overall": r,
                            "unixReviewTime": t,
                            "reviewText": "ok",
                        }
                    )
                    + "\n"
                )
        (d / "meta_Books.json").write_text(
            "".join(json.dumps({"asin": f"B{i}", "title": title(i)}) + "\n" for i in items)
        )
    elif fmt == "amazon-2023":
        (d / "Books.jsonl").write_text(
            "".join(
                json.dumps({"user_id": f"A{u}", "parent_asin": f"B{i}", "rating": r, "timestamp": t * 1000})
                + "\n"
                for u, i, r, t in log.itertuples(index=False)
            )
        )
        (d / "meta_Books.jsonl").write_text(
            "".join(json.dumps({"parent_asin": f"B{i}", "title": title(i)}) + "\n" for i in items)
        )
    elif fmt in ("csv", "parquet"):
        frame = log.set_axis(["who", "what", "stars", "when"], axis=1).assign(name=log["item"].map(title))
        if fmt == "csv":
            frame.to_csv(d / "events.csv", index=False)
        else:
            frame.to_parquet(d / "events.parquet")
        return d, dict(user_col="who", item_col="what", rating_col="stars", time_col="when", title_col="name")
    return d, {}


@pytest.fixture(scope="session")
def sample_dir(sample_shards) -> Path:
    """The bundled sample built once through the CLI, straight from the zip (tests/conftest.py)."""
    return sample_shards


@pytest.fixture(scope="session")
def multi_dir(tmp_path_factory) -> Path:
    """A synthetic build with many small shards and members (reader tests)."""
    d = tmp_path_factory.mktemp("multi")
    log = synthetic_log(n_users=40, n_items=30, seed=1)
    src, _ = write_format("ml-latest", log, d / "src")
    out = d / "shards"
    build_shards(src, out, ShardsConfig(max_history=2, records_per_member=2, max_shard_mb=20480 / 2**20))
    return out


# --------------------------------------------------------------------------- bundled sample


def test_sample_manifest_counts(sample_dir):
    m = load_manifest(sample_dir)
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (610, 9724, 100836)
    assert m["filters"]["removed_interactions"] == 0 and m["source"]["metadata_items"] == 9742
    assert m["rating_levels"] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    assert m["splits"]["valid"]["records"] == m["splits"]["test"]["records"] == 610
    items = read_items(sample_dir)
    assert items[0]["item_id"] == "1" and items[0]["title"] == "Toy Story (1995)"
    assert sum(it["count"] for it in items) == 100836
    assert verify(sample_dir)[1] == []


def test_sample_leave_one_out_matches_pandas(sample_dir):
    with zipfile.ZipFile(SAMPLE) as zf:
        log = pd.read_csv(zf.open("ml-latest-small/ratings.csv"), dtype={"userId": str, "movieId": str})
    log = log.rename(columns={"userId": "user", "movieId": "item"})
    test, valid = expected_targets(log)
    assert targets_from_shards(sample_dir, "test") == test
    assert targets_from_shards(sample_dir, "valid") == valid


def test_sample_train_windows_rebuild_history(sample_dir):
    """Windows overlap by one item: stitched together they are exactly the history before valid/test.
    They are written in one random order over all users, so consecutive records mix users."""
    items = read_items(sample_dir)
    windows: dict[str, list] = {}
    loader = ShardLoader(sample_dir, "train", batch_size=1, num_workers=0, shuffle=False)
    assert len(loader) == load_manifest(sample_dir)["splits"]["train"]["records"]
    users_in_order = []
    for [r] in loader:
        assert 2 <= len(r["items"]) <= 51 and len(r["ratings"]) == len(r["timestamps"]) == len(r["items"])
        windows.setdefault(r["user"], []).append(r["items"])
        users_in_order.append(r["user"])
    assert len(set(users_in_order[:100])) > 50  # not written user by user
    history: dict[str, list] = {}
    for user, ws in windows.items():  # a user rates an item once: each window's last item starts the next
        by_first = {w[0]: w for w in ws}
        (first,) = [w for w in ws if w[0] not in {v[-1] for v in ws}]
        seq = list(first)
        while seq[-1] in by_first:
            seq.extend(by_first[seq[-1]][1:])
        assert len(seq) == sum(len(w) for w in ws) - len(ws) + 1
        history[user] = seq
    with zipfile.ZipFile(SAMPLE) as zf:
        log = pd.read_csv(zf.open("ml-latest-small/ratings.csv"), dtype={"userId": str, "movieId": str})
    index = {it["item_id"]: it["index"] for it in items}
    for user, group in log.sort_values("timestamp", kind="stable").groupby("userId"):
        assert history[user] == [index[i] for i in group["movieId"]][:-2]


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "fmt", ["ml-100k", "ml-1m", "ml-latest", "amazon-2018", "amazon-2023", "csv", "parquet"]
)
def test_each_format(fmt, tmp_path):
    log = synthetic_log()
    src, kwargs = write_format(fmt, log, tmp_path / "src")
    m = build_shards(src, tmp_path / "out", ShardsConfig(max_history=3, **kwargs))
    assert m["source"]["format"] == fmt
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (12, log["item"].nunique(), len(log))
    items = read_items(tmp_path / "out")
    assert all(it["title"] == title(it["item_id"].lstrip("B")) for it in items)
    if fmt.startswith("amazon"):  # ids carry a prefix there
        log = log.assign(user="A" + log["user"], item="B" + log["item"])
    test, valid = expected_targets(log)
    assert targets_from_shards(tmp_path / "out", "test") == test
    assert targets_from_shards(tmp_path / "out", "valid") == valid


def test_single_file_and_zip_inputs(tmp_path):
    log = synthetic_log()
    src, _ = write_format("ml-1m", log, tmp_path / "src")
    m = build_shards(src / "ratings.dat", tmp_path / "single")
    assert m["source"]["format"] == "ml-1m" and m["source"]["metadata_items"] == log["item"].nunique()
    with zipfile.ZipFile(tmp_path / "logs.zip", "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"ml-1m/{f.name}")
    m2 = build_shards(tmp_path / "logs.zip", tmp_path / "zipped")
    assert m2["fingerprint"] == m["fingerprint"]  # same data, byte-identical shards


def test_tie_break_is_file_order(tmp_path):
    rows = [("1", "10", 1), ("1", "11", 5), ("1", "12", 5), ("1", "13", 5), ("1", "14", 1)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(tmp_path / "log.csv", index=False)
    build_shards(tmp_path / "log.csv", tmp_path / "out", ShardsConfig(min_user_interactions=3))
    assert targets_from_shards(tmp_path / "out", "test") == {"1": "13"}
    assert targets_from_shards(tmp_path / "out", "valid") == {"1": "12"}
    [[rec]] = list(ShardLoader(tmp_path / "out", "test", batch_size=1, num_workers=0))
    items = [it["item_id"] for it in read_items(tmp_path / "out")]
    assert [items[i] for i in rec["items"]] == ["10", "14", "11", "12", "13"] and rec["ratings"] == [1.0] * 5


def test_order_keeps_second_resolution_of_epoch_timestamps(tmp_path):
    """Events seconds apart near 1e9 s stay in time order (a float32 timestamp, 64 s resolution there,
    would tie them and fall back to file order: how RecBole reorders MovieLens, docs/RESULTS.md)."""
    t0 = 964_984_100
    rows = [
        ("1", "10", t0),
        ("1", "11", t0 + 12),
        ("1", "12", t0 + 53),
        ("1", "14", t0 + 76),
        ("1", "13", t0 + 69),
    ]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(tmp_path / "log.csv", index=False)
    build_shards(tmp_path / "log.csv", tmp_path / "out", ShardsConfig(min_user_interactions=3))
    assert targets_from_shards(tmp_path / "out", "valid") == {"1": "13"}
    assert targets_from_shards(tmp_path / "out", "test") == {"1": "14"}


@pytest.mark.parametrize("n,prefix", [(1, False), (2, False), (5, False), (6, False), (17, False), (7, True)])
def test_train_windows_supervise_every_position_once(n, prefix):
    windows = train_windows(n, max_history=4, prefix_records=prefix)
    targets = (
        [t for lo, hi in windows for t in range(lo + 1, hi)] if not prefix else [hi - 1 for _, hi in windows]
    )
    assert sorted(targets) == list(range(1, n)) and all(hi - lo <= 5 for lo, hi in windows)


def test_filters_k_core_and_threshold(tmp_path):
    log = synthetic_log(n_users=20, seed=3)
    src, _ = write_format("ml-latest", log, tmp_path / "src")
    m = build_shards(
        src,
        tmp_path / "out",
        ShardsConfig(min_user_interactions=8, min_item_interactions=4, rating_threshold=2.0),
    )
    kept = log[log["rating"] >= 2.0]
    while True:  # reference k-core
        ok = kept.groupby("user")["item"].transform("size").ge(8) & kept.groupby("item")["user"].transform(
            "size"
        ).ge(4)
        if ok.all():
            break
        kept = kept[ok]
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (
        kept["user"].nunique(),
        kept["item"].nunique(),
        len(kept),
    )
    assert m["filters"]["removed_interactions"] == len(log) - len(kept)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name,content,expected",
    [
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,2,4.0,10\n1,3,4.0,11,99\n",
            "ratings.csv: line 3: expected 4 fields",
        ),
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,2,4.0,10\n1,3,good,11\n",
            "ratings.csv: line 3: field 'rating'",
        ),
        (
            "ratings.csv",
            "userId,movieId,stars,timestamp\n1,2,4.0,10\n",
            "ratings.csv: line 1: missing column 'rating'",
        ),
        ("ratings.dat", "1::2::4::10\n1::3::4\n", "ratings.dat: line 2: field 'timestamp'"),
        (
            "r.jsonl",
            '{"user_id": "a", "parent_asin": "b", "rating": 1, "timestamp": 1}\n{"user_id": "a"\n',
            "r.jsonl: line 2: not valid JSON",
        ),
        (
            "r.jsonl",
            '{"user_id": "a", "parent_asin": "b", "rating": 1, "timestamp": 1}\n{"user_id": "a", "rating": 1}\n',
            "r.jsonl: line 2: field 'parent_asin': missing value",
        ),
        ("notes.txt", "hello\n", "cannot find a known format"),
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,2,4.0,10\n",
            "no interactions left after filtering",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, name, content, expected):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_text(content)
    assert main(["shards", "build", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == [
        "in"
    ]  # nothing left behind


def test_skip_bad_lines_counts(tmp_path, capsys):
    lines = (
        ["userId,movieId,rating,timestamp"]
        + [f"1,{i},4.0,{i}" for i in range(6)]
        + ["1,7,4.0,7,extra", "1,8,x,8", ""]
    )
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert (
        main(["shards", "build", str(tmp_path / "ratings.csv"), "--out", str(out), "--skip-bad-lines"]) == 0
    )
    assert "skipped 2 malformed lines" in capsys.readouterr().err
    assert load_manifest(out)["num_interactions"] == 6 and load_manifest(out)["source"]["skipped_lines"] == 2


def test_existing_output_needs_force(tmp_path, capsys):
    src, _ = write_format("ml-latest", synthetic_log(), tmp_path / "src")
    out = tmp_path / "out"
    args = ["shards", "build", str(src), "--out", str(out)]
    assert main(args) == 0 and main(args) == 2
    assert "force" in capsys.readouterr().err
    assert main([*args, "--force", "--max-history", "2"]) == 0
    assert load_manifest(out)["max_history"] == 2 and "--max-history 2" in load_manifest(out)["command"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp/old directories left


# --------------------------------------------------------------------------- issue 14: the split tells the truth


def split_view(out: Path) -> dict[str, dict[str, tuple[list[str], list[int]]]]:
    """{split: {user: (item ids, timestamps)}} of the valid and test records (eval records: target last)."""
    items = [it["item_id"] for it in read_items(out)]
    view: dict[str, dict] = {}
    for split in ("valid", "test"):
        loader = ShardLoader(out, split, batch_size=1, num_workers=0, shuffle=False)
        view[split] = {r["user"]: ([items[i] for i in r["items"]], r["timestamps"]) for [r] in loader}
    return view


# u1's events, the last two in the file in reverse time order and 0.8 s apart: i5 at .100, i6 at .900.
SUBSECOND = [("i1", 0, 0), ("i2", 10, 0), ("i3", 20, 0), ("i4", 30, 0), ("i6", 40, 900), ("i5", 40, 100)]
T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


def _iso(sec: int, ms: int, offset_hours: int = 0) -> str:
    import datetime as dt

    tz = dt.timezone(dt.timedelta(hours=offset_hours))
    t = dt.datetime.fromtimestamp(T0 + sec, tz) + dt.timedelta(milliseconds=ms)
    text = t.isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if offset_hours == 0 else text


def write_subsecond(kind: str, d: Path) -> tuple[Path, dict]:
    """SUBSECOND written as ``kind``; (input path, ShardsConfig kwargs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    ms = [(T0 + sec) * 1000 + frac for _, sec, frac in SUBSECOND]
    items = [i for i, _, _ in SUBSECOND]
    text = {
        "decimal": [f"{T0 + sec}.{frac:03d}" for _, sec, frac in SUBSECOND],
        "iso-z": [_iso(sec, frac) for _, sec, frac in SUBSECOND],
        "iso-offset": [_iso(sec, frac, 2 if n % 2 else -5) for n, (_, sec, frac) in enumerate(SUBSECOND)],
        "ms": [str(t) for t in ms],
        "us": [str(t * 1000) for t in ms],
        "ns": [str(t * 1_000_000) for t in ms],
    }
    fmt, _, rep = kind.partition(":")
    if fmt == "csv":
        lines = ["user_id,item_id,timestamp"] + [f"u1,{i},{t}" for i, t in zip(items, text[rep])]
        (d / "log.csv").write_text("\n".join(lines) + "\n")
        return d / "log.csv", {}
    if fmt == "jsonl":  # numbers written as JSON numbers (not strings), ISO times as strings
        value = (lambda t: t) if rep in ("decimal", "ms", "us", "ns") else json.dumps
        lines = [
            f'{{"user_id": "u1", "item_id": "{i}", "timestamp": {value(t)}}}'
            for i, t in zip(items, text[rep])
        ]
        (d / "events.jsonl").write_text("\n".join(lines) + "\n")
        return d / "events.jsonl", {}
    if fmt == "amazon-2018":  # unixReviewTime as a JSON number with a fraction
        lines = [
            f'{{"reviewerID": "u1", "asin": "{i}", "overall": 1.0, "unixReviewTime": {t}}}'
            for i, t in zip(items, text["decimal"])
        ]
        (d / "Books_5.json").write_text("\n".join(lines) + "\n")
        return d / "Books_5.json", {}
    if fmt == "amazon-2023":  # epoch milliseconds
        lines = [
            f'{{"user_id": "u1", "parent_asin": "{i}", "rating": 1.0, "timestamp": {t}}}'
            for i, t in zip(items, ms)
        ]
        (d / "Books.jsonl").write_text("\n".join(lines) + "\n")
        return d / "Books.jsonl", {}
    assert fmt == "parquet"
    if rep.startswith("timestamp"):  # timestamp[unit] or timestamp[unit,tz]
        unit, _, tz = rep[len("timestamp[") : -1].partition(",")
        scale = {"ms": 1, "us": 1000, "ns": 1_000_000}[unit]
        times = pa.array([t * scale for t in ms], pa.timestamp(unit, tz=tz or None))
    elif rep == "float":
        times = pa.array([t / 1000 for t in ms], pa.float64())
    else:
        times = pa.array(ms, pa.int64())
    pq.write_table(
        pa.table({"user_id": ["u1"] * len(items), "item_id": items, "timestamp": times}), d / "e.parquet"
    )
    return d / "e.parquet", {}


SUBSECOND_KINDS = {  # kind -> (source.time_format, source.time_unit)
    "csv:decimal": ("epoch decimal", "s"),
    "csv:iso-z": ("iso8601", None),
    "csv:iso-offset": ("iso8601", None),
    "csv:ms": ("epoch", "ms"),
    "csv:us": ("epoch", "us"),
    "csv:ns": ("epoch", "ns"),
    "jsonl:decimal": ("epoch decimal", "s"),
    "jsonl:ms": ("epoch", "ms"),
    "jsonl:iso-offset": ("iso8601", None),
    "amazon-2018:": ("epoch decimal", "s"),
    "amazon-2023:": ("epoch", "ms"),
    "parquet:timestamp[ms,UTC]": ("parquet timestamp[ms, tz=UTC]", "ms"),
    "parquet:timestamp[us]": ("parquet timestamp[us] (read as UTC)", "us"),
    "parquet:timestamp[ns,Europe/Berlin]": ("parquet timestamp[ns, tz=Europe/Berlin]", "ns"),
    "parquet:float": ("epoch decimal", "s"),
    "parquet:int": ("epoch", "ms"),
}


@pytest.fixture(scope="module")
def subsecond_fingerprints() -> dict[str, str]:
    return {}


@pytest.mark.parametrize("kind", list(SUBSECOND_KINDS))
def test_subsecond_timestamps_keep_their_order(kind, tmp_path, subsecond_fingerprints):
    """i6 (.900) is written before i5 (.100) in the same second: floored to seconds they would tie and
    file order would make i6 the valid target. Every way of writing the times orders them by time, and
    the shards are byte-identical whichever way it was."""
    src, kwargs = write_subsecond(kind, tmp_path / "src")
    m = build_shards(src, tmp_path / "out", ShardsConfig(min_user_interactions=3, **kwargs))
    view = split_view(tmp_path / "out")
    assert view["valid"]["u1"][0] == ["i1", "i2", "i3", "i4", "i5"]
    assert view["test"]["u1"][0] == ["i1", "i2", "i3", "i4", "i5", "i6"]
    assert view["test"]["u1"][1][-2:] == [(T0 + 40) * 1000 + 100, (T0 + 40) * 1000 + 900]
    assert all(type(t) is int for t in view["test"]["u1"][1])
    assert m["timestamp_unit"] == "ms"  # the coarsest unit that holds every time exactly
    time_format, time_unit = SUBSECOND_KINDS[kind]
    assert (m["source"]["time_format"], m["source"]["time_unit"]) == (time_format, time_unit)
    subsecond_fingerprints[kind] = m["fingerprint"]
    assert len(set(subsecond_fingerprints.values())) == 1, subsecond_fingerprints


def test_time_unit_from_magnitude_or_setting(tmp_path):
    """Integers below 1e11 are seconds unless shards.time_unit says otherwise; the manifest says which."""
    rows = "".join(f"u1,i{k},{t}\n" for k, t in enumerate([1500, 2500, 3000, 4000]))
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + rows)
    m = build_shards(tmp_path / "log.csv", tmp_path / "a", ShardsConfig(min_user_interactions=3))
    assert m["source"]["time_unit_from"] == "magnitude" and m["timestamp_unit"] == "s"
    assert split_view(tmp_path / "a")["test"]["u1"][1] == [1500, 2500, 3000, 4000]
    m = build_shards(
        tmp_path / "log.csv", tmp_path / "b", ShardsConfig(min_user_interactions=3, time_unit="ms")
    )
    assert m["source"]["time_unit_from"] == "shards.time_unit" and m["timestamp_unit"] == "ms"
    assert split_view(tmp_path / "b")["test"]["u1"][1] == [1500, 2500, 3000, 4000]
    with pytest.raises(ConfigError, match="shards.time_unit"):
        ShardsConfig(time_unit="minutes")


def test_movielens_seconds_stay_exact(sample_dir):
    m = load_manifest(sample_dir)
    assert m["timestamp_unit"] == "s"
    assert {k: m["source"][k] for k in ("time_format", "time_unit", "time_unit_from")} == {
        "time_format": "epoch",
        "time_unit": "s",
        "time_unit_from": "format",
    }
    assert m["rows"] == {
        "read": 100836,
        "kept": 100836,
        "removed": dict.fromkeys(
            ["bad_line", "missing_value", "duplicate", "rating_threshold", "too_short", "k_core"], 0
        ),
        "duplicates_kept": 0,
    }
    with zipfile.ZipFile(SAMPLE) as zf:
        log = pd.read_csv(zf.open("ml-latest-small/ratings.csv"), dtype={"userId": str})
    last = log.sort_values("timestamp", kind="stable").groupby("userId")["timestamp"].last()
    assert {u: ts[-1] for u, (_, ts) in split_view(sample_dir)["test"].items()} == last.to_dict()


DUPLICATES = (
    "user_id,item_id,rating,timestamp\n"
    + "".join(f"u1,i{k},5,{1000 + 10 * k}\n" for k in range(1, 5))
    + "u1,i5,5,1040\n" * 3  # logged three times
    + "u2,i1,4,1000\n" * 5  # one event five times: too short for leave-one-out
    + "".join(f"u3,i{k},3,{2000 + k}\n" for k in range(1, 5))
    + "u3,i4,3,2004\n"  # 4 distinct events + a repeat: below the k-core of 5
)


def test_duplicate_rows_dropped_and_counted(tmp_path):
    (tmp_path / "log.csv").write_text(DUPLICATES)
    m = build_shards(tmp_path / "log.csv", tmp_path / "out", ShardsConfig(rating_col="rating"))
    view = split_view(tmp_path / "out")
    assert view["test"] == {"u1": (["i1", "i2", "i3", "i4", "i5"], [1010, 1020, 1030, 1040, 1040])}
    assert view["valid"]["u1"][0] == ["i1", "i2", "i3", "i4"]
    assert m["rows"]["removed"] == {
        "bad_line": 0,
        "missing_value": 0,
        "duplicate": 2 + 4 + 1,
        "rating_threshold": 0,
        "too_short": 1,  # u2's one distinct event
        "k_core": 4,  # u3's four distinct events (the repeat does not count toward the k-core)
    }
    assert m["rows"]["read"] == 17 and m["rows"]["kept"] == m["num_interactions"] == 5
    train = list(ShardLoader(tmp_path / "out", "train", batch_size=1, num_workers=0))
    assert [r["timestamps"] for [r] in train] == [[1010, 1020, 1030]]  # i5 is no training label


def test_duplicate_rows_keep_counts_distinct_events_in_the_k_core(tmp_path):
    (tmp_path / "log.csv").write_text(DUPLICATES)
    m = build_shards(tmp_path / "log.csv", tmp_path / "out", ShardsConfig(duplicates="keep"))
    assert m["rows"]["duplicates_kept"] == 2  # u1's repeats (u2's and u3's rows went with their users)
    assert m["rows"]["removed"]["duplicate"] == 0 and m["rows"]["removed"]["k_core"] == 5
    assert m["rows"]["removed"]["too_short"] == 5 and m["num_interactions"] == 4 + 3
    assert split_view(tmp_path / "out")["test"]["u1"][0][-3:] == ["i5", "i5", "i5"]


def test_duplicate_rows_error_names_file_line_and_count(tmp_path, capsys):
    (tmp_path / "log.csv").write_text(DUPLICATES)
    args = ["shards", "build", str(tmp_path / "log.csv"), "--out", str(tmp_path / "out")]
    assert main([*args, "shards.duplicates=error"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "log.csv: line 7: duplicate of line 6 (user 'u1', item 'i5'" in err and "7 duplicate rows" in err
    assert main([*args, "shards.duplicates=maybe"]) == 2
    assert "shards.duplicates" in capsys.readouterr().err


def _amazon_lines(n: int = 6) -> bytes:
    return b"".join(
        json.dumps({"reviewerID": "A1", "asin": f"B{k}", "overall": 5.0, "unixReviewTime": 1000 + k}).encode()
        + b"\n"
        for k in range(n)
    )


def test_gzip_named_file_that_is_plain_json_is_read_with_a_notice(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "Books_5.json.gz").write_bytes(_amazon_lines())  # already decompressed
    assert main(["shards", "build", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "Books_5.json.gz: not gzip-compressed" in captured.err and captured.err.count("\n") == 1
    m = load_manifest(tmp_path / "out")
    assert m["num_interactions"] == 6 and "Books_5.json.gz: not gzip-compressed" in m["source"]["notices"][0]
    (tmp_path / "in" / "Books_5.json.gz").write_bytes(gzip.compress(_amazon_lines()))
    assert build_shards(tmp_path / "in", tmp_path / "out2")["fingerprint"] == m["fingerprint"]


def _broken_inputs(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (input path, what the one error line must hold)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir()
    big = _amazon_lines(2000)
    cases = {}

    def put(name: str, rel: str, data: bytes, expected: str) -> None:
        (d / name).mkdir()
        (d / name / rel).write_bytes(data)
        cases[name] = (d / name, expected)

    put("gzip-truncated", "Books_5.json.gz", gzip.compress(big)[:-40], "Books_5.json.gz: truncated gzip data")
    flipped = bytearray(gzip.compress(big))
    flipped[len(flipped) // 2] ^= 0xFF
    put("gzip-damaged", "Books_5.json.gz", bytes(flipped), "Books_5.json.gz: damaged gzip data")
    put(
        "csv-gzip-truncated",
        "events.csv.gz",
        gzip.compress(b"user_id,item_id,timestamp\n" + b"u,i,1\n" * 5000)[:-30],
        "events.csv.gz: truncated gzip data",
    )
    put(
        "csv-encoding",
        "ratings.csv",
        b"userId,movieId,rating,timestamp\n1,2,4,10\n1,\xff\xfe,4,11\n",
        "ratings.csv: line 3: not UTF-8 text",
    )
    put(
        "json-encoding",
        "Books.jsonl",
        _amazon_lines(2) + b'{"reviewerID": "\xff"}\n',
        "Books.jsonl: line 3: not UTF-8 text",
    )
    put(
        "json-syntax",
        "Books.jsonl",
        _amazon_lines(2) + b'{"reviewerID": \n',
        "Books.jsonl: line 3: not valid JSON",
    )
    put("json-array", "Books.jsonl", b"[1, 2]\n", "Books.jsonl: line 1: a JSON list, not an object")
    put("csv-quote", "log.csv", b'user_id,item_id,timestamp\nu,"i,1\n', "log.csv: cannot parse")
    put(
        "csv-fields",
        "log.csv",
        b"user_id,item_id,timestamp\nu,i,1\nu,i,1,2\n",
        "log.csv: line 3: expected 3 fields",
    )
    table = pa.table({"user_id": ["u"] * 50, "item_id": ["i"] * 50, "timestamp": list(range(50))})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    put(
        "parquet-truncated",
        "e.parquet",
        buf.getvalue().to_pybytes()[:-100],
        "e.parquet: not a readable Parquet file",
    )
    put("parquet-text", "e.parquet", b"user_id,item_id\n", "e.parquet: not a readable Parquet file")
    put("zip-not-zip", "logs.zip", b"PK\x03\x04 not really", "logs.zip: not a readable zip archive")
    (d / "zip-crc").mkdir()
    with zipfile.ZipFile(d / "zip-crc" / "logs.zip", "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("ml/ratings.csv", "userId,movieId,rating,timestamp\n" + "1,2,4,10\n" * 50)
    data = bytearray((d / "zip-crc" / "logs.zip").read_bytes())
    data[data.index(b"1,2,4,10") + 3] ^= 0x01  # the stored bytes no longer match their CRC-32
    (d / "zip-crc" / "logs.zip").write_bytes(bytes(data))
    cases["zip-crc"] = (d / "zip-crc" / "logs.zip", "logs.zip/ml/ratings.csv: cannot read (Bad CRC-32")
    for name in ("zip-not-zip",):
        cases[name] = (cases[name][0] / "logs.zip", cases[name][1])
    return cases


BROKEN = [
    "gzip-truncated",
    "gzip-damaged",
    "csv-gzip-truncated",
    "csv-encoding",
    "json-encoding",
    "json-syntax",
    "json-array",
    "csv-quote",
    "csv-fields",
    "parquet-truncated",
    "parquet-text",
    "zip-not-zip",
    "zip-crc",
]


@pytest.fixture(scope="module")
def broken_inputs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _broken_inputs(tmp_path_factory.mktemp("broken") / "in")


@pytest.mark.parametrize("name", BROKEN)
def test_every_read_failure_is_one_line_naming_the_file(name, broken_inputs, tmp_path, capsys):
    src, expected = broken_inputs[name]
    assert main(["shards", "build", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("recgpt shards: error: "), err
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def _missing_value_inputs(d: Path) -> dict[str, Path]:
    """The same log, line/row 3 without its item, as CSV, Parquet and JSON lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("u1", f"i{k}", 1000 + k) for k in range(6)]
    rows[1] = ("u1", None, 1001)
    d.mkdir()
    lines = ["user_id,item_id,timestamp"] + [f"{u},{i or ''},{t}" for u, i, t in rows]
    (d / "log.csv").write_text("\n".join(lines) + "\n")
    (d / "log.jsonl").write_text(
        "".join(json.dumps({"user_id": u, "item_id": i, "timestamp": t}) + "\n" for u, i, t in rows)
    )
    (d / "log2.jsonl").write_text(  # the key absent instead of null
        "".join(
            json.dumps({k: v for k, v in zip(("user_id", "item_id", "timestamp"), r) if v is not None}) + "\n"
            for r in rows
        )
    )
    users, items, times = zip(*rows)
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times}), d / "log.parquet")
    return {name: d / name for name in ("log.csv", "log.jsonl", "log2.jsonl", "log.parquet")}


def test_missing_value_is_the_same_error_or_count_in_every_format(tmp_path, capsys):
    paths = _missing_value_inputs(tmp_path / "in")
    fingerprints = set()
    for name, path in paths.items():
        out = tmp_path / f"out-{name}"
        assert main(["shards", "build", str(path), "--out", str(out), "shards.min_user_interactions=3"]) == 2
        err = capsys.readouterr().err
        where = "row 2" if name.endswith(".parquet") else "line 3" if name.endswith(".csv") else "line 2"
        assert (
            err
            == f"recgpt shards: error: {path}: {where}: field 'item_id': missing value (shards.skip_bad_lines=true skips such lines)\n"
        )
        m = build_shards(path, out, ShardsConfig(min_user_interactions=3, skip_bad_lines=True))
        assert (
            m["rows"]["removed"]["missing_value"] == 1 and m["rows"]["read"] == 6 and m["rows"]["kept"] == 5
        )
        fingerprints.add(m["fingerprint"])
    assert len(fingerprints) == 1


def test_every_removed_row_is_counted_by_reason(tmp_path, capsys):
    lines = [
        "user_id,item_id,rating,timestamp",
        *[f"u1,i{k},4,{100 + k}" for k in range(6)],  # kept
        *[f"u2,i{k},4,{200 + k}" for k in range(6)],  # kept
        "u1,i0,4,100",  # duplicate
        "u1,i9,4,109,extra",  # bad line: a field too many
        "u1,i8,oops,108",  # bad line: rating is not a number
        "u2,,4,300",  # missing value
        "u1,i7,1,107",  # below the rating threshold
        "u3,i1,4,1",  # too short: u3 has 2 events
        "u3,i2,4,2",
        *[f"u4,i{k},4,{400 + k}" for k in range(4)],  # k-core: 4 events < 5
    ]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = [
        "shards",
        "build",
        str(tmp_path / "log.csv"),
        "--out",
        str(out),
        "--skip-bad-lines",
        "--rating-col",
        "rating",
    ]
    assert main([*args, "--rating-threshold", "2"]) == 0
    printed = capsys.readouterr().out
    m = load_manifest(out)
    rows = m["rows"]
    assert rows["removed"] == {
        "bad_line": 2,
        "missing_value": 1,
        "duplicate": 1,
        "rating_threshold": 1,
        "too_short": 2,
        "k_core": 4,
    }
    assert rows["read"] == len(lines) - 1 == rows["kept"] + sum(rows["removed"].values())
    assert rows["kept"] == m["num_interactions"] == 12 and m["source"]["skipped_lines"] == 3
    assert (
        "rows          23 read, 12 kept, 11 removed (2 bad_line, 1 missing_value, 1 duplicate, 1 rating_threshold, 2 too_short, 4 k_core)"
        in printed
    )
    assert m["filters"]["removed_interactions"] == 1 + 2 + 4


def test_ids_keep_their_spelling(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    users = ["007", "007", "007", "7", "7", "7", "7"]
    items = [10.0, 11.0, 12.0, 10.0, None, 12.0, 13.0]  # a float column (a null made pandas write floats)
    times = [1, 2, 3, 1, 2, 3, 4]
    table = pa.table({"user_id": users, "item_id": pa.array(items, pa.float64()), "timestamp": times})
    pq.write_table(table, tmp_path / "e.parquet")
    cfg = ShardsConfig(min_user_interactions=3, skip_bad_lines=True)
    m = build_shards(tmp_path / "e.parquet", tmp_path / "out", cfg)
    assert [it["item_id"] for it in read_items(tmp_path / "out")] == ["10", "11", "12", "13"]
    assert (
        list(split_view(tmp_path / "out")["test"]) == ["007", "7"]
        and m["rows"]["removed"]["missing_value"] == 1
    )
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "e.jsonl").write_text(
        "".join(json.dumps({"user_id": "007", "item_id": k, "timestamp": k}) + "\n" for k in (10, 11, 12))
    )
    build_shards(tmp_path / "j", tmp_path / "out2", ShardsConfig(min_user_interactions=3))
    assert [it["item_id"] for it in read_items(tmp_path / "out2")] == ["10", "11", "12"]
    assert list(split_view(tmp_path / "out2")["test"]) == ["007"]


def test_generic_json_lines(tmp_path):
    """A JSON-lines log that is not Amazon's is read with the generic column mapping, detected from a
    .jsonl/.json name or chosen with shards.format=jsonl."""
    log = synthetic_log()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "events.json").write_text(
        "".join(
            json.dumps({"who": u, "what": i, "stars": r, "when": t}) + "\n"
            for u, i, r, t in log.itertuples(index=False)
        )
    )
    kwargs = dict(user_col="who", item_col="what", rating_col="stars", time_col="when")
    m = build_shards(tmp_path / "in", tmp_path / "out", ShardsConfig(**kwargs))
    assert m["source"]["format"] == "jsonl" and m["num_interactions"] == len(log)
    test, valid = expected_targets(log)
    assert targets_from_shards(tmp_path / "out", "test") == test
    csv_src, csv_kwargs = write_format("csv", log, tmp_path / "csv")
    m_csv = build_shards(csv_src, tmp_path / "out-csv", ShardsConfig(**{**csv_kwargs, "title_col": None}))
    assert m_csv["fingerprint"] == m["fingerprint"]
    (tmp_path / "in" / "events.json").rename(tmp_path / "in" / "meta_events.json")
    m2 = build_shards(tmp_path / "in", tmp_path / "out2", ShardsConfig(format="jsonl", **kwargs))
    assert m2["fingerprint"] == m["fingerprint"]


# --------------------------------------------------------------------------- reader


def _record_key(r: dict) -> str:
    return json.dumps({k: v for k, v in r.items() if k != "pad"}, sort_keys=True)


def _all_records(out: Path, split: str) -> Counter:
    return Counter(
        _record_key(r) for [r] in ShardLoader(out, split, batch_size=1, num_workers=0, shuffle=False)
    )


def test_multi_shard_fixture_is_multi_shard(multi_dir):
    m = load_manifest(multi_dir)
    assert len(m["splits"]["train"]["shards"]) >= 6 and m["records_per_member"] == 2
    assert all(s["bytes"] <= 20480 for split in m["splits"].values() for s in split["shards"])


def test_two_ranks_two_workers_train_equal_and_exactly_once(multi_dir):
    every = _all_records(multi_dir, "train")
    loaders = [
        ShardLoader(multi_dir, "train", rank=r, world_size=2, batch_size=5, seed=7, num_workers=2)
        for r in range(2)
    ]
    batches = [list(ld) for ld in loaders]
    assert (
        len(loaders[0]) == len(loaders[1]) == len(batches[0]) == len(batches[1]) == sum(every.values()) // 10
    )
    seen = Counter(_record_key(r) for b in batches for batch in b for r in batch)
    assert max(seen.values()) == 1 and set(seen) <= set(every)
    assert sum(every.values()) - len(seen) < 10  # only the documented remainder is dropped
    assert all(len(batch) == 5 and not any(r.get("pad") for r in batch) for b in batches for batch in b)
    assert [ld.epoch for ld in loaders] == [1, 1]


@pytest.mark.parametrize("split", ["valid", "test"])
def test_two_ranks_eval_padding_scores_every_user_once(multi_dir, split):
    m = load_manifest(multi_dir)
    loaders = [
        ShardLoader(multi_dir, split, rank=r, world_size=2, batch_size=7, num_workers=2) for r in range(2)
    ]
    batches = [list(ld) for ld in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == -(-m["num_users"] // 14)
    real = [r["uid"] for b in batches for batch in b for r in batch if not r.get("pad")]
    assert sorted(real) == list(range(m["num_users"]))
    assert sum(len(batch) for b in batches for batch in b) == 14 * len(loaders[0])


@pytest.mark.parametrize("n", [1, 5, 13, 10_000])
def test_eval_max_users_reads_exactly_the_first_users(multi_dir, n):
    """``eval.max_users`` N: the eval loaders of 2 ranks (2 workers each) serve the first N users of the
    split in written order, each once, with equal batch counts (a whole split when N exceeds it)."""
    from configs import load_config
    from modeling.data import build_loader

    whole = load_config(None, [f"data.shards={multi_dir}"])
    first = [
        r["uid"]
        for b in build_loader(whole, "valid", batch_size=4, num_workers=0)
        for r in b
        if not r.get("pad")
    ]
    cfg = load_config(None, [f"data.shards={multi_dir}", f"eval.max_users={n}"])
    loaders = [
        build_loader(cfg, "valid", rank=r, world_size=2, batch_size=3, num_workers=2) for r in range(2)
    ]
    batches = [list(ld) for ld in loaders]
    want = first[:n]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == -(-len(want) // 6)
    assert [r["uid"] for b in batches for batch in b for r in batch if not r.get("pad")] == want
    # Training batches are never cut by it; 0 is refused with the key named.
    assert len(build_loader(cfg, "train", batch_size=4, num_workers=0)) == len(
        build_loader(whole, "train", batch_size=4, num_workers=0)
    )
    with pytest.raises(ConfigError, match="eval.max_users"):
        load_config(None, ["eval.max_users=0"])


def test_order_depends_on_seed_and_epoch_only(multi_dir):
    def order(seed, epoch, workers):
        ld = ShardLoader(multi_dir, "train", batch_size=4, seed=seed, num_workers=workers, epoch=epoch)
        return [_record_key(r) for batch in ld for r in batch]

    base = order(1, 0, 0)
    assert order(1, 0, 2) == base  # num_workers does not change the sequence
    assert order(2, 0, 0) != base and order(1, 1, 0) != base
    ld = ShardLoader(multi_dir, "train", batch_size=4, seed=1, num_workers=0)
    list(ld)
    assert [_record_key(r) for batch in ld for r in batch] == order(1, 1, 0)  # iterating again = next epoch


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_resume_equals_uninterrupted(multi_dir, k):
    kw = dict(split="train", rank=1, world_size=2, batch_size=3, seed=5, num_workers=2, prefetch_factor=2)
    full = [_record_key(r) for batch in ShardLoader(multi_dir, **kw) for r in batch]
    first = ShardLoader(multi_dir, **kw)
    it = iter(first)
    for _ in range(k):
        next(it)  # workers have prefetched further; only these k count
    state = json.loads(json.dumps(first.state_dict()))
    del it
    assert state["batch"] == k and state["epoch"] == 0
    resumed = ShardLoader(multi_dir, **kw)
    resumed.load_state_dict(state)
    rest = [_record_key(r) for batch in resumed for r in batch]
    assert rest == full[k * 3 :]
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batch"] == 0


def test_resume_reads_at_most_the_current_shard(multi_dir, monkeypatch):
    reads = []
    original = reader_mod.read_shard
    monkeypatch.setattr(reader_mod, "read_shard", lambda url, *a: reads.append(url) or original(url, *a))
    ld = ShardLoader(multi_dir, "train", batch_size=3, num_workers=0)
    n = len(ld)
    ld.load_state_dict({**ld.state_dict(), "batch": n - 1})
    assert len(list(ld)) == 1 and len(reads) <= 2  # the last batch may straddle two shards
    assert len(load_manifest(multi_dir)["splits"]["train"]["shards"]) > 4


def test_foreign_state_refused(multi_dir, sample_dir):
    ld = ShardLoader(multi_dir, "train", world_size=2, batch_size=3, num_workers=0)
    state = ld.state_dict()
    other = ShardLoader(sample_dir, "train", world_size=2, batch_size=3, num_workers=0)
    with pytest.raises(DataError, match="fingerprint"):
        other.load_state_dict(state)
    for key, value in (("world_size", 4), ("batch_size", 5), ("seed", 9)):
        with pytest.raises(DataError, match=key):
            ld.load_state_dict({**state, key: value})


def test_too_few_records_for_one_batch(multi_dir):
    with pytest.raises(DataError, match="fewer than world_size x batch_size"):
        ShardLoader(multi_dir, "train", world_size=2, batch_size=10_000)


def test_pipe_url(multi_dir):
    direct = [_record_key(r) for b in ShardLoader(multi_dir, "valid", batch_size=4, num_workers=0) for r in b]
    piped = ShardLoader(f"pipe:cat {multi_dir}/{{}}", "valid", batch_size=4, num_workers=0)
    assert [_record_key(r) for b in piped for r in b] == direct


# --------------------------------------------------------------------------- corruption


@pytest.fixture
def damaged(multi_dir, tmp_path) -> tuple[Path, str]:
    """A copy of the multi-shard build with one train shard truncated and one with a flipped byte."""
    out = tmp_path / "damaged"
    shutil.copytree(multi_dir, out)
    shards = load_manifest(out)["splits"]["train"]["shards"]
    truncated, flipped = out / shards[1]["path"], out / shards[2]["path"]
    truncated.write_bytes(truncated.read_bytes()[:700])
    data = bytearray(flipped.read_bytes())
    data[600] ^= 0x01
    flipped.write_bytes(bytes(data))
    return out, shards[1]["path"], shards[2]["path"]


def test_verify_names_each_bad_shard(damaged, capsys, sample_dir):
    out, truncated, flipped = damaged
    assert main(["shards", "verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert truncated in printed and flipped in printed and printed.count("BAD") == 2
    assert main(["shards", "verify", str(sample_dir)]) == 0


def test_reader_stops_at_corrupt_shard(damaged):
    out, truncated, flipped = damaged
    with pytest.raises(CorruptShardError) as err:
        list(ShardLoader(out, "train", batch_size=2, num_workers=2, shuffle=False))
    assert truncated in str(err.value) and "\n" not in str(err.value)


def test_reader_tolerates_corrupt_shards_with_equal_batch_counts(damaged, multi_dir, caplog):
    out, *_ = damaged
    with caplog.at_level(logging.WARNING, logger="data_shards.reader"):
        batches = [
            list(
                ShardLoader(
                    out, "train", rank=r, world_size=2, batch_size=4, num_workers=0, corrupt_tolerance=2
                )
            )
            for r in range(2)
        ]
    clean = [
        list(ShardLoader(multi_dir, "train", rank=r, world_size=2, batch_size=4, num_workers=0))
        for r in range(2)
    ]
    assert [len(b) for b in batches] == [len(b) for b in clean]
    assert all(len(batch) == 4 for b in batches for batch in b)
    lost = sum(s["records"] for s in load_manifest(out)["splits"]["train"]["shards"][1:3])
    padded = sum(r.get("pad", False) for b in batches for batch in b for r in batch)
    assert 0 < padded <= lost
    assert "skipping corrupt shard" in caplog.text
    with pytest.raises(CorruptShardError):  # tolerance 1 < 2 corrupt shards
        list(ShardLoader(out, "train", batch_size=4, num_workers=0, corrupt_tolerance=1))


@pytest.mark.parametrize("n,stride", [(17, 1), (17, 2), (30, 3), (3, 2)])
def test_overlapping_windows_cover_every_target_with_full_history(n, stride):
    windows = train_windows(n, max_history=4, stride=stride)
    targets = {t for lo, hi in windows for t in range(lo + 1, hi)}
    assert targets == set(range(1, n)) and all(hi - lo <= 5 for lo, hi in windows)
    assert windows[-1][1] == n and [hi for _, hi in windows] == sorted({hi for _, hi in windows})
    # Some window ends fewer than `stride` items after each target, so the target is predicted at least
    # once from max_history - (stride - 1) earlier items (the full history when stride is 1).
    for t in range(5, n):
        assert any(lo <= t - (4 - (stride - 1)) and t < hi for lo, hi in windows)


def test_objective_new_supervises_each_target_once(sample_dir, tmp_path):
    """Over the overlapping windows of a stride-10 build, ``first_new_target`` marks every training
    target exactly once, in the newest window that holds it (the longest history)."""
    out = tmp_path / "s10"
    assert main(["shards", "build", str(SAMPLE), "--out", str(out), "--window-stride", "10"]) == 0
    seen: dict[tuple[str, int], int] = {}
    windows = 0
    for batch in ShardLoader(out, "train", batch_size=64, num_workers=0, shuffle=False, drop_last=False):
        for rec in batch:
            if rec.get("pad"):
                continue
            windows += 1
            first = rec["first_new_target"]
            assert 1 <= first < len(rec["items"])
            for j in range(first, len(rec["items"])):
                key = (rec["user"], rec["items"][j])  # a user rates an item once
                seen[key] = seen.get(key, 0) + 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert windows == manifest["splits"]["train"]["records"]
    # Every training target once: all interactions but each user's first, valid and test ones.
    assert len(seen) == manifest["num_interactions"] - 3 * manifest["num_users"]
    assert set(seen.values()) == {1}


# --------------------------------------------------------------------------- academic sequence files


def _sequences(log: pd.DataFrame) -> dict[str, list[str]]:
    """Each user's items in time order (file order among ties), as the academic files list them."""
    ordered = log.sort_values("timestamp", kind="stable")
    return {u: list(g["item"]) for u, g in ordered.groupby("user", sort=False)}


@pytest.mark.parametrize("fmt", ["s3rec", "sasrec"])
def test_sequence_files_are_read_in_order_and_detected(fmt, tmp_path):
    """``user item item …`` per line (S3-Rec) and ``user item`` per line (SASRec): the order is the
    time; the build equals the CSV build of the same log (same users, items, records, targets)."""
    log = synthetic_log()
    seqs = _sequences(log)
    src = tmp_path / "data.txt"
    if fmt == "s3rec":
        src.write_text("".join(f"{u} {' '.join(items)}\n" for u, items in seqs.items()))
    else:
        src.write_text("".join(f"{u} {i}\n" for u, items in seqs.items() for i in items))
    m = build_shards(src, tmp_path / "out", ShardsConfig(max_history=3))  # format detected
    assert m["source"]["format"] == fmt
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (12, log["item"].nunique(), len(log))
    test = {u: items[-1] for u, items in seqs.items()}
    valid = {u: items[-2] for u, items in seqs.items()}
    assert targets_from_shards(tmp_path / "out", "test") == test
    assert targets_from_shards(tmp_path / "out", "valid") == valid
    items = read_items(tmp_path / "out")
    loader = ShardLoader(tmp_path / "out", "test", batch_size=1, num_workers=0)
    for batch in loader:  # the history window in the file's order; every earlier item masked
        for r in batch:
            assert [items[i]["item_id"] for i in r["items"]] == seqs[r["user"]][-4:]
            assert {items[i]["item_id"] for i in r["seen"]} == set(seqs[r["user"]][:-1])


def test_sequence_file_errors_name_the_line(tmp_path):
    ambiguous = tmp_path / "a" / "pairs.txt"
    ambiguous.parent.mkdir()
    ambiguous.write_text("1 10\n2 11\n3 12\n")  # every user once: sequences of one item, or pairs?
    with pytest.raises(DataError, match="set shards.format=s3rec or sasrec"):
        build_shards(ambiguous, tmp_path / "o1", ShardsConfig())
    bad = tmp_path / "b" / "pairs.txt"
    bad.parent.mkdir()
    bad.write_text("1 10\n1 11\n1 12 13\n")
    with pytest.raises(DataError, match=r"pairs.txt: line 3: 3 field\(s\), sasrec needs exactly 2"):
        build_shards(bad, tmp_path / "o2", ShardsConfig(format="sasrec"))
    prose = tmp_path / "p" / "notes.txt"  # words, not ids: not taken for sequences of words
    prose.parent.mkdir()
    prose.write_text("the reader plans batches when due\nand restores a position in seconds\n" * 20)
    with pytest.raises(DataError, match="notes.txt") as e:
        build_shards(prose, tmp_path / "o4", ShardsConfig())
    assert "s3rec" not in str(e.value).split(":")[0]
    lone = tmp_path / "c" / "seq.txt"
    lone.parent.mkdir()
    lone.write_text("1 10 11 12 13 14 15\n2\n")
    with pytest.raises(DataError, match="seq.txt: line 2: 1 field"):
        build_shards(lone, tmp_path / "o3", ShardsConfig())
