"""Peak memory per rank for ZeRO 0 / 2 / 3: 2 processes, ~100M parameters, full tuning, a few steps.

Trains ``model.preset=base`` (GPT-2-small shape, 12 x 768; ~95M parameters with the item tokens) with
``recgpt train`` under torchrun for each stage and reads the peak memory the trainer logs
(``perf/peak_memory_gb``: CPU peak RSS on CPU, CUDA allocator peak on GPU; the max over ranks, and
rank 0's own) and the memory held after the last step (``perf/memory_gb``: current RSS / CUDA
allocated bytes, max over ranks) — the steady state, where model + optimizer state dominate. On CPU
the RSS includes ~0.5 GB of interpreter and libraries per process. Under ZeRO-3 the model is built
already partitioned (``deepspeed.zero.Init`` through transformers), so no rank holds it whole.

Expectation: fp32 weights + gradients + AdamW states = 16 bytes/parameter (~1.5 GB) per rank at
ZeRO-0; ZeRO-2 partitions gradients and optimizer states, ZeRO-3 also the weights (~half of that on
2 ranks, plus gathered working copies).

    python benchmarks/zero_memory.py [--shards DIR] [--stages 0,2,3] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script (torchrun too): the project's packages
BIN = Path(sys.executable).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="shard directory (default: build the bundled sample into a temp dir)")
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="extra config overrides")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recgpt-zero-memory-"))
    shards = args.shards
    if shards is None:
        from launcher.cli import main as cli

        shards = str(work / "shards")
        assert cli(["shards", "build", str(REPO / "data" / "ml-latest-small.zip"), "--out", shards]) == 0
    env = dict(
        os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false"
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    rows = []
    for stage in map(int, args.stages.split(",")):
        out = work / f"zero{stage}"
        cmd = [
            str(BIN / "torchrun"), "--standalone", "--no-python", f"--nproc_per_node={args.nproc}", "recgpt",
            "train", "--config", str(REPO / "configs" / "tiny.yaml"), f"data.shards={shards}",
            f"train.output_dir={out}", "model.preset=base", f"zero.stage={stage}", "train.micro_batch_size=4",
            "data.max_history=20", f"train.max_steps={args.steps}", "train.log_interval=1",
            "train.eval_interval=0", "train.checkpoint_interval=0", "eval.batch_size=32",
            "logging.progress=none", *args.overrides,
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"zero.stage={stage} failed:\n{proc.stderr[-4000:]}")
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        last = [r for r in log if r["kind"] == "train"][-1]
        row = {
            "stage": stage,
            "peak_gb_max_rank": round(last["peak_memory_gb"], 3),
            "peak_gb_rank0": round(last["peak_memory_gb_rank0"], 3),
            "steady_gb_max_rank": round(last["memory_gb"], 3),
        }
        rows.append(row)
        print(
            f"ZeRO-{stage}: per rank: held after the last step {row['steady_gb_max_rank']:.2f} GB, "
            f"peak {row['peak_gb_max_rank']:.2f} GB (rank 0 {row['peak_gb_rank0']:.2f} GB)",
            flush=True,
        )
    print(json.dumps({"nproc": args.nproc, "rows": rows}))


if __name__ == "__main__":
    main()
