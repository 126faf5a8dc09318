"""The shard reader at scale: records/s, restore time, memory and state size from 1M to 50M interactions.

    OMP_NUM_THREADS=1 python benchmarks/reader_scale.py --sizes 1000000 10000000 50000000 --items 1000000

For each size, writes a synthetic log (``benchmarks/synthetic_log.py``, seed 0) and builds its shards
(``recgpt shards build``, default settings) in ``--workdir`` — both kept and reused when present, the
layout of ``benchmarks/build_scale.py`` — then measures the train split in a fresh process of its own
(so one size's memory cannot hide in another's), every reader from ``modeling.data.build_loader`` with
``num_workers=0`` (the reading is this process's CPU time):

* **records/s from the start / deep**: ``--records`` records (all of the rank's records when it has
  fewer) read by rank 0 of world size 1 and of world size 2, raw records (no tokenizer) and
  batches of the stand-in ids collate of ``benchmarks/reader_throughput.py`` (item ids padded into
  tensors); "deep" restores the position ``--records`` before the end of the rank's epoch first. The
  time includes the first batch (planning, restore, the first shard's read: also a column of its
  own). Wall figures move with the machine's load; CPU figures less so.
* **restore s**: a state at 90 % of the epoch (world size 1): construct the loader, ``load_state_dict``,
  first batch; the median of ``--repeats``. Also the same from a world-size-2 state re-planned onto
  world size 1 (elastic resume, ``replan=True``).
* **reader RSS MiB**: the process's peak RSS over its RSS after the imports (``ru_maxrss``): every
  loader above together, records and batches included.
* **state bytes**: ``len(json.dumps(state_dict()))`` of the loader after the re-planned restore (one
  segment), the largest state the reader writes with one world-size change.

Prints one JSON line per size and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the project's packages, not only what the venv installed


def _rss_mib() -> float:
    """This process's current resident set (MiB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _records(batch: Any) -> int:
    return len(batch["input_ids"]) if isinstance(batch, dict) else len(batch)


def read_rate(loader: Any, records: int, skip_to_end: bool) -> dict[str, float]:
    """Reads ``records`` records (whole batches) from the start of the loader's epoch or, with
    ``skip_to_end``, from ``records`` before its end (restoring there first).

    Returns records/s of wall time and of this process's CPU time over the whole read, first batch
    (planning, restore, the first shard's read) included — what a trainer sees — and ``first_s``,
    the wall seconds to that first batch."""
    batches = math.ceil(records / loader.batch_size)
    t, cpu = time.perf_counter(), time.process_time()
    if skip_to_end:
        loader.load_state_dict({**loader.state_dict(), "batch": len(loader) - batches})
    n, first = 0, 0.0
    for i, batch in enumerate(loader):
        n += _records(batch)
        first = first or time.perf_counter() - t
        if i + 1 == batches:
            break
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"first_s": first, "wall": n / wall, "cpu": n / max(cpu, 1e-9)}


def restore_time(make: Any, state: dict[str, Any], replan: bool = False) -> tuple[float, float, list]:
    """Seconds of wall and of this process's CPU to construct a loader, load ``state`` and get its
    first batch; and that batch."""
    t, cpu = time.perf_counter(), time.process_time()
    loader = make()
    loader.load_state_dict(state, replan=replan)
    first = next(iter(loader))
    return time.perf_counter() - t, time.process_time() - cpu, first


def measure(shards: str, records: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """Every figure of one shard directory (module docstring), in this process."""
    import torch

    from benchmarks.reader_throughput import standin_collate
    from configs import load_config
    from data_shards.manifest import load_manifest
    from modeling.data import build_loader

    torch.set_num_threads(1)
    cfg = load_config(None, [f"data.shards={shards}"])
    base = _rss_mib()
    manifest = load_manifest(shards)
    train = manifest["splits"]["train"]

    def make(world_size: int = 1, collate: bool = False) -> Any:
        loader = build_loader(cfg, "train", batch_size=batch_size, world_size=world_size, num_workers=0,
                              drop_last=True)  # fmt: skip
        if collate:
            loader.collate_fn = standin_collate
        return loader

    out: dict[str, Any] = {
        "interactions": manifest["num_interactions"],
        "users": manifest["num_users"],
        "items": manifest["num_items"],
        "records": train["records"],
        "shards": len(train["shards"]),
    }
    for world_size in (1, 2):
        # A split smaller than --records (1M interactions: 53K records in 2 shards) is read whole, so
        # its one-off shard decodes are spread over as many records as the split has.
        n = min(records, len(make(world_size)) * batch_size)
        out[f"w{world_size}_records"] = n
        for collate in (False, True):
            key = f"w{world_size}_{'ids' if collate else 'raw'}"
            out[f"{key}_start"] = read_rate(make(world_size, collate), n, skip_to_end=False)
            out[f"{key}_deep"] = read_rate(make(world_size, collate), n, skip_to_end=True)
    # Restore at 90 % of the epoch (world size 1), and a world-size-2 state re-planned onto world size 1.
    probe = make()
    at = int(0.9 * len(probe))
    state = {**probe.state_dict(), "batch": at}
    runs = [restore_time(make, state)[:2] for _ in range(repeats)]
    out["restore_s"] = statistics.median(t for t, _ in runs)
    out["restore_cpu_s"] = statistics.median(c for _, c in runs)
    out["restore_all_s"] = [round(t, 3) for t, _ in runs]
    two = make(2)
    state2 = json.loads(json.dumps({**two.state_dict(), "batch": int(0.9 * len(two))}))
    runs = [restore_time(make, state2, replan=True)[:2] for _ in range(repeats)]
    out["restore_replan_s"] = statistics.median(t for t, _ in runs)
    out["restore_replan_cpu_s"] = statistics.median(c for _, c in runs)
    replanned = make()
    replanned.load_state_dict(state2, replan=True)
    out["state_bytes"] = len(json.dumps(replanned.state_dict()))
    out["state_bytes_plain"] = len(json.dumps(state))
    out["rss_base_mib"] = round(base, 1)
    out["reader_rss_mib"] = round(_peak_mib() - base, 1)
    out["rss_end_mib"] = round(_rss_mib() - base, 1)
    out["load_average"] = os.getloadavg()
    return out


def build(workdir: Path, size: int, items: int) -> Path:
    """The shards of the synthetic log of ``size`` interactions (built once, kept in ``workdir``)."""
    out = workdir / f"shards-{size}"
    if (out / "manifest.json").exists():
        return out
    log = workdir / f"log-{size}-{items}.parquet"
    if not log.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "synthetic_log.py"), "--interactions",
                        str(size), "--items", str(items), "--out", str(log)], check=True)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "launcher", "shards", "build", str(log), "--out", str(out), "--force",
                    "--rating-col", "rating", "--engine-threads", "1"],
                   env=env, cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return out


def run(shards: Path, records: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """``measure`` in a fresh Python process (its own RSS), as one JSON line of its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--measure", str(shards), "--records", str(records),
           "--batch-size", str(batch_size), "--repeats", str(repeats)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"measuring {shards} failed: {proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the results (records/s: raw records, rank 0 of world size 1 / 2, wall)."""
    head = ("| interactions | records | shards | rec/s start w1 / w2 | rec/s deep w1 / w2 | ids rec/s start "
            "w1 / w2 | ids rec/s deep w1 / w2 | CPU rec/s start / deep (w1 raw) | restore s (90 %) | "
            "restore CPU s | first batch s start / deep (w1 raw) | restore s (2→1 replan) | reader RSS MiB | state bytes |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def pair(r: dict[str, Any], kind: str, where: str) -> str:
        return f"{r[f'w1_{kind}_{where}']['wall']:,.0f} / {r[f'w2_{kind}_{where}']['wall']:,.0f}"

    for r in rows:
        lines.append(
            f"| {r['interactions']:,} | {r['records']:,} | {r['shards']} | {pair(r, 'raw', 'start')} | "
            f"{pair(r, 'raw', 'deep')} | {pair(r, 'ids', 'start')} | {pair(r, 'ids', 'deep')} | "
            f"{r['w1_raw_start']['cpu']:,.0f} / {r['w1_raw_deep']['cpu']:,.0f} | {r['restore_s']:.2f} | "
            f"{r['restore_cpu_s']:.2f} | {r['w1_raw_start']['first_s']:.2f} / {r['w1_raw_deep']['first_s']:.2f} | "
            f"{r['restore_replan_s']:.2f} | {r['reader_rss_mib']:.0f} | {r['state_bytes']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--records", type=int, default=200_000, help="records read per rate figure")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="restores per median")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/recgpt-reader-scale"))
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one shard directory, this process
    a = ap.parse_args(argv)
    if a.measure:
        print(json.dumps(measure(a.measure, a.records, a.batch_size, a.repeats)), flush=True)
        return 0
    a.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sorted(a.sizes):
        r = {"size": size, **run(build(a.workdir, size, a.items), a.records, a.batch_size, a.repeats)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
