"""Periodic re-tuning on the bundled sample: the old model, the re-tuned one and one from scratch.

The sample (data/ml-latest-small.zip) is split in time at a quantile of its timestamps into an old
period and a new one (each a ratings.csv + movies.csv directory). Then, every step the public CLI:

1. ``shards build OLD --out shards-old``; ``shards build NEW --base shards-old --out shards-all``
   (carries the old training records: both periods) and ``--base shards-old --out shards-new
   shards.carry_base_train=false`` (only the new targets). Both new builds share valid/test: each
   user's last two interactions of the new period, on which every model below is scored.
2. **old**: ``configs/demo_base.yaml`` trained on the old period (``--steps`` steps) and exported;
   evaluated on the new period as it is (items new since then cannot be recommended by it: the
   metrics count the unknown targets as misses).
3. **from scratch**: the same config on ``shards-all`` (both periods), ``--steps`` steps.
4. **re-tuned**: ``train.init_from=<old export>`` on ``shards-new``, a third of the steps
   (``--retune-fraction``), full tuning, fresh optimizer and schedule.

Each model is scored at its checkpoint with the best validation NDCG@10 (evaluated every tenth of its
steps; the validation targets are each user's second-to-last new interaction): test NDCG@10 (history
masked) of each, wall times, and the first step at which the re-tuned run's validation NDCG@10 reaches
the from-scratch model's best. Everything runs as one process with one thread
(``OMP_NUM_THREADS=1``, ``data.num_workers=0``); about 7 minutes on the 2-core developer machine.

    python benchmarks/retune.py                    # -> runs/retune/summary.json and a Markdown table
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "ml-latest-small.zip"
CONFIG = "configs/demo_base.yaml"
SHARDS = ["--window-stride", "10"]  # as make demo: each target once with >= 40 items of history
QUIET = ["logging.progress=none", "logging.tensorboard=false", "data.num_workers=0"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run(title: str, *args: str) -> tuple[str, float]:
    """``python -m launcher ARGS``: (stdout, wall seconds); exits naming the step on failure."""
    cmd = [sys.executable, "-m", "launcher", *args]
    print(f"\n=== {title}\n$ recgpt {' '.join(args)}", flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE)
    wall = time.time() - t0
    if res.returncode != 0:
        sys.exit(f"retune: step '{title}' failed with exit code {res.returncode}")
    print(res.stdout[-2000:], end="", flush=True)
    print(f"--- {title}: {wall:.0f} s", flush=True)
    return res.stdout, wall


def last_json(text: str) -> dict:
    return json.loads(next(line for line in reversed(text.strip().splitlines()) if line.startswith("{")))


def split_periods(root: Path, quantile: float) -> dict:
    """OLD/ and NEW/ (ratings.csv + movies.csv) split at the ``quantile`` of the timestamps: ties stay
    in the old period."""
    import pandas as pd

    with zipfile.ZipFile(SAMPLE) as z:
        names = {Path(n).name: n for n in z.namelist()}
        ratings = pd.read_csv(io.BytesIO(z.read(names["ratings.csv"])))
        movies = z.read(names["movies.csv"])
    boundary = int(ratings["timestamp"].quantile(quantile))
    parts = {
        "old": ratings[ratings["timestamp"] <= boundary],
        "new": ratings[ratings["timestamp"] > boundary],
    }
    for name, part in parts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        part.to_csv(root / name / "ratings.csv", index=False)
        (root / name / "movies.csv").write_bytes(movies)
    return {
        "boundary_unix": boundary,
        "boundary": pd.Timestamp(boundary, unit="s").isoformat(),
        **{f"{k}_interactions": len(v) for k, v in parts.items()},
    }


def evaluate(title: str, *source: str, data: Path) -> dict:
    out, wall = run(title, "evaluate", *source, "--data", str(data), "--split", "test")
    return {**last_json(out), "eval_wall_s": round(wall, 1)}


def train(title: str, shards: Path, out: Path, steps: int, *extra: str) -> dict:
    interval = max(1, steps // 10)
    _, wall = run(title, "train", "--config", CONFIG, f"data.shards={shards}", f"train.output_dir={out}",
                  f"train.max_steps={steps}", f"train.eval_interval={interval}",
                  f"train.checkpoint_interval={interval}", "train.keep_last=1", *QUIET, *extra)  # fmt: skip
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["ndcg@10"]) for r in log if r.get("kind") == "eval"]
    best = max(curve, key=lambda c: c[1])
    return {"steps": steps, "train_wall_s": round(wall, 1), "valid_ndcg@10_curve": curve,
            "best_valid_step": best[0], "best_valid_ndcg@10": best[1]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/retune", help="where periods, shards, runs and exports go")
    p.add_argument(
        "--quantile", type=float, default=0.8, help="the old period ends at this timestamp quantile"
    )
    p.add_argument(
        "--steps", type=int, default=600, help="training steps of the old and the from-scratch model"
    )
    p.add_argument("--retune-fraction", type=float, default=1 / 3, help="re-tuning steps / --steps")
    p.add_argument("--retune", nargs="*", default=["optim.lr=0.001", "schedule.warmup_steps=10"],
                   help="overrides of the re-tuning run")  # fmt: skip
    args = p.parse_args(argv)
    root = (REPO / args.root).resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.time()
    summary: dict = {"periods": split_periods(root, args.quantile), "config": CONFIG}

    old, all_, new = root / "shards-old", root / "shards-all", root / "shards-new"
    run("build the old period's shards", "shards", "build", str(root / "old"), "--out", str(old), *SHARDS)
    run("build the new period on top of it (both periods' training records)",
        "shards", "build", str(root / "new"), "--base", str(old), "--out", str(all_), *SHARDS)  # fmt: skip
    run("build the new period on top of it (only the new targets)", "shards", "build", str(root / "new"),
        "--base", str(old), "--out", str(new), *SHARDS, "shards.carry_base_train=false")  # fmt: skip
    manifest = json.loads((new / "manifest.json").read_text())
    summary["periods"].update(manifest["period"])
    summary["shards"] = {
        name: json.loads((d / "manifest.json").read_text())["splits"]["train"]["records"]
        for name, d in (("old_train_records", old), ("all_train_records", all_), ("new_train_records", new))
    }

    steps = args.steps
    retune_steps = max(1, round(steps * args.retune_fraction))
    rows: dict[str, dict] = {}
    rows["old"] = train("old model: the old period", old, root / "old-run", steps)
    _, wall = run("export the old model", "export", "--checkpoint", str(root / "old-run"), "--best", "--out",
                  str(root / "old-export"))  # fmt: skip
    rows["old"]["export_wall_s"] = round(wall, 1)
    rows["old"]["test"] = evaluate(
        "old model on the new period", "--model", str(root / "old-export"), data=new
    )
    rows["scratch"] = train("from scratch: both periods", all_, root / "scratch-run", steps)
    rows["scratch"]["test"] = evaluate("from scratch on the new period", "--checkpoint", str(root / "scratch-run"),
                                       "--best", data=new)  # fmt: skip
    rows["retuned"] = train("re-tuned: the old export on the new period", new, root / "retune-run", retune_steps,
                            f"train.init_from={root / 'old-export'}", *args.retune)  # fmt: skip
    rows["retuned"]["test"] = evaluate("re-tuned on the new period", "--checkpoint", str(root / "retune-run"),
                                       "--best", data=new)  # fmt: skip
    summary["rows"] = rows
    summary["retune_overrides"] = args.retune

    target = rows["scratch"]["best_valid_ndcg@10"]
    reached = next((s for s, v in rows["retuned"]["valid_ndcg@10_curve"] if v >= target), None)
    scratch_test, retuned_test = rows["scratch"]["test"]["ndcg@10"], rows["retuned"]["test"]["ndcg@10"]
    summary["verdict"] = {
        "scratch_steps": steps,
        "retune_steps": retune_steps,
        "scratch_best_valid_ndcg@10": target,
        "scratch_best_valid_step": rows["scratch"]["best_valid_step"],
        "retuned_first_step_reaching_it_on_valid": reached,
        "retuned_best_valid_step": rows["retuned"]["best_valid_step"],
        "scratch_test_ndcg@10": scratch_test,
        "retuned_test_ndcg@10": retuned_test,
        "retuned_reaches_scratch_on_test": retuned_test >= scratch_test,
        "retuned_test_over_scratch": retuned_test / scratch_test if scratch_test else None,
    }
    summary["total_wall_s"] = round(time.time() - t0, 1)
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(
        "\n| model | trained on | steps (best valid) | train wall | test NDCG@10 | test HR@10 | unknown targets |"
    )
    print("|---|---|---|---|---|---|---|")
    what = {
        "old": "old period",
        "scratch": "both periods, from scratch",
        "retuned": "new period, from the old export",
    }
    for name, row in rows.items():
        t = row["test"]
        unknown = f"{int(t.get('unknown_targets', 0))} / {int(t['num_examples'])}"
        print(f"| {name} | {what[name]} | {row['steps']} ({row['best_valid_step']}) | {row['train_wall_s']:.0f} s | {t['ndcg@10']:.4f} | "
              f"{t['hr@10']:.4f} | {unknown} |")  # fmt: skip
    print(json.dumps(summary["verdict"], indent=1))
    print(f"total {summary['total_wall_s'] / 60:.1f} min; {root / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
