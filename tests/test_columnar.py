"""The columnar ``shards build`` engine (``shards.engine=local``, data_shards/columnar.py) writes what the
reference path (``shards.engine=python``) writes: the same manifest (fingerprint, counts, sources), the
same items, histories and records in the same shards — on the bundled sample, on a synthetic log
(benchmarks/synthetic_log.py) with several record settings, in every input format, and on the Parquet
fast path's own edge cases (missing values, duplicates, time units, ids whose order changes after the
k-core). Its vectorised pieces match their Python originals (window plan, natural order, JSON strings).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from configs import DataError, ShardsConfig
from data_shards import columnar
from data_shards.build import build_shards
from data_shards.reader import ShardLoader
from data_shards.split import natural_order, train_windows
from tests.test_data_shards import SAMPLE, synthetic_log, write_format

REPO = Path(__file__).resolve().parents[1]
# The sample's fingerprint as the reference path wrote it before the columnar engine existed (default
# settings); both engines must keep writing it.
SAMPLE_FINGERPRINT = "c236477772500425a99c90e121f9d35bb8c4491456ae6ad1157d08de14b36e1b"


def _synthetic_module():
    spec = importlib.util.spec_from_file_location("synthetic_log", REPO / "benchmarks" / "synthetic_log.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(out: Path) -> dict[str, list[dict]]:
    """Every record of every split, in shard order (no shuffling)."""
    view = {}
    for split in ("train", "valid", "test"):
        loader = ShardLoader(out, split, batch_size=64, num_workers=0, shuffle=False, drop_last=False)
        view[split] = [r for batch in loader for r in batch if not r.get("pad")]
    return view


def build_with(engine: str, src: Path | str, out: Path | str, **settings) -> dict:
    """``src`` built into ``out`` by ``engine`` in this process; the manifest."""
    return build_shards(src, out, ShardsConfig(engine=engine, **settings))


def both(
    src: Path,
    out: Path,
    engines: tuple[str, str] = ("python", "local"),
    build: Callable[..., dict] | None = None,
    **settings,
) -> tuple[dict, dict]:
    """Build ``src`` with each engine into ``out/<engine>`` (``build(engine, src, out, **settings)``, default
    :func:`build_with`); assert identical output: the manifest (but the setting naming the engine and the
    command line), items, histories and every shard's bytes. (first manifest, second)."""
    first, second = engines
    build = build or build_with
    ref = build(first, src, out / first, **settings)
    new = build(second, src, out / second, **settings)
    assert new["fingerprint"] == ref["fingerprint"]
    for key in ref:  # every key but how it was built (settings naming the engine, command line)
        if key not in ("shards_config", "command"):
            assert new[key] == ref[key], key
    assert new["shards_config"] == {**ref["shards_config"], "engine": second}
    for name in ("items.jsonl", "histories.jsonl"):
        assert (out / second / name).read_bytes() == (out / first / name).read_bytes()
    for shards in ref["splits"].values():
        for shard in shards["shards"]:
            assert (out / second / shard["path"]).read_bytes() == (out / first / shard["path"]).read_bytes()
    return ref, new


# --------------------------------------------------------------------------- whole builds


def test_sample_identical_to_the_reference_path(tmp_path):
    ref, new = both(SAMPLE, tmp_path)
    assert new["fingerprint"] == SAMPLE_FINGERPRINT
    assert records(tmp_path / "local") == records(tmp_path / "python")
    assert new["num_interactions"] == 100_836 and new["rows"]["read"] == 100_836


@pytest.fixture(scope="module")
def synthetic_parquet(tmp_path_factory) -> Path:
    """benchmarks/synthetic_log.py at a small size: sessions, ties, duplicates, float32 ratings."""
    mod = _synthetic_module()
    path = tmp_path_factory.mktemp("synthetic") / "log.parquet"
    mod.write_parquet(mod.generate(30_000, 2_000, 1_500, seed=3, duplicate_rate=0.01, tie_rate=0.05), path)
    return path


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"max_history": 7, "window_stride": 3, "records_per_member": 10, "max_shard_mb": 0.1},
        {"max_history": 4, "prefix_records": True},
        {"rating_threshold": 3.0, "min_user_interactions": 6, "min_item_interactions": 12},
        {"duplicates": "keep", "min_item_interactions": 5},
    ],
    ids=["defaults", "windows", "prefix", "kcore", "keep-duplicates"],
)
def test_synthetic_log_identical_to_the_reference_path(synthetic_parquet, tmp_path, settings):
    ref, new = both(synthetic_parquet, tmp_path, rating_col="rating", **settings)
    assert new["rows"]["removed"]["duplicate" if settings.get("duplicates") != "keep" else "bad_line"] >= 0
    if settings.get("duplicates") == "keep":
        assert new["rows"]["duplicates_kept"] > 0
    else:
        assert new["rows"]["removed"]["duplicate"] > 0
    if "min_item_interactions" in settings and settings.get("duplicates") != "keep":
        assert new["rows"]["removed"]["k_core"] > 0 and new["rows"]["removed"]["rating_threshold"] > 0
    assert records(tmp_path / "local") == records(tmp_path / "python")


def test_synthetic_duplicates_error_is_the_same_line(synthetic_parquet, tmp_path):
    messages = []
    for engine in ("python", "local"):
        with pytest.raises(DataError) as e:
            build_shards(
                synthetic_parquet, tmp_path / engine, ShardsConfig(duplicates="error", engine=engine)
            )
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "duplicate of row" in messages[0]


@pytest.mark.parametrize(
    "fmt", ["ml-100k", "ml-1m", "ml-latest", "amazon-2018", "amazon-2023", "csv", "parquet"]
)
def test_every_format_identical_to_the_reference_path(fmt, tmp_path):
    src, kwargs = write_format(fmt, synthetic_log(n_users=30, n_items=25, seed=4), tmp_path / "src")
    ref, _ = both(src, tmp_path, max_history=4, **kwargs)
    assert ref["source"]["format"] == fmt


@pytest.mark.parametrize("fmt", ["s3rec", "sasrec"])
def test_sequence_formats_identical_to_the_reference_path(fmt, tmp_path):
    rng = np.random.default_rng(1)
    if fmt == "s3rec":
        text = "".join(f"u{u} " + " ".join(map(str, rng.integers(1, 40, 8))) + "\n" for u in range(20))
    else:
        text = "".join(f"{u} {i}\n" for u, i in zip(rng.integers(1, 12, 150), rng.integers(1, 30, 150)))
    (tmp_path / "seq.txt").write_text(text)
    ref, _ = both(tmp_path / "seq.txt", tmp_path, format=fmt, duplicates="keep")
    assert ref["source"]["format"] == fmt


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_fast_path_edge_cases_identical(tmp_path):
    """Nulls and NaN skipped and counted, ms times coarsened to s, string ids, a float32 0.1 rating."""
    rng = np.random.default_rng(0)
    n = 400
    users = [f"{u}" for u in rng.integers(0, 25, n)]
    users[3] = None
    items = [f"i{i}" for i in rng.integers(0, 40, n)]
    rating = rng.choice(np.array([0.1, 0.5, 2.0, 4.5], np.float32), n)
    rating[7] = np.nan
    times = (1_700_000_000 + rng.integers(0, 50, n)) * 1000
    src = _parquet(
        tmp_path / "log.parquet",
        {"user_id": users, "item_id": items, "rating": pa.array(rating), "timestamp": times},
    )
    ref, new = both(src, tmp_path / "skip", rating_col="rating", skip_bad_lines=True)
    assert new["rows"]["removed"]["missing_value"] == 2 and new["timestamp_unit"] == "s"
    assert 0.1 in new["rating_levels"]
    messages = []
    for engine in ("python", "local"):
        with pytest.raises(DataError) as e:
            build_shards(src, tmp_path / engine, ShardsConfig(rating_col="rating", engine=engine))
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "row 4: field 'user_id': missing value" in messages[0]


def test_ids_that_sort_as_numbers_after_the_k_core(tmp_path):
    """A non-numeric user makes every user id sort as text; once the k-core removes it they sort as
    numbers (2 before 10), and the engine re-sorts its users' blocks to match."""
    rows = [(str(u), str(i), t) for u in (2, 10, 33) for t, i in enumerate(range(1, 7))]
    rows += [("x", "1", 1), ("x", "2", 2), ("x", "3", 3)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    src = _parquet(tmp_path / "log.parquet", {c: frame[c].to_numpy() for c in frame})
    ref, new = both(src, tmp_path, min_user_interactions=4)
    users = [r["user"] for r in records(tmp_path / "local")["test"]]
    assert users == ["2", "10", "33"] and new["rows"]["removed"]["k_core"] == 3


def test_integer_ids_negative_and_beyond_18_digits_sort_as_text(tmp_path):
    rows = [(u, i, t) for u in (-5, 3, 10**18 + 1) for t, i in enumerate(range(1, 6))]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    src = _parquet(tmp_path / "log.parquet", {c: frame[c].to_numpy(np.int64) for c in frame})
    both(src, tmp_path)
    assert [r["user"] for r in records(tmp_path / "local")["test"]] == ["-5", "1000000000000000001", "3"]


# --------------------------------------------------------------------------- vectorised pieces


@pytest.mark.parametrize("prefix", [False, True])
def test_window_plan_matches_train_windows(prefix):
    lengths = np.arange(0, 60)
    for max_history in (1, 2, 5, 7):
        for stride in (None, 1, 2, 3, max_history):
            if stride is not None and stride > max_history:
                continue
            user, lo, hi, first = columnar.window_plan(lengths, max_history, prefix, stride)
            expected = []
            for u, n in enumerate(lengths):
                windows = train_windows(int(n), max_history, prefix, stride)
                covered = 1
                for a, b in windows:
                    expected.append((u, a, b, max(1, covered - a)))
                    covered = max(covered, b)
            assert list(zip(user.tolist(), lo.tolist(), hi.tolist(), first.tolist())) == expected


@pytest.mark.parametrize(
    "ids",
    [
        ["10", "9", "007", "7", "100"],
        ["b", "a", "10", "9", "é", "Z", "ü"],
        ["1" * 18, "2", "1" * 19],
        ["-1", "3", "20"],
    ],
)
def test_natural_permutation_matches_natural_order(ids):
    arr = pa.array(ids)
    assert (
        arr.take(pa.array(columnar.natural_permutation(arr))).to_pylist()
        == natural_order(np.array(ids)).tolist()
    )


def test_natural_permutation_of_integers():
    values = np.array([30, 4, 100, 0], dtype=np.int64)
    assert columnar.natural_permutation(pa.array(values)).tolist() == [3, 1, 0, 2]
    mixed = pa.array(np.array([-2, 5, 40], dtype=np.int64))  # "-2" < "40" < "5" as text
    assert mixed.take(pa.array(columnar.natural_permutation(mixed))).to_pylist() == [-2, 40, 5]


def test_json_strings_match_json_dumps():
    texts = ["plain", 'quo"te', "back\\slash", "tab\tnew\nline", "\x00\x1f", "é ü 中", "\u2028", ""]
    assert columnar.json_strings(pa.array(texts)).to_pylist() == [
        json.dumps(t, ensure_ascii=False) for t in texts
    ]


def test_engine_setting_is_checked():
    from configs import ConfigError

    with pytest.raises(ConfigError, match="shards.engine"):
        ShardsConfig(engine="spark")


@pytest.mark.slow  # a subprocess that imports the whole launcher: ~10-20 s
def test_build_scale_benchmark_at_a_small_size(tmp_path):
    """benchmarks/build_scale.py end to end at 20K interactions (CI's size of the scale path): the
    build it times is the same build (fingerprint) as in-process, and it reports time and memory."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "build_scale.py"), "--sizes", "20000", "--items", "2000",
         "--workdir", str(tmp_path), "--keep"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    [result] = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert result["rows"] >= 20_000 and result["interactions"] <= result["rows"]
    assert result["wall_s"] > 0 and result["cpu_s"] > 0 and 0 < result["peak_rss_gib"] < 4
    manifest = build_shards(
        tmp_path / "log-20000-2000.parquet", tmp_path / "again", ShardsConfig(rating_col="rating")
    )
    assert manifest["fingerprint"].startswith(result["fingerprint"])


@st.composite
def parquet_logs(draw) -> dict:
    """Small Parquet logs the fast path reads: integer or string ids, integer times in s/ms/us with ties,
    exact repeats, a few nulls, float32/float64/integer/no ratings."""
    n = draw(st.integers(1, 60))
    ints = draw(st.booleans())
    users = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    items = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    scale = draw(st.sampled_from([1, 1000, 10**6]))
    times = [1_600_000_000 * scale + t * draw(st.sampled_from([1, scale])) for t in draw(
        st.lists(st.integers(0, 8), min_size=n, max_size=n))]  # fmt: skip
    rating_kind = draw(st.sampled_from(["float32", "float64", "int", "none"]))
    ratings = draw(st.lists(st.sampled_from([0.1, 1.0, 2.5, 4.0]), min_size=n, max_size=n))
    for k in draw(st.lists(st.integers(0, n - 1), max_size=4)):  # exact repeats of a row
        users.append(users[k]), items.append(items[k]), times.append(times[k]), ratings.append(ratings[k])
    cols = {
        "user_id": pa.array(users, pa.int64()) if ints else pa.array([f"u{u}" for u in users]),
        "item_id": pa.array(items, pa.int32()) if ints else pa.array([f"{i:03d}" for i in items]),
        "timestamp": pa.array(times, pa.int64()),
    }
    if rating_kind != "none":
        cols["rating"] = pa.array([int(r) if rating_kind == "int" else r for r in ratings],
                                  pa.int64() if rating_kind == "int" else getattr(pa, rating_kind)())  # fmt: skip
    nulls = draw(
        st.lists(st.tuples(st.integers(0, len(users) - 1), st.sampled_from(sorted(cols))), max_size=2)
    )
    for row, col in nulls:
        values = cols[col].to_pylist()
        values[row] = None
        cols[col] = pa.array(values, cols[col].type)
    return cols


def _assert_engines_agree(src, d, settings_: dict) -> None:
    """Both engines build ``src`` into ``d/<engine>``: the same manifest (fingerprint included; the
    engine setting aside), or the same one-line error."""
    outcome = {}
    for engine in ("python", "local"):
        try:
            outcome[engine] = build_shards(src, d / engine, ShardsConfig(engine=engine, **settings_))
        except DataError as e:
            outcome[engine] = str(e)
    ref, new = outcome["python"], outcome["local"]
    if isinstance(ref, str) or isinstance(new, str):
        assert new == ref
        return
    assert new["fingerprint"] == ref["fingerprint"]
    assert {k: v for k, v in new.items() if k != "shards_config"} == {
        k: v for k, v in ref.items() if k != "shards_config"
    }


@settings(
    deadline=None, database=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cols=parquet_logs(),
    duplicates=st.sampled_from(["drop", "keep", "error"]),
    skip_bad=st.booleans(),
    min_item=st.integers(1, 3),
)
def test_parquet_fast_path_agrees_with_the_reference(cols, duplicates, skip_bad, min_item, tmp_path_factory):
    """The same manifest and bytes, or the same one-line error, from both engines."""
    d = tmp_path_factory.mktemp("fast")
    src = _parquet(d / "log.parquet", cols)
    settings_ = dict(
        rating_col="rating" if "rating" in cols else None, duplicates=duplicates, skip_bad_lines=skip_bad,
        min_user_interactions=3, min_item_interactions=min_item, max_history=3,
    )  # fmt: skip
    _assert_engines_agree(src, d, settings_)


@st.composite
def csv_logs(draw) -> tuple[str, str]:
    """(file name, text) of small generic CSV/TSV logs: the shapes the columnar CSV reader takes and the
    ones it must leave to the reference reader (quotes, blank lines, spaces, odd numbers, field counts)."""
    sep = draw(st.sampled_from([",", "\t"]))
    end = draw(st.sampled_from(["\n", "\r\n"]))
    header = ["user_id", "item_id", "rating", "timestamp"] + draw(st.sampled_from([[], ["note"]]))
    clean = draw(st.booleans())  # only values the columnar reader takes (empty = missing) or any
    id_text = st.one_of(st.integers(0, 6).map(str), st.sampled_from(["u1", "007", "7", "é", ""]))
    rating_text = st.sampled_from(["4", "4.0", "2.50", "0.1", ""])
    time_text = st.one_of(
        st.integers(1_600_000_000, 1_600_000_008).map(str), st.sampled_from(["1600000000000", ""])
    )
    if not clean:
        id_text = st.one_of(id_text, st.sampled_from([" 3", "4 "]))
        rating_text = st.one_of(rating_text, st.sampled_from(["x", "1e1", " 3", "-1"]))
        time_text = st.one_of(
            time_text, st.sampled_from(["1600000001.5", "-5", "2020-01-01T00:00:00Z", " 7"])
        )
    rows = []
    for _ in range(draw(st.integers(1, 40))):
        cells = [draw(id_text), draw(id_text), draw(rating_text), draw(time_text)][: len(header)]
        cells += ["ok"] * (len(header) - len(cells))
        rows.append(sep.join(cells))
    for k in draw(st.lists(st.integers(0, 10**6), max_size=3)):  # exact repeats
        rows.append(rows[k % len(rows)])
    odd = "" if clean else draw(st.sampled_from(["", "blank", "quote", "short", "long"]))
    at = draw(st.integers(0, len(rows)))
    rows.insert(at, {"": rows[0], "blank": "", "quote": sep.join(['"1"', "2", "3.0", "1600000000"]),
                     "short": sep.join(["1", "2"]), "long": sep.join(["1", "2", "3", "1600000000", "x", "y"])}[odd])  # fmt: skip
    name = "log.tsv" if sep == "\t" else "log.csv"
    return name, end.join([sep.join(header), *rows]) + draw(st.sampled_from(["", end]))


@settings(
    deadline=None, database=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(log=csv_logs(), duplicates=st.sampled_from(["drop", "keep"]), skip_bad=st.booleans())
# A TSV line of tabs only is a row of empty fields, not a blank line (found by this test in CI).
@example(
    log=("log.tsv", "user_id\titem_id\trating\ttimestamp\n\t\t\t\n\t\t\t"), duplicates="drop", skip_bad=False
)
@example(
    log=("log.tsv", "user_id\titem_id\trating\ttimestamp\r\n" + "0\t0\t4\t1600000001\r\n" * 2 + "\t\t\t\r\n"
         + "0\t0\t4\t1600000000\r\n" * 3),
    duplicates="keep", skip_bad=True,
)  # fmt: skip
def test_csv_reader_agrees_with_the_reference(log, duplicates, skip_bad, tmp_path_factory):
    """The columnar CSV reader (or its hand-over to the reference reader) gives the reference's manifest
    and bytes, or its one-line error."""
    d = tmp_path_factory.mktemp("csv")
    (d / log[0]).write_bytes(log[1].encode())
    settings_ = dict(rating_col="rating", duplicates=duplicates, skip_bad_lines=skip_bad, min_user_interactions=3,
                     max_history=3)  # fmt: skip
    _assert_engines_agree(d / log[0], d, settings_)


def test_a_line_of_separators_only_is_a_row_missing_its_values(tmp_path):
    """Not a blank line, whatever the separator (a TSV line of tabs is whitespace to str.strip): both
    engines name it as a missing value, or skip and count it with skip_bad_lines."""
    for sep, name in ((",", "log.csv"), ("\t", "log.tsv")):
        rows = [sep.join(["user_id", "item_id", "rating", "timestamp"]), sep * 3]
        rows += [sep.join(["1", str(i), "4", str(1_600_000_000 + i)]) for i in range(4)]
        (tmp_path / name).write_text("\n".join(rows) + "\n")
        for engine in ("python", "local"):
            cfg = dict(engine=engine, rating_col="rating", min_user_interactions=3, max_history=3)
            with pytest.raises(DataError, match=rf"{name}: line 2: field 'user_id': missing value"):
                build_shards(tmp_path / name, tmp_path / f"{engine}-strict", ShardsConfig(**cfg))
            manifest = build_shards(
                tmp_path / name, tmp_path / f"{engine}-{name}", ShardsConfig(skip_bad_lines=True, **cfg)
            )
            assert manifest["rows"]["read"] == 5 and manifest["rows"]["removed"]["missing_value"] == 1
            assert manifest["source"]["skipped_lines"] == 1 and manifest["num_interactions"] == 4
