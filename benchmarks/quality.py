"""Recommendation quality on the bundled MovieLens sample, side by side with baselines.

Protocol (docs/RESULTS.md, "Reference figures"): leave-one-out by time per user, full ranking over
every item, HR@10 / NDCG@10 / MRR@10 on the test split at the checkpoint with the best validation
NDCG@10; reported with seen items excluded and (for the SASRec comparison) not excluded.

Resumable: each row writes ``<out>/rows/<row>.json``; a rerun skips finished rows. Rows run as
single-thread processes, ``--parallel`` (default 2) side by side.

    python benchmarks/quality.py                     # every row, then docs/RESULTS.md tables
    python benchmarks/quality.py --rows ids_s1 pop   # some rows
    python benchmarks/quality.py --report-only       # rebuild the tables from finished rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# SASRec-CE, RecBole 1.2.1, history not masked, trained and tested on this split's exact sequences
# (benchmarks/sasrec_reference.py): test NDCG@10 at its best validation epoch, and its minutes to it.
SASREC_NDCG10 = 0.0313  # HR@10 0.0689, MRR@10 0.0197; best validation NDCG@10 0.0441
SASREC_EPOCHS = 11  # the best validation epoch (of 14 run)
SASREC_MINUTES_TO_BEST = 58.0  # 11 epochs of 5.3 minutes on one thread
# The reference SASRec figure first given (docs/RESULTS.md, "Reference figures"): RecBole read the timestamps as float32 (64 s resolution), which
# reorders each user's events within about a minute by movieId — other, easier sequences (not compared).
SASREC_FLOAT32_NDCG10 = 0.0702


@dataclass
class Row:
    name: str
    title: str
    overrides: list[str]
    config: str = "configs/quality_ids.yaml"
    after: str | None = None  # row whose export this row starts from (LoRA adaptation)
    group: str = "main"
    export: bool = False  # export the best checkpoint (a later row starts from it)
    curve: bool = False  # test NDCG@10 (history not masked) at every checkpoint: time to SASRec's figure


# Perturbation radius (L2 per sequence on the input embeddings) for adversarial training and for the
# FGM attack at evaluation: 0.05 already costs an untrained-for model ~40% of its NDCG@10, 0.2 ~90%.
EPSILON = 0.1
ATTACK = f"adversarial.eval_epsilon={EPSILON}"
# SGD's peak learning rate, chosen on the valid split (docs/RESULTS.md, "What helped").
SGD_LR = 0.3


def rows() -> dict[str, Row]:
    r: list[Row] = []
    for seed in (1, 2, 3):
        r.append(
            Row(
                f"ids_s{seed}",
                "recgpt ids, full tuning from scratch",
                [f"seed={seed}"],
                group="ids",
                export=seed == 1,
                curve=True,
            )
        )
    r.append(
        Row(
            "lora",
            "recgpt ids, LoRA + PGD adaptation of the ids export",
            [],
            config="configs/quality_lora.yaml",
            after="ids_s1",
        )
    )
    # Freeze tuning in the LoRA row's place: the same adaptation, training the top block (of 2) and
    # the item rows instead of adapters.
    r.append(
        Row(
            "freeze",
            "recgpt ids, freeze tuning (top block + item rows) + PGD adaptation of the ids export",
            ["lora.enabled=false", "model.trainable_layers=1"],
            config="configs/quality_lora.yaml",
            after="ids_s1",
        )
    )
    # The headline row with SGD (Nesterov momentum 0.9) instead of AdamW; L2 decay off (see RESULTS.md).
    r.append(
        Row(
            "sgd",
            "recgpt ids, full tuning from scratch, SGD",
            ["seed=1", "optim.name=sgd", f"optim.lr={SGD_LR}", "optim.weight_decay=0"],
            group="ids",
        )
    )
    for m in ("fgm", "pgd", "freelb"):
        r.append(
            Row(
                f"adv_{m}",
                f"recgpt ids, full tuning + {m.upper()}",
                [
                    f"adversarial.method={m}",
                    f"adversarial.epsilon={EPSILON}",
                    f"adversarial.alpha={EPSILON / 2}",
                ]
                + ([] if m == "fgm" else ["adversarial.steps=2"]),
                group="adv",
            )
        )
    # PGD's best checkpoint was its last one at 2,000 steps: the same run, twice as long.
    r.append(
        Row(
            "adv_pgd_long",
            "recgpt ids, full tuning + PGD, 4,000 steps",
            next(x for x in r if x.name == "adv_pgd").overrides + ["train.max_steps=4000"],
            group="adv",
            curve=True,
        )
    )
    r.append(Row("text", "recgpt text format, full tuning", [], config="configs/quality_text.yaml"))
    r.append(
        Row(
            "rating",
            "recgpt rating task (10 half-star classes)",
            [],
            config="configs/quality_rating.yaml",
            group="rating",
        )
    )
    return {x.name: x for x in r}


# --------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _cli(*args: str, log: Path | None = None) -> str:
    cmd = [sys.executable, "-m", "launcher", *args]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), text=True, capture_output=True)
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}\n")
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def _json_line(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


WINDOW_STRIDE = (
    10  # overlapping 51-item windows every 10 items: each target trained with >= 40 items of history
)


def ensure_shards(out: Path) -> Path:
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        zip_path = str(REPO / "data" / "ml-latest-small.zip")
        _cli("shards", "build", zip_path, "--out", str(shards), "--window-stride", str(WINDOW_STRIDE))
    return shards


def _eval_config(shards: Path, config: str = "configs/quality_ids.yaml"):
    """A row's config on ``shards``: what the baselines read and score their eval records with."""
    from configs import load_config

    return load_config(REPO / config, [f"data.shards={shards}"])


def _eval_batches(shards: Path, split: str):
    """The real (not padding) raw records of ``split`` per batch, in written order, read by the
    loader factory as the trainer's evaluation reads them (``build_loader`` without a tokenizer)."""
    from modeling.data import build_loader

    for batch in build_loader(_eval_config(shards), split, num_workers=0):
        real = [rec for rec in batch if not rec.get("pad")]
        if real:
            yield real


def _user_records(shards: Path, split: str):
    """Every real (not padding) eval record of ``split``, in written order."""
    for batch in _eval_batches(shards, split):
        yield from batch


def popularity_scores(shards: Path):
    """[num_items] float scores of the most-popular ranking: items ordered by training-interaction
    count, equal counts by first appearance; items never seen in training tie below all others."""
    import torch

    from data_shards.manifest import load_manifest

    n_items = load_manifest(str(shards))["num_items"]
    # Every valid record's `seen` list is exactly that user's training interactions, in time order.
    train = torch.tensor([i for rec in _user_records(shards, "valid") for i in rec["seen"]], dtype=torch.long)
    n = train.numel()
    counts = torch.bincount(train, minlength=n_items)
    first = torch.full((n_items,), n, dtype=torch.long).scatter_reduce(0, train, torch.arange(n), "amin")
    # The position in that order as the score: exact integers (count * (n + 1) is not, in float32).
    order = (counts * (n + 1) - first).argsort(descending=True, stable=True)
    scores = torch.empty(n_items).scatter_(0, order, torch.arange(n_items, 0, -1, dtype=torch.float32))
    return scores.masked_fill(counts == 0, 0.0)


def popularity_rows(shards: Path) -> dict:
    """Most-popular baseline: HR/NDCG/MRR@10 on the test targets, the history masked or not, from
    modeling's full-ranking metrics (``target_ranks``: ties count against the target)."""
    import torch

    from data_shards.records import SEEN_PAD
    from modeling.metrics import ranking_metrics, target_ranks

    scores = popularity_scores(shards)
    ranks: dict[str, list] = {"unmasked": [], "masked": []}
    for recs in _eval_batches(shards, "test"):
        target = torch.tensor([rec["items"][-1] for rec in recs], dtype=torch.long)
        seen = torch.full(
            (len(recs), max(1, *(len(rec["seen"]) for rec in recs))), SEEN_PAD, dtype=torch.long
        )
        for row, rec in enumerate(recs):
            seen[row, : len(rec["seen"])] = torch.tensor(rec["seen"], dtype=torch.long)
        batch_scores = scores.expand(len(recs), -1)
        ranks["unmasked"].append(target_ranks(batch_scores, target, None))
        ranks["masked"].append(target_ranks(batch_scores, target, seen))
    return {name: ranking_metrics(torch.cat(r), (10,)) for name, r in ranks.items()}


def rating_baselines(shards: Path) -> dict:
    """Global-mean and user-mean rating predictors on the test targets (the rating row's baselines),
    scored by modeling's rating metrics (accuracy over the rating levels, RMSE, AUC of rating >= 4)."""
    from data_shards.manifest import load_manifest
    from modeling.metrics import compute_metrics

    cfg = _eval_config(shards, "configs/quality_rating.yaml")
    levels = torch_tensor(load_manifest(str(shards))["rating_levels"])
    # A test record holds the user's last max_history ratings before the target: its training
    # ratings are those of the valid record's window plus the valid target.
    history: dict[str, list[float]] = {}
    for rec in _user_records(shards, "valid"):
        history[rec["user"]] = list(rec["ratings"])
    everything = [r for h in history.values() for r in h]
    global_mean = sum(everything) / len(everything)
    truth, g_pred, u_pred = [], [], []
    for rec in _user_records(shards, "test"):
        truth.append(rec["ratings"][-1])
        g_pred.append(global_mean)
        h = history[rec["user"]]
        u_pred.append(sum(h) / len(h))
    y = torch_tensor(truth)
    label = (y[:, None] - levels[None]).abs().argmin(1)
    out = {}
    for name, pred in (("global_mean", torch_tensor(g_pred)), ("user_mean", torch_tensor(u_pred))):
        outputs = {
            "rating": y,
            "label": label,
            "pred_rating": pred,
            "pred_class": (pred[:, None] - levels[None]).abs().argmin(1),
            "like_score": pred,
        }
        m = compute_metrics(outputs, cfg)
        out[name] = {k: m[k] for k in ("accuracy", "rmse", "auc")}
    return out


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float64)


def _train_log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines() if x.strip()]


def _max_steps(run_dir: Path) -> int:
    from configs import load_config

    return load_config(run_dir / "config.yaml", saved=True).train.max_steps


def test_curve(run_dir: Path, started: float, log: Path) -> list[dict]:
    """Test NDCG@10 (history not masked) of every checkpoint, with the wall time since launch at
    which training reached it (the train log's timestamp of that step)."""
    times = {r["step"]: r["time"] for r in _train_log(run_dir) if r["kind"] == "eval"}
    curve = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        if not (ckpt / "COMPLETE").exists():
            continue
        step = int(ckpt.name.split("_")[1])
        m = _json_line(
            _cli("evaluate", "--checkpoint", str(ckpt), "--split", "test", "eval.exclude_seen=false", log=log)
        )
        curve.append({"step": step, "minutes": (times[step] - started) / 60, "test_ndcg@10": m["ndcg@10"]})
    return curve


def run_row(row: Row, out: Path, shards: Path, extra: list[str] = ()) -> dict:
    done = out / "rows" / f"{row.name}.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir = out / "runs" / row.name
    log = out / "logs" / f"{row.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.shards={shards}",
        f"train.output_dir={run_dir}",
        "logging.progress=plain",
    ]
    if row.after:
        overrides.append(f"model.name_or_path={out / 'exports' / row.after}")
    if run_dir.exists() and not (run_dir / "metrics.json").exists():
        shutil.rmtree(run_dir)  # an interrupted row starts again: its wall time must be one run's
    started = time.time()
    if not (run_dir / "metrics.json").exists():
        _cli("train", "--config", row.config, *overrides, *row.overrides, *extra, log=log)
    wall = time.time() - started
    state = json.loads((run_dir / "metrics.json").read_text())
    train_rates = [r["samples_per_s"] for r in _train_log(run_dir) if r["kind"] == "train"]
    result: dict = {
        "row": row.name,
        "title": row.title,
        "config": row.config,
        "overrides": row.overrides,
        "max_steps": _max_steps(run_dir),
        "wall_s": wall,
        "samples_per_s": statistics.mean(train_rates),
        "trainable_parameters": state["trainable_parameters"],
        "best_checkpoint": state["best_checkpoint"],
    }
    evaluate = ["evaluate", "--checkpoint", str(run_dir), "--best", "--split", "test"]
    if row.group == "rating":
        result["test"] = _json_line(_cli(*evaluate, log=log))
    else:
        result["test_masked"] = _json_line(_cli(*evaluate, "eval.exclude_seen=true", ATTACK, log=log))
        result["test_unmasked"] = _json_line(_cli(*evaluate, "eval.exclude_seen=false", ATTACK, log=log))
    if row.curve:
        result["curve"] = test_curve(run_dir, started, log)
    if row.export:
        _cli(
            "export",
            "--checkpoint",
            str(run_dir),
            "--best",
            "--out",
            str(out / "exports" / row.name),
            "--force",
            log=log,
        )
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------- report


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def minutes_to(curve: list[dict], target: float) -> float | None:
    return next((p["minutes"] for p in curve if p["test_ndcg@10"] >= target), None)


def report(out: Path) -> str:
    """The markdown tables of docs/RESULTS.md from the finished rows."""
    finished = {p.stem: json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))}
    lines = [
        "### Next-item ranking (test split, full ranking over 9,724 items)",
        "",
        "| row | seeds | HR@10 (history masked) | NDCG@10 (masked) | MRR@10 (masked) | NDCG@10 history not masked | × SASRec | trainable params | train.max_steps | wall time | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pop = finished.get("popularity")
    if pop:
        m, u = pop["masked"], pop["unmasked"]
        lines.append(
            f"| most popular (train counts) | – | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | "
            f"{u['ndcg@10']:.4f} | {u['ndcg@10'] / SASREC_NDCG10:.2f} | 0 | – | < 1 s | – |"
        )
    groups: dict[str, list[dict]] = {}
    for res in finished.values():
        if "test_masked" in res:
            groups.setdefault(res["title"], []).append(res)
    for title, res in groups.items():
        tm = [r["test_masked"] for r in res]
        tu = [r["test_unmasked"]["ndcg@10"] for r in res]
        lines.append(
            f"| {title} | {len(res)} | {_fmt([x['hr@10'] for x in tm])} | {_fmt([x['ndcg@10'] for x in tm])} | "
            f"{_fmt([x['mrr@10'] for x in tm])} | **{_fmt(tu)}** | {statistics.mean(tu) / SASREC_NDCG10:.2f} | "
            f"{res[0]['trainable_parameters']:,} | {res[0]['max_steps']} | "
            f"{statistics.mean(r['wall_s'] for r in res) / 60:.1f} min | {statistics.mean(r['samples_per_s'] for r in res):.0f} |"
        )
    lines.append(
        f"| SASRec-CE (RecBole 1.2.1, this split: `benchmarks/sasrec_reference.py`) | 1 | – | – | – | "
        f"{SASREC_NDCG10:.4f} | 1.00 | 725,696 | {SASREC_EPOCHS} epochs | ~{SASREC_MINUTES_TO_BEST:.0f} min | – |"
    )
    lines.append(
        f"| SASRec-CE as in BASELINES.md (RecBole's float32 timestamps: other sequences, not comparable) | 1 | "
        f"– | – | – | {SASREC_FLOAT32_NDCG10:.4f} | – | 725,696 | 12 epochs | ~75 min | – |"
    )
    curves = [(n, r["curve"]) for n, r in finished.items() if r.get("curve")]
    if curves:
        lines += ["", f"### Time to SASRec's test NDCG@10 ({SASREC_NDCG10:.4f}, history not masked)", ""]
        lines += [
            "| run | minutes from launch (1 thread) | best test NDCG@10 on the curve |",
            "|---|---|---|",
        ]
        for name, curve in curves:
            t = minutes_to(curve, SASREC_NDCG10)
            best = max(p["test_ndcg@10"] for p in curve)
            lines.append(f"| {name} | {'not reached' if t is None else f'{t:.1f}'} | {best:.4f} |")
    robust = [r for r in finished.values() if "robust_ndcg@10" in r.get("test_unmasked", {})]
    if robust:
        lines += [
            "",
            f"### Robustness (test, history masked; FGM attack of radius {EPSILON} on the input embeddings at evaluation)",
            "",
        ]
        lines += ["| row | clean NDCG@10 | attacked NDCG@10 | kept |", "|---|---|---|---|"]
        for r in robust:
            c, a = r["test_masked"]["ndcg@10"], r["test_masked"]["robust_ndcg@10"]
            lines.append(f"| {r['row']} ({r['title']}) | {c:.4f} | {a:.4f} | {a / c:.0%} |")
    rating = finished.get("rating")
    base = finished.get("rating_baselines")
    if rating:
        lines += ["", "### Rating prediction (test targets: each user's last rating)", ""]
        lines += ["| model | accuracy (10 levels) | RMSE | AUC (rating ≥ 4) |", "|---|---|---|---|"]
        for name, m in (base or {}).items():
            lines.append(
                f"| {name.replace('_', ' ')} | {m['accuracy']:.4f} | {m['rmse']:.4f} | {m['auc']:.4f} |"
            )
        t = rating["test"]
        lines.append(
            f"| {rating['title']} (train.max_steps {rating['max_steps']}, {rating['wall_s'] / 60:.1f} min) | "
            f"{t['accuracy']:.4f} | {t['rmse']:.4f} | {t['auc']:.4f} |"
        )
    return "\n".join(lines)


def plot(out: Path, png: Path) -> None:
    """Learning curves from the TensorBoard scalars (valid NDCG@10, train loss) and the test curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in sorted((out / "runs").iterdir()):
        tb = run / "tensorboard"
        if not tb.is_dir():
            continue
        acc = EventAccumulator(str(tb))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        for ax, tag in ((axes[0], "train/loss"), (axes[1], "eval/ndcg@10")):
            if tag in tags:
                ev = acc.Scalars(tag)
                ax.plot([e.step for e in ev], [e.value for e in ev], label=run.name)
    for name, res in ((p.stem, json.loads(p.read_text())) for p in sorted((out / "rows").glob("*.json"))):
        if isinstance(res, dict) and res.get("curve"):
            axes[2].plot(
                [p["minutes"] for p in res["curve"]],
                [p["test_ndcg@10"] for p in res["curve"]],
                marker=".",
                label=name,
            )
    axes[2].axhline(SASREC_NDCG10, color="k", ls="--", lw=1, label="SASRec (RecBole, same split)")
    axes[2].axvline(SASREC_MINUTES_TO_BEST / 10, color="grey", ls=":", lw=1, label="1/10 of RecBole's time")
    titles = (
        "train loss (TensorBoard train/loss)",
        "valid NDCG@10 (TensorBoard eval/ndcg@10)",
        "test NDCG@10, history not masked",
    )
    for ax, title, xlabel in zip(
        axes, titles, ("step", "step", "minutes since launch (1 thread)"), strict=True
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "runs" / "quality"))
    p.add_argument("--rows", nargs="*", help="row names (default: all)")
    p.add_argument("--parallel", type=int, default=2, help="rows run side by side (one thread each)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--override", action="append", default=[], help="KEY=VALUE for every row's training (smoke tests)"
    )
    p.add_argument("--png", default=str(REPO / "docs" / "quality_curves.png"))
    args = p.parse_args()
    out = Path(args.out).resolve()
    (out / "rows").mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        shards = ensure_shards(out)
        for name, fn in (("popularity", popularity_rows), ("rating_baselines", rating_baselines)):
            f = out / "rows" / f"{name}.json"
            if not f.exists():
                f.write_text(json.dumps(fn(shards), indent=2))
        todo = [rows()[n] for n in (args.rows or rows())]
        later = [r for r in todo if r.after]
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = {
                r.name: pool.submit(run_row, r, out, shards, args.override) for r in todo if not r.after
            }
            for r in later:  # starts once the row it adapts has finished (its export exists)
                if r.after in futures:  # else finished by an earlier invocation
                    futures[r.after].result()
                futures[r.name] = pool.submit(run_row, r, out, shards, args.override)
            for name, fut in futures.items():
                res = fut.result()
                print(f"{name}: done ({res['wall_s'] / 60:.1f} min)", flush=True)
        plot(out, Path(args.png))
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
