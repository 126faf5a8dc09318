"""benchmarks/synthetic_log.py: the structure it promises, and ``shards build`` reads its file."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import synthetic_log  # noqa: E402


def test_generated_log_has_the_promised_structure(tmp_path):
    n, m, users = 40_000, 2_000, 2_000
    out = tmp_path / "log.parquet"
    assert synthetic_log.main([f"--interactions={n}", f"--items={m}", f"--users={users}", "--seed=7",
                               "--duplicate-rate=0.01", f"--out={out}"]) == 0  # fmt: skip
    t = pq.read_table(out)
    assert t.column_names == ["user_id", "item_id", "timestamp", "rating"]
    assert [str(f.type) for f in t.schema] == ["int64", "int64", "int64", "float"]
    cols = {k: t.column(k).to_numpy() for k in t.column_names}
    rows = np.stack(
        [cols["user_id"], cols["item_id"], cols["timestamp"], (cols["rating"] * 2).astype(np.int64)], 1
    )
    unique_rows = np.unique(rows, axis=0)
    duplicates = len(rows) - len(unique_rows)
    assert len(rows) == n + duplicates and 200 < duplicates < 600  # ~1 % repeated verbatim
    # Users: every one present, varied history lengths, at least 5 events each.
    lengths = np.bincount(cols["user_id"])[1:]
    assert len(lengths) == users and lengths.min() >= 5 and lengths.max() > 5 * np.median(lengths)
    # Popularity: Zipf-like, the top 10 % of items hold far more than 10 % of the interactions.
    counts = np.sort(np.bincount(cols["item_id"], minlength=m + 1)[1:])[::-1]
    assert counts[: m // 10].sum() / n > 0.4
    # Time order within a user, with ties; ratings in halves.
    same_user = cols["user_id"][1:] == cols["user_id"][:-1]
    gaps = np.diff(cols["timestamp"])[same_user]
    assert (gaps >= 0).all() and 0 < (gaps == 0).mean() < 0.05
    assert set(np.unique(cols["rating"])) <= {x / 2 for x in range(1, 11)}
    # Learnable transitions: most next items are one of few successors of the previous item.
    prev, nxt = cols["item_id"][:-1][same_user], cols["item_id"][1:][same_user]
    pairs = np.unique(np.stack([prev, nxt], 1), axis=0, return_counts=True)
    top3 = 0
    for item in np.unique(prev):
        c = np.sort(pairs[1][pairs[0][:, 0] == item])[::-1]
        top3 += c[:3].sum()
    assert top3 / len(prev) > 0.8
    # The same seed gives the same file.
    again = tmp_path / "again.parquet"
    synthetic_log.main([f"--interactions={n}", f"--items={m}", f"--users={users}", "--seed=7",
                        "--duplicate-rate=0.01", f"--out={again}"])  # fmt: skip
    assert pq.read_table(again).equals(t)


def test_shards_build_reads_it(tmp_path, capsys):
    from launcher.cli import main

    out = tmp_path / "log.parquet"
    synthetic_log.main(["--interactions=20000", "--items=1000", "--seed=1", f"--out={out}"])
    assert main(["shards", "build", str(out), "--out", str(tmp_path / "shards")]) == 0
    from data_shards.manifest import load_manifest

    manifest = load_manifest(tmp_path / "shards")
    assert manifest["splits"]["test"]["records"] == 1000  # one test target per user (20000 / 20 users)
    rows = manifest["rows"]
    assert rows["removed"]["duplicate"] == rows["read"] - 20000 > 0 and rows["kept"] == 20000


@pytest.mark.parametrize("bad", [["--users=100000"]])
def test_impossible_sizes_are_refused(tmp_path, bad):
    with pytest.raises(SystemExit, match="exceeds"):
        synthetic_log.main(["--interactions=1000", "--items=10", *bad, f"--out={tmp_path / 'x.parquet'}"])
