"""recgpt at scale, one table: build, read, train, evaluate, export and serve at 1M / 10M / 50M interactions.

    OMP_NUM_THREADS=1 python benchmarks/scale.py [--sizes 1000000 10000000 50000000] [--items 1000000] \
        [--workdir /tmp/recgpt-scale] [--train-steps 30] [--eval-users 1000] [--requests 100]

For each size, in ``--workdir/<size>-<items>/`` (the log in ``--workdir``, named as
``benchmarks/build_scale.py`` and ``benchmarks/reader_scale.py`` name it, so one workdir serves all three):

* **log**: ``benchmarks/synthetic_log.py`` (seed 0, users = interactions / 20), written once;
* **build**: ``recgpt shards build`` measured by ``build_scale.measure`` (wall seconds, peak RSS of the
  build process; default settings, one DuckDB thread); interactions, users and items are the manifest's;
* **reader**: ``reader_scale.run`` in a fresh process; the table shows raw records/s of rank 0 of world
  size 1 from the start of the train split (its first column), the rest is in the JSON;
* **train**: ``python -m launcher train`` (one process, ``configs/tiny.yaml``, sampled softmax:
  ``train.loss=sampled train.num_negatives=--negatives``, so the loss does not grow with the catalogue)
  for ``--train-steps`` steps, logging every ``LOG_INTERVAL``; samples/s and step time are the medians
  over the logged windows of ``train_log.jsonl`` after the first (warm-up: imports, first shard, the
  allocator's first pass). The single validation at the end scores ``--eval-users`` users
  (``eval.max_users``), as does the export's parity check;
* **export**: ``python -m launcher export`` of the final checkpoint: wall seconds (parity check
  included) and the directory's size;
* **serve** (a fresh process, ``--serve``): the export loaded once (``modeling.serving.load_export``,
  as ``recgpt recommend`` and ``recgpt evaluate --model`` load it), then (1) full-ranking evaluation of
  the first ``--eval-users`` users of the valid split over every item, in ``eval.item_chunk`` item chunks
  (``trainer.evaluate.evaluate`` on ``modeling.data.build_loader``'s loader: the code of ``recgpt
  evaluate``), users/s of its wall time; (2) ``--requests`` one-user requests, each the history of one
  test-split user as original item ids, through what ``recgpt recommend`` runs once it has loaded the
  export (``resolve_history`` then ``recommend``, top 10, history excluded); p50 / p99 of their wall
  time, after one untimed warm-up request.

Every subprocess runs with ``OMP_NUM_THREADS=1``. Each stage's figures go to ``<stage>.json`` beside its
outputs with the settings it was measured with; a rerun reuses a stage whose settings are unchanged
(and every stage before it was reused), so an interrupted run resumes, and a size whose ``row.json``
holds the same settings is not measured again. Prints one JSON line per size, the Markdown table and
one JSON line of every row with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the project's packages, not only what the venv installed

from benchmarks import build_scale, reader_scale  # noqa: E402

CONFIG = REPO / "configs" / "tiny.yaml"
LOG_INTERVAL = 5
"""Training steps per logged window; the first window is the warm-up and is not counted."""
TOP_K = 10
"""Items a recommend request returns (``recgpt recommend``'s default -k)."""


def _env() -> dict[str, str]:
    """The environment of every child: one thread each (a shared machine, comparable figures)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], what: str) -> float:
    """Runs ``cmd`` in the repository root; its wall seconds. Stops with its stderr's tail on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}")
    return time.perf_counter() - t0


def _dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model and count, memory (GiB), versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem_gib = round(int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):  # not Linux
        mem_gib = None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("torch", "deepspeed", "transformers", "duckdb")},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- the stages of one size


def write_log(workdir: Path, size: int, items: int) -> Path:
    """The synthetic log of ``size`` interactions over ``items`` items (written once, kept)."""
    log = workdir / f"log-{size}-{items}.parquet"
    if not log.exists():
        _run([sys.executable, str(REPO / "benchmarks" / "synthetic_log.py"), "--interactions", str(size),
              "--items", str(items), "--out", str(log)], "synthetic_log.py")  # fmt: skip
    return log


def train(shards: Path, run_dir: Path, steps: int, negatives: int, eval_users: int) -> dict[str, Any]:
    """``steps`` steps of sampled-softmax training from scratch; samples/s and step seconds (medians of
    the logged windows after the first) and the command's wall seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a partial run of an interrupted benchmark: start afresh
    wall = _run([sys.executable, "-m", "launcher", "train", "--config", str(CONFIG), f"data.shards={shards}",
                 f"train.output_dir={run_dir}", f"train.max_steps={steps}", "train.loss=sampled",
                 f"train.num_negatives={negatives}", "train.eval_interval=0", "train.checkpoint_interval=0",
                 f"train.log_interval={LOG_INTERVAL}", f"eval.max_users={eval_users}", "train.resume=never",
                 "logging.progress=plain", "logging.tensorboard=false"], "train")  # fmt: skip
    windows = [r for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
               if r["kind"] == "train"][1:]  # fmt: skip
    return {
        "train_samples_per_s": statistics.median(w["samples_per_s"] for w in windows),
        "train_step_s": statistics.median(w["step_time_s"] for w in windows),
        "train_windows": len(windows),
        "train_wall_s": round(wall, 1),
    }


def export(run_dir: Path, out: Path) -> dict[str, Any]:
    """``recgpt export`` of the run's final checkpoint: wall seconds and the directory's size."""
    wall = _run([sys.executable, "-m", "launcher", "export", "--checkpoint", str(run_dir), "--out", str(out),
                 "--force"], "export")  # fmt: skip
    return {"export_s": wall, "export_mib": _dir_bytes(out) / 2**20}


def _in_fresh_process(what: str, *args: str) -> dict[str, Any]:
    """This script with ``args`` (an internal ``--serve`` / ``--split`` measure) in a fresh process (its
    own memory, nothing imported before): the one JSON line it prints last."""
    proc = subprocess.run(
        [sys.executable, __file__, *args], env=_env(), cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{what} failed: {proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve(export_dir: Path, eval_users: int, requests: int) -> dict[str, Any]:
    """:func:`measure_serving` in a fresh process."""
    return _in_fresh_process(f"serving {export_dir}", "--serve", str(export_dir), "--eval-users",
                             str(eval_users), "--requests", str(requests))  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear between order statistics (numpy's default)."""
    return float(np.percentile(values, q))


def measure_serving(export_dir: str, eval_users: int, requests: int) -> dict[str, Any]:
    """Evaluation users/s and recommend latency of one export, in this process (module docstring)."""
    import torch

    from configs import load_config
    from modeling.data import build_loader
    from modeling.serving import CONFIG_FILE, load_export, recommend, resolve_history
    from trainer.evaluate import evaluate

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tokenizer, items, spec = load_export(export_dir)
    load_s = time.perf_counter() - t0
    # The run's own evaluation settings (eval.item_chunk, batch size, exclude_seen), as recgpt evaluate --model.
    cfg = load_config(Path(export_dir) / CONFIG_FILE, [f"eval.max_users={eval_users}"], saved=True)
    loader = build_loader(cfg, "valid", tokenizer, items)
    t0 = time.perf_counter()
    metrics = evaluate(model, loader, cfg, torch.device("cpu"))
    eval_s = time.perf_counter() - t0

    # Requests: the histories of the first test users (as original ids, what a caller sends), in turn.
    users = load_config(Path(export_dir) / CONFIG_FILE, [f"eval.max_users={requests}"], saved=True)
    records = [r for r in next(iter(build_loader(users, "test", batch_size=requests, num_workers=0)))
               if not r.get("pad")]  # fmt: skip
    histories = [[items[i]["item_id"] for i in r["items"][:-1]] for r in records]  # the last is the target

    def request(entries: list[Any]) -> tuple[float, float]:
        """Seconds of one request: (resolving the ids, scoring and ranking), as ``recgpt recommend``."""
        t = time.perf_counter()
        history = resolve_history(entries, items, "--history")
        t_resolved = time.perf_counter()
        recommend(model, tokenizer, items, spec, history, TOP_K, exclude_seen=True)
        return t_resolved - t, time.perf_counter() - t_resolved

    request(histories[0])  # warm-up: first-call allocations, not a request's cost
    timed = [request(histories[i % len(histories)]) for i in range(requests)]
    total_ms = [1e3 * (a + b) for a, b in timed]
    return {
        "load_s": load_s,
        "eval_users": int(metrics["num_examples"]),
        "eval_s": eval_s,
        "eval_users_per_s": metrics["num_examples"] / eval_s,
        "eval_item_chunk": cfg.eval.item_chunk,
        "eval_ndcg@10": metrics.get("ndcg@10"),
        "requests": len(timed),
        "recommend_p50_ms": _percentile(total_ms, 50),
        "recommend_p99_ms": _percentile(total_ms, 99),
        "resolve_p50_ms": _percentile([1e3 * a for a, _ in timed], 50),
        "score_p50_ms": _percentile([1e3 * b for _, b in timed], 50),
    }


def step_split(shards: Path, negatives: int, steps: int) -> dict[str, Any]:
    """:func:`measure_step_split` in a fresh process."""
    return _in_fresh_process(f"step split on {shards}", "--split", str(shards), "--negatives", str(negatives),
                             "--split-steps", str(steps))  # fmt: skip


def measure_step_split(shards: str, negatives: int, steps: int) -> dict[str, Any]:
    """Where a training step's time goes at this catalogue size, in this process: the loss forward
    (sampled softmax: ``negatives`` + in-batch, logQ), its backward, the AdamW step and ``zero_grad``, on
    the train split's first batches, in milliseconds (medians over ``steps`` steps after one warm-up;
    ``configs/tiny.yaml``, the trainer's model, loss and optimizer, without DeepSpeed). The loss reads
    only its candidates' rows; the backward fills the item table's dense gradient and AdamW updates
    every row: those two grow with the catalogue."""
    import torch

    from configs import load_config
    from data_shards.manifest import read_items
    from modeling.data import build_loader
    from modeling.factory import build_model_and_tokenizer
    from modeling.loss import LossComputer
    from trainer.engine import build_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(CONFIG, [f"data.shards={shards}", "train.loss=sampled", f"train.num_negatives={negatives}",
                               "data.num_workers=0"])  # fmt: skip
    items = read_items(shards)
    model, tokenizer = build_model_and_tokenizer(cfg, shards)
    model.train()
    counts = [it.get("count") for it in items]
    loss_fn = LossComputer(cfg, None if None in counts else [int(c) for c in counts])
    optimizer = build_optimizer(cfg, model)
    times: dict[str, list[float]] = {
        "forward_ms": [],
        "backward_ms": [],
        "optimizer_ms": [],
        "zero_grad_ms": [],
    }
    batches = iter(build_loader(cfg, "train", tokenizer, items))
    for i in range(steps + 1):
        batch = next(batches)
        t0 = time.perf_counter()
        loss, _ = loss_fn(model, batch, step=i)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if i:  # the first step is warm-up (first allocations, AdamW's state)
            for k, a, b in zip(times, (t0, t1, t2, t3), (t1, t2, t3, t4)):
                times[k].append(1e3 * (b - a))
    return {f"split_{k}": statistics.median(v) for k, v in times.items()} | {
        "split_parameters": sum(p.numel() for p in model.parameters()),
        "split_steps": steps,
    }


# --------------------------------------------------------------------------- one size, resumable


class Stages:
    """The stages of one size in order, each measured once: its figures and settings in
    ``<dir>/<name>.json``; reused when the settings are the same, the output it left is still there
    and every earlier stage was reused too (a stage measured again invalidates what follows)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.fresh = False
        """True once a stage was measured in this run: the later ones are measured too."""

    def run(self, name: str, settings: dict[str, Any], output: Path, measure: Callable[[], dict]) -> dict:
        path = self.dir / f"{name}.json"
        if not self.fresh and path.exists() and output.exists():
            saved = json.loads(path.read_text())
            if saved["settings"] == settings:
                return saved["figures"]
        self.fresh = True
        figures = measure()
        path.write_text(json.dumps({"settings": settings, "figures": figures}))
        return figures


def measure_size(a: argparse.Namespace, size: int) -> dict[str, Any]:
    """The row of one size (module docstring), reusing what an earlier run measured."""
    d = a.workdir / f"{size}-{a.items}"
    d.mkdir(parents=True, exist_ok=True)
    settings = {"size": size, "items": a.items, "train_steps": a.train_steps, "negatives": a.negatives,
                "eval_users": a.eval_users, "requests": a.requests, "reader_records": a.reader_records,
                "split_steps": a.split_steps}  # fmt: skip
    row_file = d / "row.json"
    if row_file.exists() and json.loads(row_file.read_text())["settings"] == settings:
        return json.loads(row_file.read_text())
    load_before = [round(x, 2) for x in os.getloadavg()]
    log = write_log(a.workdir, size, a.items)
    shards, run_dir, export_dir = d / "shards", d / "run", d / "export"
    stages = Stages(d)
    build = stages.run("build", {"size": size, "items": a.items}, shards / "manifest.json",
                       lambda: build_scale.measure(log, shards, threads=1, engine="local", memory_gb=2.0))  # fmt: skip
    reader = stages.run("reader", {"records": a.reader_records}, shards / "manifest.json",
                        lambda: reader_scale.run(shards, a.reader_records, batch_size=256, repeats=1))  # fmt: skip
    trained = stages.run("train", {"steps": a.train_steps, "negatives": a.negatives, "eval_users": a.eval_users},
                         run_dir / "metrics.json",
                         lambda: train(shards, run_dir, a.train_steps, a.negatives, a.eval_users))  # fmt: skip
    split = stages.run("split", {"negatives": a.negatives, "steps": a.split_steps}, shards / "manifest.json",
                       lambda: step_split(shards, a.negatives, a.split_steps))  # fmt: skip
    exported = stages.run(
        "export", {}, export_dir / "export_manifest.json", lambda: export(run_dir, export_dir)
    )
    served = stages.run("serve", {"eval_users": a.eval_users, "requests": a.requests}, export_dir,
                        lambda: serve(export_dir, a.eval_users, a.requests))  # fmt: skip
    row = {
        "settings": settings,
        "interactions": build["interactions"],
        "users": build["users"],
        "items": build["items"],
        "build_wall_s": build["wall_s"],
        "build_cpu_s": build["cpu_s"],
        "build_peak_rss_gib": build["peak_rss_gib"],
        "reader_rec_per_s": reader["w1_raw_start"]["wall"],
        "reader": reader,
        **trained,
        **split,
        **exported,
        **served,
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    row_file.write_text(json.dumps(row))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table, one row per size."""
    head = ("| interactions | items | users | build wall s | build peak RSS GiB | reader rec/s | train samples/s "
            "| step ms | step split ms: forward / backward / AdamW | eval users/s | export s | export MiB "
            "| recommend p50 / p99 ms |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['interactions']:,} | {r['items']:,} | {r['users']:,} | {r['build_wall_s']:.1f} | "
            f"{r['build_peak_rss_gib']:.2f} | {r['reader_rec_per_s']:,.0f} | {r['train_samples_per_s']:,.1f} | "
            f"{1e3 * r['train_step_s']:,.1f} | {r['split_forward_ms']:,.0f} / {r['split_backward_ms']:,.0f} / "
            f"{r['split_optimizer_ms']:,.0f} | {r['eval_users_per_s']:,.1f} | {r['export_s']:.1f} | "
            f"{r['export_mib']:,.1f} | {r['recommend_p50_ms']:,.1f} / {r['recommend_p99_ms']:,.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000],
                    help="interactions of each synthetic log")  # fmt: skip
    ap.add_argument("--items", type=int, default=1_000_000, help="catalogue size of the synthetic logs")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/recgpt-scale"))
    ap.add_argument("--train-steps", type=int, default=30, help=f"at least {2 * LOG_INTERVAL}")
    ap.add_argument("--negatives", type=int, default=1024, help="train.num_negatives of the sampled softmax")
    ap.add_argument("--eval-users", type=int, default=1000, help="valid users ranked over every item")
    ap.add_argument("--requests", type=int, default=100, help="timed one-user recommend requests")
    ap.add_argument("--reader-records", type=int, default=200_000, help="records per reader rate figure")
    ap.add_argument("--split-steps", type=int, default=10, help="steps timed part by part (the step split)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # internal: one export directory, this process
    ap.add_argument("--split", help=argparse.SUPPRESS)  # internal: one shard directory, this process
    a = ap.parse_args(argv)
    if a.serve:
        print(json.dumps(measure_serving(a.serve, a.eval_users, a.requests)), flush=True)
        return 0
    if a.split:
        print(json.dumps(measure_step_split(a.split, a.negatives, a.split_steps)), flush=True)
        return 0
    if a.train_steps < 2 * LOG_INTERVAL:
        ap.error(f"--train-steps: at least {2 * LOG_INTERVAL} (the first log window is warm-up)")
    if min(a.eval_users, a.requests, a.negatives, a.reader_records, a.split_steps) < 1:
        ap.error("--eval-users, --requests, --negatives, --reader-records and --split-steps must be >= 1")
    a.workdir = a.workdir.resolve()  # the children run in the repository root
    a.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sorted(a.sizes):
        row = measure_size(a, size)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "reader"}), flush=True)
    print("\n" + table(rows))
    print(json.dumps({"machine": machine(), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
