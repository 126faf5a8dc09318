"""Recommendation quality on the bundled MovieLens sample, side by side with baselines.

Protocol (docs/RESULTS.md, ../shared/BASELINES.md): leave-one-out by time per user, full ranking over
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
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SASREC_NDCG10 = 0.0702  # RecBole 1.2.1, history not masked (../shared/BASELINES.md)
SASREC_MINUTES_TO_BEST = 75.0


@dataclass
class Row:
    name: str
    title: str
    overrides: list[str]
    config: str = "configs/quality_ids.yaml"
    after: str | None = None  # row whose export this row starts from (LoRA adaptation)
    group: str = "main"
    extra_eval: list[str] = field(default_factory=list)


def rows() -> dict[str, Row]:
    r: list[Row] = []
    for seed in (1, 2, 3):
        r.append(Row(f"ids_s{seed}", "recgpt ids, full tuning from scratch", [f"seed={seed}"], group="ids"))
    r.append(
        Row(
            "lora",
            "recgpt ids, LoRA adaptation of the ids export",
            [],
            config="configs/quality_lora.yaml",
            after="ids_s1",
        )
    )
    for m in ("fgm", "pgd", "freelb"):
        r.append(
            Row(
                f"adv_{m}",
                f"recgpt ids, full tuning + {m.upper()}",
                [f"adversarial.method={m}", "seed=1"],
                group="adv",
            )
        )
    r.append(
        Row(
            "text",
            "recgpt text format, full tuning",
            ["model.prompt=text", "seed=1"],
            config="configs/quality_text.yaml",
        )
    )
    r.append(
        Row(
            "rating",
            "recgpt rating task (10 half-star classes)",
            ["seed=1"],
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


def ensure_shards(out: Path) -> Path:
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        _cli("shards", "build", str(REPO / "data" / "ml-latest-small.zip"), "--out", str(shards))
    return shards


def _user_records(shards: Path, split: str):
    """Every real (not padding) eval record of ``split``, in file order."""
    from data_shards.reader import ShardLoader

    loader = ShardLoader(str(shards), split=split, rank=0, world_size=1, batch_size=64, seed=0, num_workers=0)
    for batch in loader:
        yield from (rec for rec in batch if not rec.get("pad"))


def popularity_rows(shards: Path) -> dict:
    """Most-popular baseline: items ranked by training-interaction counts (ties: first appearance)."""
    import torch

    from data_shards.manifest import load_manifest

    n_items = load_manifest(str(shards))["num_items"]
    counts = torch.zeros(n_items)
    first_seen = torch.full((n_items,), float("inf"))
    order = 0
    # Every valid record's `seen` list is exactly that user's training interactions, in time order.
    for rec in _user_records(shards, "valid"):
        for i in rec["seen"]:
            counts[i] += 1
            if first_seen[i] == float("inf"):
                first_seen[i] = order
            order += 1
    # Higher count first; equal counts by first appearance.
    key = counts * (order + 1) - torch.where(
        first_seen.isinf(), torch.full_like(first_seen, order), first_seen
    )
    result = {}
    for masked in (False, True):
        hits = ndcg = mrr = 0.0
        users = 0
        for rec in _user_records(shards, "test"):
            scores = key.clone()
            target = rec["items"][-1]
            if masked:
                seen = torch.tensor([i for i in rec["seen"] if i != target], dtype=torch.long)
                if len(seen):
                    scores[seen] = -float("inf")
            rank = int((scores > scores[target]).sum()) + 1  # ties ranked pessimistically
            users += 1
            if rank <= 10:
                hits += 1
                ndcg += 1 / math.log2(rank + 1)
                mrr += 1 / rank
        result["masked" if masked else "unmasked"] = {
            "hr@10": hits / users,
            "ndcg@10": ndcg / users,
            "mrr@10": mrr / users,
        }
    return result


def run_row(row: Row, out: Path, shards: Path) -> dict:
    done = out / "rows" / f"{row.name}.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir = out / "runs" / row.name
    log = out / "logs" / f"{row.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.shards={shards}",
        f"train.output_dir={run_dir}",
        "data.num_workers=0",
        "logging.progress=plain",
    ]
    if row.after:
        overrides.append(f"model.name_or_path={out / 'exports' / row.after}")
    t0 = time.time()
    _cli("train", "--config", row.config, *overrides, *row.overrides, log=log)
    wall = time.time() - t0
    state = json.loads((run_dir / "metrics.json").read_text())
    result: dict = {
        "row": row.name,
        "title": row.title,
        "config": row.config,
        "overrides": row.overrides,
        "wall_s": wall,
        "train": state,
    }
    for exclude in (True, False):
        text = _cli(
            "evaluate",
            "--checkpoint",
            str(run_dir),
            "--best",
            "--split",
            "test",
            f"eval.exclude_seen={str(exclude).lower()}",
            log=log,
        )
        result["test_masked" if exclude else "test_unmasked"] = _json_line(text)
    if row.group == "ids" or row.name == "ids_s1":
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


def report(out: Path) -> str:
    finished = {p.stem: json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))}
    lines = [
        "| row | seeds | HR@10 | NDCG@10 | MRR@10 | NDCG@10 (history not masked) | trainable params | max_steps | wall time | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pop = finished.get("popularity")
    if pop:
        m, u = pop["masked"], pop["unmasked"]
        lines.append(
            f"| most popular (train counts) | – | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {u['ndcg@10']:.4f} | 0 | – | < 1 s | – |"
        )
    groups: dict[str, list[dict]] = {}
    for name, res in finished.items():
        if name == "popularity" or name == "rating":
            continue
        groups.setdefault(res["title"], []).append(res)
    for title, res in groups.items():
        tm = [r["test_masked"] for r in res]
        tu = [r["test_unmasked"] for r in res]
        tr = res[0]["train"]
        lines.append(
            f"| {title} | {len(res)} | {_fmt([x['hr@10'] for x in tm])} | {_fmt([x['ndcg@10'] for x in tm])} | "
            f"{_fmt([x['mrr@10'] for x in tm])} | {_fmt([x['ndcg@10'] for x in tu])} | "
            f"{tr.get('trainable_params', '?'):,} | {tr.get('max_steps', '?')} | "
            f"{statistics.mean(r['wall_s'] for r in res) / 60:.1f} min | {tr.get('samples_per_s', float('nan')):.0f} |"
        )
    lines.append(
        f"| SASRec-CE (RecBole 1.2.1, BASELINES.md) | 1 | – | – | – | {SASREC_NDCG10:.4f} | – | – | ~{SASREC_MINUTES_TO_BEST:.0f} min | – |"
    )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "runs" / "quality"))
    p.add_argument("--rows", nargs="*", help="row names (default: all); 'popularity' is the baseline")
    p.add_argument("--parallel", type=int, default=2, help="rows run side by side (one thread each)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out).resolve()
    (out / "rows").mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        shards = ensure_shards(out)
        pop_file = out / "rows" / "popularity.json"
        if not pop_file.exists():
            pop_file.write_text(json.dumps(popularity_rows(shards), indent=2))
        todo = [rows()[n] for n in (args.rows or rows()) if n != "popularity"]
        first = [r for r in todo if not r.after]
        with ThreadPoolExecutor(args.parallel) as pool:
            for res in pool.map(lambda r: run_row(r, out, shards), first):
                print(f"{res['row']}: test NDCG@10 {res['test_masked']['ndcg@10']:.4f}", flush=True)
        for r in todo:
            if r.after:
                res = run_row(r, out, shards)
                print(f"{res['row']}: test NDCG@10 {res['test_masked']['ndcg@10']:.4f}", flush=True)
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
