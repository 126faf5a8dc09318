"""A synthetic interaction log with the structure a sequential recommender can learn, at any size.

    python benchmarks/synthetic_log.py --interactions 50000000 --items 1000000 [--users U] [--seed S] --out log.parquet

Writes Parquet with the columns ``user_id`` (int64), ``item_id`` (int64), ``timestamp`` (int64, Unix
seconds) and ``rating`` (float32, 0.5..5 in halves), grouped by user in time order (as exported from a
per-user store; ``shards build`` sorts by time itself, so any row order gives the same shards), that
``recgpt shards build log.parquet`` reads as it is. Used by ``benchmarks/scale.py`` and by users as a
smoke test of their cluster before their own logs.

The structure (every draw from one ``numpy.random.Generator`` seeded by ``--seed``, so a seed gives the
same file on every machine):

* **popularity**: Zipf-like, item of popularity rank r drawn with weight ``1 / (r + 1) ** zipf``
  (``--zipf``, default 1.0); the ids are a random permutation, so id says nothing about popularity;
* **sessions that follow item-to-item transitions**: the items lie on one hidden cycle (in popularity
  order, under random ids); a session starts at a popularity-drawn item and each next event moves 1, 2
  or 3 places along the cycle
  (probabilities 0.6 / 0.3 / 0.1) — the next item is predictable from the previous one, as a trained
  SASRec-style model will learn (top-3 of the true transition table: 100 % of in-session steps). With
  probability ``--new-session`` (default 0.15) an event starts a new session instead;
* **history lengths** vary like real logs: log-normal per user (median ~ interactions / users / 1.6,
  at least ``--min-length``, default 5), scaled so the total is exactly ``--interactions``;
* **time**: each user starts at a uniform time in one year; gaps are exponential (mean 10 minutes
  inside a session, 2 days between sessions), in whole seconds, so some consecutive events **tie**
  (``--tie-rate`` of the gaps, default 0.5 %, are set to 0);
* **a few exact duplicate rows** (``--duplicate-rate``, default 0.05 %: a row repeated verbatim,
  as double-logged clicks are), which ``shards build`` drops and counts (``shards.duplicates``).

Speed: vectorised numpy (no per-row Python), ~2-4 M interactions/s on one core of the 2-core CI
machine including the Parquet write; peak memory ~ 60 bytes per interaction.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STEP_PROBS = np.array([0.6, 0.3, 0.1])  # moving 1, 2 or 3 places along the hidden cycle
YEAR_S = 365 * 24 * 3600
START = 1_600_000_000  # 2020-09-13 UTC


def history_lengths(rng: np.random.Generator, interactions: int, users: int, min_length: int) -> np.ndarray:
    """int64 [users], each >= min_length, summing to exactly ``interactions`` (log-normal shape)."""
    if users * min_length > interactions:
        raise SystemExit(f"--users {users} x --min-length {min_length} exceeds --interactions {interactions}")
    raw = rng.lognormal(mean=0.0, sigma=1.0, size=users)
    spare = interactions - users * min_length
    extra = np.floor(raw / raw.sum() * spare).astype(np.int64)
    short = spare - int(extra.sum())  # rounding: one more event for the users with the largest remainders
    if short:
        frac = raw / raw.sum() * spare - extra
        extra[np.argpartition(-frac, short - 1)[:short]] += 1
    return extra + min_length


def generate(
    interactions: int,
    items: int,
    users: int,
    seed: int = 0,
    zipf: float = 1.0,
    new_session: float = 0.15,
    tie_rate: float = 0.005,
    duplicate_rate: float = 0.0005,
    min_length: int = 5,
) -> dict[str, np.ndarray]:
    """The log as numpy columns (see the module docstring); rows = interactions + duplicates."""
    rng = np.random.default_rng(seed)
    lengths = history_lengths(rng, interactions, users, min_length)
    n = interactions
    user = np.repeat(np.arange(users, dtype=np.int64), lengths)
    first = np.zeros(n, dtype=bool)
    first[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True

    # Sessions: a start at every user's first event and with probability new_session elsewhere.
    start = first | (rng.random(n) < new_session)
    session = np.cumsum(start) - 1  # session index of every event
    weights = 1.0 / np.arange(1, items + 1, dtype=np.float64) ** zipf
    start_pos = rng.choice(items, size=int(start.sum()), p=weights / weights.sum())  # cycle position
    u = rng.random(n)  # step 1, 2, 3 with STEP_PROBS: thresholds on one uniform draw
    steps = (u >= STEP_PROBS[0]).astype(np.int64) + (u >= STEP_PROBS[0] + STEP_PROBS[1]) + 1
    steps[start] = 0
    walked = np.cumsum(steps)
    walked_at_start = walked[start]
    position = (start_pos[session] + walked - walked_at_start[session]) % items
    # The cycle runs through the popularity ranks (a session drifts from its start towards slightly less
    # popular items, so popularity stays Zipf-like); rank -> id is a random permutation.
    ids = rng.permutation(items).astype(np.int64) + 1  # ids 1..items, in no meaningful order
    item = ids[position]

    gaps = (rng.standard_exponential(n) * np.where(start, 2 * 86400.0, 600.0)).astype(np.int64) + 1
    gaps[rng.random(n) < tie_rate] = 0
    gaps[first] = 0
    user_start = START + rng.integers(0, YEAR_S, size=users)
    stamp = np.cumsum(gaps)
    stamp = user_start[user] + stamp - np.repeat(stamp[first], lengths)
    rating = (rng.choice(np.arange(1, 11), size=n, p=_rating_probs()) / 2.0).astype(np.float32)

    # Duplicates: repeated right after the original row, as a double-logged click is.
    rows = np.repeat(np.arange(n), 1 + (rng.random(n) < duplicate_rate))
    return {
        "user_id": user[rows] + 1,
        "item_id": item[rows],
        "timestamp": stamp[rows],
        "rating": rating[rows],
    }


def _rating_probs() -> np.ndarray:
    p = np.array([1, 2, 2, 5, 6, 14, 18, 26, 12, 14], dtype=np.float64)  # 0.5..5: MovieLens-like skew
    return p / p.sum()


def write_parquet(cols: dict[str, np.ndarray], out: Path) -> None:
    table = pa.table({k: pa.array(v) for k, v in cols.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, tmp, row_group_size=1 << 20, compression="zstd")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interactions", type=int, required=True, help="interactions (before duplicates)")
    ap.add_argument("--items", type=int, required=True, help="catalogue size")
    ap.add_argument("--users", type=int, default=None, help="users (default: interactions / 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    ap.add_argument("--new-session", type=float, default=0.15, help="probability an event starts a session")
    ap.add_argument("--tie-rate", type=float, default=0.005, help="fraction of gaps set to 0 s")
    ap.add_argument("--duplicate-rate", type=float, default=0.0005, help="fraction of rows repeated verbatim")
    ap.add_argument("--min-length", type=int, default=5, help="shortest history")
    ap.add_argument("--out", type=Path, required=True, help="output .parquet file")
    a = ap.parse_args(argv)
    users = a.users or max(1, a.interactions // 20)
    t0 = time.perf_counter()
    cols = generate(a.interactions, a.items, users, a.seed, a.zipf, a.new_session, a.tie_rate,
                    a.duplicate_rate, a.min_length)  # fmt: skip
    t1 = time.perf_counter()
    write_parquet(cols, a.out)
    t2 = time.perf_counter()
    rows = len(cols["user_id"])
    print(f"{a.out}: {rows:,} rows ({rows - a.interactions:,} duplicates), {users:,} users, "
          f"{len(np.unique(cols['item_id'])):,} of {a.items:,} items used; generated in {t1 - t0:.1f} s, "
          f"written in {t2 - t1:.1f} s ({rows / (t2 - t0) / 1e6:.2f} M interactions/s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
