"""A ~1M-item catalogue on 2 ranks: model + optimizer state per rank under ZeRO-0 and ZeRO-3, and a
ZeRO-3 run of ``--steps`` steps that checkpoints, loses a rank, resumes exactly and exports.

    python benchmarks/zero_catalogue.py --shards DIR [--steps 200] [--memory-steps 10] \\
        [--precisions bf16,fp32] [--negatives 1024] [--workdir /tmp/recgpt-zero-catalogue]

``DIR``: shards with a large catalogue, e.g. ``benchmarks/scale.py``'s 50M-interaction build
(``/tmp/recgpt-scale/50000000-1000000/shards``: 993,968 items). Every run is ``torchrun --standalone
--nproc_per_node 2 recgpt train`` on ``configs/tiny.yaml`` (2 x 64; the item table is ~99 % of the
weights) with the sampled softmax (``--negatives`` uniform negatives + in-batch, logQ-corrected), one
thread per process, validation of ``eval.max_users`` users over every item:

1. **memory**: for each precision, ZeRO-0 and ZeRO-3 (the model created partitioned under
   ``deepspeed.zero.Init``) for ``--memory-steps`` steps. The figure is the trainer's ``state`` record at
   the end (``trainer.monitor.state_bytes``: bytes of the tensors each rank holds for the model and the
   optimizer, moments, master copies and gradient buffers included; each storage once), the steady state
   between steps, plus the held RSS after the last step (``perf/memory_gb``, max over ranks: interpreter,
   libraries and allocator included).
2. **zero3 run**: ZeRO-3 at the first precision for ``--steps`` steps, a checkpoint (and validation) every
   ``steps / 2``; rank 1 is killed (``RECGPT_FAULT=kill:<3/4 steps>:1``) after the half-way checkpoint, so
   torchrun fails; the same command again resumes from that checkpoint and completes. Exact resume is
   checked: the losses logged between the checkpoint and the kill must be equal, bit for bit, in both
   attempts.
3. **export** of the final checkpoint (``recgpt export``, its parity check included), then what ``recgpt
   recommend`` runs on it (``benchmarks/scale.py``'s serving measure: ranking ``--eval-users`` users over
   every item, ``--requests`` one-user requests).

Prints a Markdown table and one JSON line with every figure and the machine; the figures are kept in
``WORKDIR/result.json``.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.scale import CONFIG, _dir_bytes, _env, machine, serve  # noqa: E402

BIN = Path(sys.executable).parent
MARK = ".zero_catalogue"
"""The file that marks a workdir this script made (and may empty)."""


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    log = run_dir / "train_log.jsonl"
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == kind]


def torchrun(
    shards: Path, run_dir: Path, overrides: list[str], nproc: int, fault: str = ""
) -> tuple[int, float]:
    """One ``recgpt train`` under torchrun; (return code, wall seconds). Its output goes to ``run_dir.log``."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python", "recgpt", "train",
           "--config", str(CONFIG), f"data.shards={shards}", f"train.output_dir={run_dir}",
           "logging.progress=plain", "logging.tensorboard=false", *overrides]  # fmt: skip
    env = {**_env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RECGPT_FAULT": fault}
    t0 = time.perf_counter()
    with open(f"{run_dir}.log", "a") as log:
        log.write(f"$ {'RECGPT_FAULT=' + fault + ' ' if fault else ''}{' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def run_figures(run_dir: Path) -> dict[str, Any]:
    """State bytes per rank (the ``state`` record), held/peak RSS and step time of the last window."""
    state = _records(run_dir, "state")[-1]
    last = _records(run_dir, "train")[-1]
    setup = _records(run_dir, "setup")[-1]
    saves = [r["save_s"] for r in _records(run_dir, "checkpoint")]
    total = [m + o for m, o in zip(state["model_bytes"], state["optimizer_bytes"])]
    return {
        "state_mib_per_rank": [round(t / 2**20, 1) for t in total],
        "model_mib_per_rank": [round(m / 2**20, 1) for m in state["model_bytes"]],
        "optimizer_mib_per_rank": [round(o / 2**20, 1) for o in state["optimizer_bytes"]],
        "held_rss_gb": round(last["memory_gb"], 3),
        "peak_rss_gb": round(last["peak_memory_gb"], 3),
        "step_s": round(last["step_time_s"], 3),
        "model_build_s": setup["model_s"],
        "engine_s": setup["engine_s"],
        "checkpoint_save_s": saves,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--shards", type=Path, required=True, help="shards with a large catalogue")
    ap.add_argument(
        "--steps", type=int, default=200, help="steps of the ZeRO-3 run (a positive multiple of 20)"
    )
    ap.add_argument("--memory-steps", type=int, default=10, help="steps of each memory run")
    ap.add_argument("--precisions", default="bf16,fp32",
                    help="comma-separated, of fp32 / bf16 / fp16: the memory runs; the ZeRO-3 run uses the first")  # fmt: skip
    ap.add_argument("--negatives", type=int, default=1024, help="sampled negatives per micro-batch")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (processes) of every run, at least 2")
    ap.add_argument(
        "--eval-users", type=int, default=200, help="validation users, and users ranked after export"
    )
    ap.add_argument("--requests", type=int, default=20, help="one-user recommend requests on the export")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/recgpt-zero-catalogue"),
                    help="the runs, export and result.json; emptied first if an earlier run of this script made "
                    "it, refused if it holds anything else")  # fmt: skip
    a = ap.parse_args(argv)
    manifest = a.shards / "manifest.json"
    if not manifest.is_file():
        ap.error(f"--shards: {manifest} not found")
    if a.steps < 20 or a.steps % 20:
        # The checkpoint (steps / 2) and the kill (3/4 steps) fall on log steps (every 5): the windows
        # logged after the resume are then the same steps as before the kill, and comparable.
        ap.error(f"--steps: a positive multiple of 20, got {a.steps}")
    precisions = a.precisions.split(",")
    if not set(precisions) <= {"fp32", "bf16", "fp16"}:
        ap.error(f"--precisions: fp32, bf16 or fp16, comma-separated; got {a.precisions!r}")
    if a.nproc < 2 or min(a.memory_steps, a.negatives, a.eval_users, a.requests) < 1:
        ap.error("--nproc must be >= 2; --memory-steps, --negatives, --eval-users and --requests >= 1")
    work = a.workdir.resolve()
    if work == a.shards.resolve() or work in a.shards.resolve().parents:
        ap.error(f"--workdir: {work} holds the shards and would be emptied first; choose another directory")
    if work.exists() and any(work.iterdir()) and not (work / MARK).exists():
        ap.error(f"--workdir: {work} is not empty and was not made by this script (it would be emptied)")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARK).write_text("made by benchmarks/zero_catalogue.py: its next run empties this directory\n")
    items = json.loads(manifest.read_text()).get("num_items")
    common = ["train.loss=sampled", f"train.num_negatives={a.negatives}", f"eval.max_users={a.eval_users}",
              "eval.batch_size=64", "train.log_interval=5", "train.resume=auto"]  # fmt: skip
    result: dict[str, Any] = {"shards": str(a.shards), "items": items, "nproc": a.nproc, "memory": []}

    for precision in precisions:  # 1. memory
        for stage in (0, 3):
            run = work / f"memory-{precision}-zero{stage}"
            rc, wall = torchrun(a.shards, run, [*common, f"zero.stage={stage}", f"train.precision={precision}",
                                                f"train.max_steps={a.memory_steps}", "train.eval_interval=0",
                                                "train.checkpoint_interval=0"], a.nproc)  # fmt: skip
            if rc:
                raise SystemExit(f"{run.name} failed ({rc}); see {run}.log")
            row = {"precision": precision, "stage": stage, "wall_s": round(wall, 1), **run_figures(run)}
            result["memory"].append(row)
            print(json.dumps(row), flush=True)

    # 2. the ZeRO-3 run: checkpoint at half, rank 1 killed one step after three quarters, resumed,
    # completed. One step after: the log record of the three-quarter step travels in the next step's
    # all-reduce (Monitor.log_train(defer)), so the killed attempt has written it when rank 1 dies and
    # the windows from half to three quarters can be compared with the resumed attempt's.
    half, kill = a.steps // 2, 3 * a.steps // 4 + 1
    run = work / "zero3-run"
    overrides = [*common, "zero.stage=3", f"train.precision={precisions[0]}", f"train.max_steps={a.steps}",
                 f"train.eval_interval={half}", f"train.checkpoint_interval={half}"]  # fmt: skip
    rc1, wall1 = torchrun(a.shards, run, overrides, a.nproc, fault=f"kill:{kill}:1")
    if rc1 == 0:
        raise SystemExit(f"the first attempt was to lose rank 1 at step {kill} but completed; see {run}.log")
    first_records = _records(run, "train")
    first = {r["step"]: r["loss"] for r in first_records}
    rc2, wall2 = torchrun(a.shards, run, overrides, a.nproc)
    if rc2:
        raise SystemExit(f"the resumed attempt failed ({rc2}); see {run}.log")
    text = Path(f"{run}.log").read_text()
    resumed_line = next((ln for ln in text.splitlines() if ln.startswith("resumed from")), "")
    second = _records(run, "train")[len(first_records) :]  # the log is appended to by the second attempt
    redone = {r["step"]: r["loss"] for r in second if r["step"] in first}
    ckpt = run / "checkpoints" / f"step_{a.steps:08d}"
    result["zero3_run"] = {
        "precision": precisions[0],
        "steps": a.steps,
        "checkpoint_every": half,
        "killed_at": kill,
        "first_attempt_rc": rc1,
        "first_attempt_wall_s": round(wall1, 1),
        "resumed_wall_s": round(wall2, 1),
        "resumed_line": resumed_line,
        "redone_steps_compared": sorted(redone),
        "exact_resume": bool(redone) and all(first[s] == v for s, v in redone.items()),
        "checkpoint_mib": round(_dir_bytes(ckpt) / 2**20, 1),
        "metrics": json.loads((run / "metrics.json").read_text()),
        **run_figures(run),
    }
    if not result["zero3_run"]["exact_resume"]:
        raise SystemExit(f"resume was not exact: {first} vs {redone}")

    # 3. export and serve
    export_dir = work / "export"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher", "export", "--checkpoint", str(run), "--out",
                           str(export_dir)], env=_env(), cwd=REPO, capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"export failed: {proc.stderr.strip()[-2000:]}")
    result["export"] = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "mib": round(_dir_bytes(export_dir) / 2**20, 1),
    }
    result["serve"] = serve(export_dir, a.eval_users, a.requests)
    result["machine"] = machine()
    (work / "result.json").write_text(json.dumps(result, indent=1))

    print("\n| precision | ZeRO stage | model + optimizer MiB per rank (model) | held RSS GB | step s "
          "| model build s | engine s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in result["memory"]:
        per_rank = " / ".join(f"{s:,.1f}" for s in r["state_mib_per_rank"])
        print(f"| {r['precision']} | {r['stage']} | {per_rank} ({r['model_mib_per_rank'][0]:,.1f}) | "
              f"{r['held_rss_gb']:.2f} | {r['step_s']:.2f} | {r['model_build_s']:.1f} | {r['engine_s']:.1f} |")  # fmt: skip
    z = result["zero3_run"]
    print(f"\nZeRO-3 run: {z['steps']} steps, {z['resumed_line']}; exact resume over steps "
          f"{z['redone_steps_compared']}; checkpoint {z['checkpoint_mib']:,.1f} MiB saved in {z['checkpoint_save_s']} s; state per rank "
          f"{z['state_mib_per_rank']} MiB; export {result['export']['wall_s']} s, {result['export']['mib']:,.1f} MiB; "
          f"recommend p50 / p99 {result['serve']['recommend_p50_ms']:.1f} / {result['serve']['recommend_p99_ms']:.1f} ms")  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
