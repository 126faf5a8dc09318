"""The reader at scale (issue 15 item 4), at CI size: ``benchmarks/reader_scale.py`` on two synthetic
logs of different sizes, the restore deep in an epoch against the uninterrupted stream, and the
O(1)/O(shard) plan (its re-planned rest and its per-shard inverse) against the O(records) reference."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from configs import ShardsConfig
from data_shards.build import build_shards
from data_shards.reader import PERM_CACHE, EpochPlan, ShardLoader

REPO = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory) -> list[Path]:
    """Shards of 20K and 60K synthetic interactions, in small shards (~0.1 MiB) so an epoch spans many."""
    synthetic = _module("synthetic_log")
    out = []
    for n in (20_000, 60_000):
        d = tmp_path_factory.mktemp(f"scale{n}")
        synthetic.write_parquet(synthetic.generate(n, 2_000, n // 20, seed=1), d / "log.parquet")
        build_shards(d / "log.parquet", d / "shards", ShardsConfig(rating_col="rating", max_shard_mb=0.1))
        out.append(d / "shards")
    return out


def _keys(batches) -> list[tuple]:
    return [(r["uid"], r["timestamps"][-1], r["items"][-1], bool(r.get("pad"))) for b in batches for r in b]


def test_benchmark_state_size_does_not_grow_with_the_data(two_sizes):
    scale = _module("reader_scale")
    small, large = (scale.measure(str(d), records=2_000, batch_size=16, repeats=1) for d in two_sizes)
    assert large["records"] > 2 * small["records"] and large["shards"] > small["shards"] > 4
    # The same keys and one segment at both sizes: only the digits of the batch numbers may differ.
    for key in ("state_bytes", "state_bytes_plain"):
        assert abs(large[key] - small[key]) <= 2 and large[key] < 300
    for r in (small, large):
        assert r["w1_raw_start"]["wall"] > 0 and r["w2_ids_deep"]["cpu"] > 0 and r["restore_s"] > 0
    assert len(scale.table([small, large]).splitlines()) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_restore_at_90_percent_equals_the_uninterrupted_stream(two_sizes, workers):
    kw = dict(split="train", world_size=2, rank=1, batch_size=16, seed=3, num_workers=workers)
    full = [_keys([b]) for b in ShardLoader(two_sizes[1], **kw)]
    at = int(0.9 * len(full))
    restored = ShardLoader(two_sizes[1], **kw)
    restored.load_state_dict(json.loads(json.dumps({**restored.state_dict(), "batch": at})))
    assert [_keys([b]) for b in restored] == full[at:]


def test_replanned_restore_deep_in_the_epoch_serves_the_rest_exactly_once(two_sizes):
    kw = dict(split="train", batch_size=16, seed=3, num_workers=0)
    full = [list(ShardLoader(two_sizes[1], rank=r, world_size=2, **kw)) for r in range(2)]
    at = int(0.9 * len(full[0]))
    served = _keys(full[0][:at] + full[1][:at])
    state = {**ShardLoader(two_sizes[1], world_size=2, **kw).state_dict(), "batch": at}
    after = []
    for r in range(4):  # the global batch kept: 2 x 16 -> 4 x 8
        ld = ShardLoader(two_sizes[1], rank=r, world_size=4, **{**kw, "batch_size": 8})
        ld.load_state_dict(state, replan=True)
        after += _keys(list(ld))
    assert sorted(served + after) == sorted(_keys(full[0] + full[1]))


def _reference_rest(total: int, segments: list[list[int]]) -> np.ndarray:
    """The O(records) definition of the rest of an epoch after plan changes (module docstring of the
    reader): every position of G, in the order the earlier plans would have served them."""
    rest = None
    for world, batch, served in segments:
        per_step = world * batch
        n = total if rest is None else len(rest)
        num_batches = n // per_step
        if rest is not None:
            rest = rest[served * per_step : num_batches * per_step]
            continue
        b = np.arange(served, num_batches)[:, None, None]
        r = np.arange(world)[None, :, None]
        k = np.arange(batch)[None, None, :]
        rest = (r * num_batches * batch + b * batch + k).ravel()
    return rest


def test_plan_is_arithmetic_and_its_inverse_matches_its_batches():
    rng = np.random.default_rng(0)
    for _ in range(40):
        counts = rng.integers(1, 40, size=rng.integers(1, 25)).tolist()
        total = sum(counts)
        manifest = {"splits": {"x": {"shards": [{"records": c} for c in counts]}}}
        world, batch = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        drop_last = bool(rng.integers(0, 2))
        segments: list[list[int]] = []
        if drop_last:
            for _ in range(int(rng.integers(0, 3))):
                w, b = int(rng.integers(1, 4)), int(rng.integers(1, 6))
                segments.append([w, b, int(rng.integers(0, 4))])
        plan = EpochPlan(manifest, "x", world, batch, 3, 1, bool(rng.integers(0, 2)), drop_last, segments)
        if segments:
            assert np.array_equal(
                plan.rest.positions(np.arange(len(plan.rest))), _reference_rest(total, segments)
            )
        if plan.num_batches == 0:
            continue
        forward: dict[int, list] = {}
        for r in range(world):
            for i in range(plan.num_batches):
                shards, records, _ = plan.batch(r, i)
                for s, rec in zip(shards.tolist(), records.tolist()):
                    forward.setdefault(s, []).append((rec, r, i))
        for s in range(len(counts)):
            got = sorted(zip(*(a.tolist() for a in plan.uses(s))))
            assert got == sorted(forward.get(s, []))
        assert len(plan._perms) <= PERM_CACHE  # the plan keeps O(shard), not O(epoch)
        if not drop_last:  # every record exactly once, pads on top
            assert sum(len(v) for v in forward.values()) == math.ceil(total / (world * batch)) * world * batch
