"""The main job end to end on the bundled MovieLens sample (``make demo`` / ``python -m launcher.demo``).

build shards -> train a small decoder-only transformer (SASRec/BART block layout; full tuning, 2 processes) -> export -> LoRA + adversarial adaptation
starting from that export -> evaluate before/after -> export merged weights -> recommend for one user.
Every step is the public CLI, so this file doubles as a worked example. Local disk plays the shared
storage; everything lands under ``--root`` (default ``runs/demo``).
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

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "ml-latest-small.zip"
BASE_CONFIG = "configs/demo_base.yaml"
ADAPT_CONFIG = "configs/demo_adapt.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Two processes on a 2-core machine: one BLAS thread each, or they fight over the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(title: str, cmd: list[str], capture: bool = False) -> str:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        sys.exit(f"demo: step '{title}' failed with exit code {res.returncode}")
    if capture:
        print(res.stdout, end="", flush=True)
    print(f"--- {title}: {time.time() - t0:.0f} s", flush=True)
    return res.stdout or ""


def recgpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "launcher",
        *args,
    ]


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("demo: evaluate printed no JSON metrics line")


def _user_history_titles(shards: Path, n: int = 5) -> list[str]:
    """The last few test-split history items of the first user, as exact titles (what a person types)."""
    from configs import load_config
    from data_shards.manifest import read_items
    from modeling.data import build_loader

    loader = build_loader(load_config(REPO / BASE_CONFIG), "test", shards=shards, batch_size=1, num_workers=0)
    record = next(iter(loader))[0]  # no tokenizer: lists of raw records
    items = read_items(shards, loader.manifest)
    history = record["items"][:-1][-n:]
    return [items[i]["title"] or items[i]["item_id"] for i in history]


def _adaptation_epsilon() -> float:
    """The perturbation radius the adaptation trains with: both models are attacked with it at test time."""
    from configs import load_config

    return load_config(REPO / ADAPT_CONFIG).adversarial.epsilon


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/demo", help="where shards, runs and exports go")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument("--fresh", action="store_true", help="delete --root first")
    args = p.parse_args(argv)
    root = (REPO / args.root).resolve()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    shards, base, base_export = root / "shards", root / "base", root / "base-export"
    adapted, adapted_export = root / "adapted", root / "adapted-export"
    t_start = time.time()

    if not (shards / "manifest.json").exists():
        # Windows every 10 items: each target is trained once with >= 40 items of history (objective new).
        build = recgpt("shards", "build", str(SAMPLE), "--out", str(shards), "--window-stride", "10")
        _run("build shards", build)
    _run("inspect shards", recgpt("shards", "inspect", str(shards)))

    _run(
        "train a small decoder-only transformer (SASRec/BART layout) from scratch (full tuning, DeepSpeed, 2 processes)",
        torchrun(
            args.nproc,
            "train",
            "--config",
            BASE_CONFIG,
            f"data.shards={shards}",
            f"train.output_dir={base}",
        ),
    )
    _run(
        "export the base model",
        recgpt("export", "--checkpoint", str(base), "--best", "--out", str(base_export), "--force"),
    )
    _run(
        "adapt the export with LoRA + PGD adversarial training (2 processes)",
        torchrun(
            args.nproc,
            "train",
            "--config",
            ADAPT_CONFIG,
            f"data.shards={shards}",
            f"model.name_or_path={base_export}",
            f"train.output_dir={adapted}",
        ),
    )
    # Both models under the same FGM attack, of the radius the adaptation trained against: robust_* metrics.
    attack = f"adversarial.eval_epsilon={_adaptation_epsilon()}"
    before = _last_json(
        _run(
            "evaluate base (test split)",
            recgpt("evaluate", "--model", str(base_export), "--data", str(shards), "--split", "test", attack),
            capture=True,
        )
    )
    after = _last_json(
        _run(
            "evaluate adapted (test split)",
            recgpt(
                "evaluate",
                "--checkpoint",
                str(adapted),
                "--best",
                "--data",
                str(shards),
                "--split",
                "test",
                attack,
            ),
            capture=True,
        )
    )
    _run(
        "export merged weights",
        recgpt("export", "--checkpoint", str(adapted), "--best", "--out", str(adapted_export), "--force"),
    )

    history_file = root / "history.json"
    history_file.write_text(json.dumps(_user_history_titles(shards)))
    _run(
        "recommend for one user",
        recgpt(
            "recommend",
            "--model",
            str(adapted_export),
            "--history-file",
            str(history_file),
            "-k",
            "10",
        ),  # the user's history is never recommended (recommend excludes it by default)
    )

    keys = [k for k in before if k.split("@")[0] in ("hr", "ndcg", "mrr") or k.startswith("robust")]
    print(f"\n=== test metrics (full ranking over all items, history excluded; robust_*: under {attack})")
    print(f"{'metric':<18}{'base':>10}{'adapted':>10}")
    for k in keys:
        print(f"{k:<18}{before[k]:>10.4f}{after.get(k, float('nan')):>10.4f}")
    print(f"\nTensorBoard:  tensorboard --logdir {root}")
    print(f"checkpoints:  {base}/checkpoints  {adapted}/checkpoints")
    print(f"exports:      {base_export}  {adapted_export}")
    print(f"demo finished in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
