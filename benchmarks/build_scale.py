"""``recgpt shards build`` at scale: wall time and peak RSS of the build at several log sizes.

    python benchmarks/build_scale.py --sizes 1000000 10000000 50000000 --items 1000000 \
        [--threads 1] [--engine local] [--workdir /tmp/recgpt-build-scale] [--keep]

For each size, writes a synthetic log (``benchmarks/synthetic_log.py``, seed 0; kept between runs in
``--workdir``), then runs ``recgpt shards build LOG --out DIR --rating-col rating --engine-threads T`` in a
child process and reads its peak resident set from ``getrusage(RUSAGE_CHILDREN)`` (the build is the only
child alive at that point, so the figure is its own high-water mark). Prints one table and a JSON line;
shard directories are deleted after each size unless ``--keep``. ``--threads 1`` is what a shared machine
should be measured with (DuckDB's threads; numpy/Arrow work is single-threaded here anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_children_kib() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def measure(log: Path, out: Path, threads: int, engine: str, memory_gb: float) -> dict:
    """Wall seconds, peak RSS (GiB) and the manifest's counts of one build."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": str(threads or 1)}
    cmd = [sys.executable, "-m", "launcher", "shards", "build", str(log), "--out", str(out), "--force",
           "--rating-col", "rating", "--engine", engine, "--engine-threads", str(threads),
           "--engine-memory-gb", str(memory_gb)]  # fmt: skip
    before = _peak_children_kib()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"build failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    peak = _peak_children_kib()
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {
        "rows": manifest["rows"]["read"],
        "interactions": manifest["num_interactions"],
        "users": manifest["num_users"],
        "items": manifest["num_items"],
        "wall_s": round(wall, 1),
        # ru_maxrss only rises: a size smaller than an earlier one would show the earlier peak.
        "peak_rss_gib": round(peak / 2**20, 2) if peak > before else None,
        "us_per_interaction": round(wall / manifest["rows"]["read"] * 1e6, 3),
        "output_gib": round(size / 2**30, 2),
        "fingerprint": manifest["fingerprint"][:16],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=1, help="DuckDB threads (0 = every core)")
    ap.add_argument("--engine", default="local", choices=["local", "python"])
    ap.add_argument("--memory-gb", type=float, default=2.0, help="DuckDB's memory limit")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/recgpt-build-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the shard directories")
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sorted(a.sizes):  # ascending: RUSAGE_CHILDREN's peak only rises
        log = a.workdir / f"log-{n}-{a.items}.parquet"
        if not log.exists():
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "synthetic_log.py"), "--interactions",
                            str(n), "--items", str(a.items), "--out", str(log)], check=True)  # fmt: skip
        out = a.workdir / f"shards-{n}"
        r = {"size": n, **measure(log, out, a.threads, a.engine, a.memory_gb)}
        results.append(r)
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(r), flush=True)
    base = results[0]["us_per_interaction"]
    print(
        f"\n{'interactions':>13} {'users':>10} {'items':>9} {'wall s':>8} {'peak GiB':>9} {'us/int':>7} {'vs first':>8}"
    )
    for r in results:
        print(f"{r['interactions']:>13,} {r['users']:>10,} {r['items']:>9,} {r['wall_s']:>8} "
              f"{r['peak_rss_gib']!s:>9} {r['us_per_interaction']:>7} {r['us_per_interaction'] / base:>8.2f}")  # fmt: skip
    print(json.dumps({"engine": a.engine, "threads": a.threads, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
