"""``recgpt shards build`` at scale: wall time and peak RSS of the build at several log sizes.

    python benchmarks/build_scale.py --sizes 1000000 10000000 50000000 --items 1000000 \
        [--threads 1] [--engine local] [--workdir /tmp/recgpt-build-scale] [--keep]

For each size, writes a synthetic log (``benchmarks/synthetic_log.py``, seed 0; kept between runs in
``--workdir``), then runs ``recgpt shards build LOG --out DIR --rating-col rating --engine-threads T`` in a
child process and reads its peak resident set and CPU time from ``getrusage(RUSAGE_CHILDREN)`` of a
wrapper process whose only child is the build (so the figures are the build's own). Prints one table and a JSON line;
shard directories are deleted after each size unless ``--keep``. ``--threads 1`` is what a shared machine
should be measured with (DuckDB's threads; numpy/Arrow work is single-threaded here anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# Runs the build as its only child and prints that child's peak RSS (KiB) and CPU seconds: a fresh
# process, so an earlier child (the log generator, ~60 bytes per interaction) cannot hide the figure.
_WRAPPER = """
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "maxrss_kib": r.ru_maxrss, "cpu_s": r.ru_utime + r.ru_stime}), file=sys.stderr)
"""


def measure(log: Path, out: Path, threads: int, engine: str, memory_gb: float) -> dict:
    """Wall seconds, CPU seconds, peak RSS (GiB) and the manifest's counts of one build."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "launcher", "shards", "build", str(log),
           "--out", str(out), "--force", "--rating-col", "rating", "--engine", engine,
           "--engine-threads", str(threads), "--engine-memory-gb", str(memory_gb)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    usage = json.loads(proc.stderr.strip().splitlines()[-1])
    if proc.returncode or usage["rc"]:
        raise SystemExit(f"build failed ({usage['rc']}): {proc.stderr.strip()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    rows = manifest["rows"]["read"]
    return {
        "rows": rows,
        "interactions": manifest["num_interactions"],
        "users": manifest["num_users"],
        "items": manifest["num_items"],
        "wall_s": round(wall, 1),
        # CPU time is what the build needs; wall time also counts waiting for a core on a shared machine.
        "cpu_s": round(usage["cpu_s"], 1),
        "peak_rss_gib": round(usage["maxrss_kib"] / 2**20, 2),
        "us_per_interaction": round(wall / rows * 1e6, 3),
        "cpu_us_per_interaction": round(usage["cpu_s"] / rows * 1e6, 3),
        "output_gib": round(size / 2**30, 2),
        "fingerprint": manifest["fingerprint"][:16],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=1, help="DuckDB threads (0 = every core)")
    # ray: a local Ray of --threads CPUs (0 = every core) unless RAY_ADDRESS names a cluster; its CPU
    # time and memory are spread over Ray's processes, so only wall time compares (docs/BENCHMARKS.md).
    ap.add_argument("--engine", default="local", choices=["local", "python", "ray"])
    ap.add_argument("--memory-gb", type=float, default=2.0, help="DuckDB's memory limit")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/recgpt-build-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the shard directories")
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sorted(a.sizes):
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
    wall0, cpu0 = results[0]["us_per_interaction"], results[0]["cpu_us_per_interaction"]
    head = [
        "interactions",
        "users",
        "items",
        "wall s",
        "CPU s",
        "peak GiB",
        "wall us/int",
        "x first",
        "CPU us/int",
        "x first",
    ]
    print("\n" + " ".join(f"{h:>12}" for h in head))
    for r in results:
        cells = [f"{r['interactions']:,}", f"{r['users']:,}", f"{r['items']:,}", r["wall_s"], r["cpu_s"],
                 r["peak_rss_gib"], r["us_per_interaction"], f"{r['us_per_interaction'] / wall0:.2f}",
                 r["cpu_us_per_interaction"], f"{r['cpu_us_per_interaction'] / cpu0:.2f}"]  # fmt: skip
        print(" ".join(f"{c!s:>12}" for c in cells))
    print(json.dumps({"engine": a.engine, "threads": a.threads, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
