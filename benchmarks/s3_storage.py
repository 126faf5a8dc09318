"""What an object store costs a run: training from ``s3://`` shards vs local shards, and the time a
checkpoint upload adds, against a local S3 API server (moto) on loopback.

    OMP_NUM_THREADS=1 python benchmarks/s3_storage.py [--steps 60] [--checkpoint-interval 20]

Starts ``moto_server`` (a dev extra) on a free port, builds the bundled sample to a local directory and
to ``s3://``, then runs the same ``recgpt train`` (configs/tiny.yaml, one process) three times: local
shards → local run directory; ``s3://`` shards → local run directory (the shard-streaming cost);
local shards → ``s3://`` run directory (the checkpoint-upload cost, read from the trainer's "mirrored
… s" lines). Prints one table. Loopback has no network latency or bandwidth limit: a real store adds
its round trips (the reader fetches 8 MiB ranges, so a shard costs a few requests) and its bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE = REPO / "data" / "ml-latest-small.zip"
BUCKET = "recgpt-bench"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        raise SystemExit(f"moto_server did not start; see {log}")
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": endpoint,
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    return server, env


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return p


def samples_per_s(log_lines: list[str]) -> float:
    """Mean samples/s of the train records after the first logged step (warm-up, first shard)."""
    recs = [json.loads(x) for x in log_lines]
    rates = [
        r["samples_per_s"] for r in recs if r.get("kind") == "train" and r["step"] > recs[0].get("step", 1)
    ]
    return statistics.mean(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--checkpoint-interval", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recgpt-s3bench-"))
    server, aws = start_moto(work / "moto.log")
    env = {**os.environ, **aws, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RECGPT_FAULT", None)
    recgpt = str(BIN / "recgpt")
    try:
        sys.path.insert(0, str(REPO))
        os.environ.update(aws)
        from data_shards import storage

        storage.filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
        local_shards, s3_shards = work / "shards", f"s3://{BUCKET}/shards"
        run([recgpt, "shards", "build", str(SAMPLE), "--out", str(local_shards)], env)
        run([recgpt, "shards", "build", str(SAMPLE), "--out", s3_shards], env)
        steps = [f"train.max_steps={args.steps}", "train.eval_interval=0", "train.log_interval=5",
                 f"train.checkpoint_interval={args.checkpoint_interval}", "data.num_workers=1"]  # fmt: skip
        rows = []
        for label, shards, out in (
            ("local shards -> local run dir", str(local_shards), str(work / "run-local")),
            ("s3 shards -> local run dir", s3_shards, str(work / "run-s3-shards")),
            ("local shards -> s3 run dir", str(local_shards), f"s3://{BUCKET}/run"),
        ):
            t0 = time.perf_counter()
            p = run([recgpt, "train", "--config", "configs/tiny.yaml", f"data.shards={shards}",
                     f"train.output_dir={out}", *steps], env)  # fmt: skip
            wall = time.perf_counter() - t0
            text = storage.read_bytes(storage.join(out, "train_log.jsonl")).decode().splitlines()
            uploads = re.findall(r"mirrored to \S+ \(([\d.]+) MiB; .*?; ([\d.]+) s\)", p.stdout)
            rows.append((label, samples_per_s(text), wall, uploads))
        base = rows[0][1]
        print(f"\n{'run':<32} {'samples/s':>10} {'vs local':>9} {'wall s':>7}  checkpoint uploads")
        for label, rate, wall, uploads in rows:
            up = ", ".join(f"{float(s):.2f} s ({mib} MiB)" for mib, s in uploads) or "-"
            print(f"{label:<32} {rate:>10.0f} {rate / base:>9.3f} {wall:>7.1f}  {up}")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
