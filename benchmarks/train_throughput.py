"""Training throughput: ``recgpt train`` vs a minimal hand-written DeepSpeed loop vs Hugging Face Trainer.

All three train the same model (built by ``modeling.factory`` from the same config), on the same data
(``modeling.data.build_loader`` batches), with the same DeepSpeed settings (``trainer.engine.deepspeed_config``),
on the same number of processes (torchrun). Throughput = global samples per second of wall time over
the steps after ``--warmup`` (every step's end is timestamped; evaluation and the final checkpoint are
outside the window). Beside it, the CPU time of the window (``time.process_time`` of every rank, summed,
per step): the training processes' own work, which a loaded machine's scheduling does not stretch, so
its overhead column is the one to trust when other jobs share the cores (the data workers' collate is
outside it for both contenders, which use the same loader).

- ``recgpt``: ``trainer.loop.train`` (what ``recgpt train`` runs) with the config's logging interval
  (pass ``train.log_interval=1`` to measure logging every step), no evaluation or checkpoint before
  the last step; each step's end is timestamped when the loop hands the step to the monitor.
- ``minimal``: deepspeed.initialize (recgpt's optimizer and LR schedule) + for batch: loss =
  LossComputer; engine.backward; engine.step. The difference to recgpt is the framework's overhead
  (target <= 5 %): the per-step collective and bookkeeping, logging, memory readings.
- ``hf``: ``transformers.Trainer`` with the same DeepSpeed config on the causal LM inside the RecModel,
  with a plain causal-LM loss (labels = the next item's token at the same positions): the output
  layer and softmax cover the whole vocabulary at every supervised position, while recgpt scores the
  item rows only. Targets: >= 1.0x on the ids format, >= 1.5x on text with a large vocabulary (asking
  the BPE for 50,000 pieces gives 17,084 on the sample's titles: 26,808 tokens with the item tokens).

    python benchmarks/train_throughput.py [--shards DIR] [--nproc 2] [--steps 30] [--formats ids,text] \
        [--repeat N] [--aa] [--skip-hf] [override ...]

``--repeat N`` alternates recgpt and minimal N times, the order rotated each round (AB BA ...: neither
always runs first), and reports the medians. ``--aa`` adds a second minimal loop to the alternation
(ABC BCA CAB ...): the minimal loop against itself, the A/A difference,
is the noise floor of a wall-time comparison on this machine — an overhead within it is not resolved.
With three rounds or more it also prints the overhead paired by round (each round's contenders ran
back to back): the mean of the rounds' overheads ± 1.96 standard errors of that mean, also in the JSON
(``overhead_paired``, ``aa_paired``: [mean, 1.96 s.e.]) — about a 95 % interval from some 20 rounds
up; with fewer the true interval is wider (Student's t: x 2.2 at 3 rounds, x 1.2 at 8). Pool the
``*_runs`` of several invocations for a tighter figure. A short ``--steps`` inflates every overhead
(the measured window is ``--steps`` minus the warm-up's 5 steps).
Signs: overhead = (minimal − recgpt) / minimal samples/s, so positive means recgpt is slower; A/A =
(minimal − second minimal) / minimal; CPU overheads = (recgpt − minimal) / minimal CPU ms per step.
One run each (``--repeat 1``) on a loaded machine resolves little: the documented figures use
``--steps 80 --aa`` and ``--repeat`` 4 to 10 (docs/BENCHMARKS.md gives each table's command).

Every contender runs with the allocator setting recgpt's loop makes (``train.keep_freed_memory``, on by
default; pass ``train.keep_freed_memory=false`` to measure all of them with glibc's defaults), so the
difference stays the framework's.

Prints one table and a JSON line. CPU: DS_ACCELERATOR=cpu and gloo are chosen automatically.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script (torchrun too): the project's packages
BIN = Path(sys.executable).parent
TINY = REPO / "configs" / "tiny.yaml"
# The text format with a large vocabulary (the BPE learns 17,084 pieces from the sample's titles; 26,808
# tokens with the 9,724 item tokens): shorter histories and batches keep the full-vocabulary
# logits of the HF baseline within CPU memory.
FORMAT_OVERRIDES = {
    "ids": [],
    "text": [
        "model.prompt=text",
        "model.tokenizer_vocab_size=50000",
        "data.max_history=10",
        "train.micro_batch_size=8",
    ],
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    env.pop("RECGPT_FAULT", None)
    return env


def _throughput(ends: list[float], warmup: int, global_batch: int) -> float:
    """Samples/s between the end of step ``warmup`` and the end of the last step."""
    window = ends[warmup - 1 :] if warmup > 0 else ends
    return (len(window) - 1) * global_batch / (window[-1] - window[0])


def _torchrun(nproc: int, *cmd: str) -> None:
    full = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *cmd]
    p = subprocess.run(full, cwd=REPO, env=_env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(full)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


# --------------------------------------------------------------------------- the three contenders


def _scratch() -> str:
    """A temporary directory removed when this process exits."""
    path = tempfile.mkdtemp(prefix="recgpt-throughput-hf-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _global_batch(overrides: list[str], nproc: int) -> int:
    from configs import load_config

    return load_config(TINY, overrides).train.micro_batch_size * nproc


def run_worker(kind: str, args, overrides: list[str], work: Path) -> dict[str, float]:
    """One run of ``kind``: global samples/s of wall time (``samples_s``), and per step, summed over the
    ranks, process CPU ms (``cpu_ms``), the part of it outside the shared compute (``rest_ms``) and
    minor page faults (``faults``)."""
    work.mkdir(parents=True, exist_ok=True)
    result = work / f"{kind}.json"
    _torchrun(
        args.nproc, str(Path(__file__).resolve()), "--worker", kind, "--result", str(result),
        "--steps", str(args.steps), "--", *overrides,
    )  # fmt: skip
    ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(args.nproc)]
    first = max(args.warmup - 1, 0)
    steps = len(ranks[0]["cpu"]) - 1 - first

    def per_step(key: str, scale: float = 1.0) -> float:
        return sum(r[key][-1] - r[key][first] for r in ranks) * scale / steps

    cpu_ms = per_step("cpu", 1000)
    return {
        "samples_s": _throughput(ranks[0]["ends"], args.warmup, _global_batch(overrides, args.nproc)),
        "cpu_ms": cpu_ms,
        "rest_ms": cpu_ms - per_step("compute", 1000),
        "faults": per_step("faults"),
    }


class StepClock:
    """Wall and process CPU time and minor page faults at the end of every step (after the device has
    finished it), and the CPU time spent so far in the compute both contenders share (:meth:`install`)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.compute: list[float] = []
        self.faults: list[int] = []
        self.inside = 0.0

    def tick(self) -> None:
        import resource

        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.compute.append(self.inside)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def install(self) -> None:
        """Count the CPU time of the loss (forward included), ``engine.backward`` and ``engine.step``:
        the same calls on the same model in both loops, so what is left of a step's CPU time is each
        loop's own work — a comparison that the load's effect on the kernels does not blur."""
        from deepspeed.runtime.engine import DeepSpeedEngine

        from modeling.loss import LossComputer

        def timed(fn):
            def wrapper(*args, **kwargs):
                t0 = time.process_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.inside += time.process_time() - t0

            return wrapper

        LossComputer.__call__ = timed(LossComputer.__call__)  # type: ignore[method-assign]
        DeepSpeedEngine.backward = timed(DeepSpeedEngine.backward)  # type: ignore[method-assign]
        DeepSpeedEngine.step = timed(DeepSpeedEngine.step)  # type: ignore[method-assign]


def paired(contender: list[dict[str, float]], reference: list[dict[str, float]]) -> tuple[float, float]:
    """(mean, 1.96 standard errors of the mean) of the per-round wall-time overhead in %,
    ``(reference - contender) / reference`` samples/s, round i of one against round i of the other
    (0 with one round). The normal approximation of a 95 % interval: too narrow below ~20 rounds."""
    pct = [100.0 * (r["samples_s"] - c["samples_s"]) / r["samples_s"] for c, r in zip(contender, reference)]
    half = 1.96 * statistics.stdev(pct) / len(pct) ** 0.5 if len(pct) > 1 else 0.0
    return statistics.fmean(pct), half


def _pm(mean_half: tuple[float, float]) -> str:
    return f"{mean_half[0]:+.1f} ± {mean_half[1]:.1f} %"


def _worker_setup(overrides: list[str]):
    """(cfg, info, model, tokenizer, loader) exactly as the trainer builds them (``trainer.loop``)."""
    from configs import load_config
    from data_shards.manifest import load_manifest, read_items
    from modeling.data import build_loader, resolve_max_history
    from modeling.factory import build_model_and_tokenizer
    from trainer.distributed import setup_distributed
    from trainer.engine import deepspeed_config
    from trainer.monitor import keep_freed_memory

    cfg = load_config(TINY, overrides)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()  # the allocator recgpt's loop runs with: the difference stays the framework's
    info = setup_distributed()
    cfg.data.max_history = resolve_max_history(cfg, load_manifest(cfg.data.shards), cfg.data.shards)
    items = read_items(cfg.data.shards)
    model, tok = build_model_and_tokenizer(
        cfg, cfg.data.shards, ds_config=deepspeed_config(cfg, info.world_size)
    )
    loader = build_loader(cfg, "train", tok, items, rank=info.rank, world_size=info.world_size)
    return cfg, info, model, tok, loader


def worker_recgpt(steps: int, overrides: list[str], clock: StepClock, work: Path) -> None:
    from configs import load_config
    from trainer import loop
    from trainer.monitor import Monitor

    cfg = load_config(TINY, [
        *overrides, f"train.output_dir={work / 'recgpt-run'}", "train.eval_interval=0",
        "train.checkpoint_interval=0", "logging.progress=none", "logging.tensorboard=false",
    ])  # fmt: skip
    add_step = Monitor.add_step

    def timed(self: Monitor, stats) -> None:  # the loop hands each finished step to the monitor
        add_step(self, stats)
        clock.tick()

    Monitor.add_step = timed  # type: ignore[method-assign]
    clock.install()
    loop.train(cfg)


def worker_minimal(steps: int, overrides: list[str], clock: StepClock) -> None:
    import deepspeed

    from modeling.loss import LossComputer
    from trainer.engine import (
        build_optimizer,
        build_scheduler,
        deepspeed_config,
        model_hidden_size,
        size_buckets,
    )

    cfg, info, model, _, loader = _worker_setup(overrides)
    # recgpt's optimizer (AdamW, decayed matrices and undecayed biases/norms: two groups) and schedule:
    # the same optimizer work per step, so the difference is the framework's, not the recipe's.
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, steps)
    ds = size_buckets(deepspeed_config(cfg, info.world_size), model_hidden_size(model))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    loss_fn = LossComputer(cfg)
    clock.install()
    step = 0
    while step < steps:
        for batch in loader:
            batch = {k: v.to(info.device) for k, v in batch.items()}
            loss, _ = loss_fn(engine, batch, step)
            engine.backward(loss)
            engine.step()
            clock.tick()
            step += 1
            if step == steps:
                break


def worker_hf(steps: int, overrides: list[str], clock: StepClock) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainer.engine import deepspeed_config, model_hidden_size, size_buckets

    cfg, info, model, _, loader = _worker_setup(overrides)
    lm = model.causal_lm
    first_item = int(model.item_token_ids[0])

    def hf_batch(b):
        # Causal-LM labels: HF shifts them, so the token at t+1 is the target of position t — the same
        # supervised positions as recgpt's item labels, but scored over the whole vocabulary.
        labels = torch.full_like(b["input_ids"], -100)
        item = b["labels"][:, :-1]
        labels[:, 1:] = torch.where(item != -100, item + first_item, -100)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}

    # Each rank's own batch sequence (the same as recgpt's), one dataset item per micro-batch.
    batches = []
    while len(batches) < steps:
        batches += [hf_batch(b) for b in loader]
    batches = batches[:steps]

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            clock.tick()

    ds = size_buckets(deepspeed_config(cfg, info.world_size), model_hidden_size(model))
    ds.update(train_micro_batch_size_per_gpu="auto", train_batch_size="auto", gradient_accumulation_steps="auto",
              gradient_clipping="auto")  # fmt: skip
    targs = TrainingArguments(
        output_dir=_scratch(), per_device_train_batch_size=1, max_steps=steps,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.beta1,
        adam_beta2=cfg.optim.beta2, max_grad_norm=cfg.optim.grad_clip, warmup_steps=cfg.schedule.warmup_steps,
        lr_scheduler_type="cosine", logging_steps=10**6, save_strategy="no", report_to=[], deepspeed=ds,
        bf16=cfg.train.precision == "bf16", fp16=cfg.train.precision == "fp16", use_cpu=info.device.type == "cpu", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, accelerator_config={"split_batches": False},
    )  # fmt: skip
    # Each rank already holds its own batches: no distributed sampler re-splitting them.
    trainer = Trainer(
        model=lm, args=targs, train_dataset=Batches(), data_collator=lambda xs: xs[0], callbacks=[Clock()]
    )
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(Batches())
    trainer.train()


# --------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard directory (default: build the bundled sample into a temp dir)")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) per contender (default 2)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument(
        "--warmup", type=int, default=5, help="steps left out of the throughput window (default 5)"
    )
    p.add_argument("--formats", default="ids,text", help="comma-separated: ids, text (default ids,text)")
    p.add_argument("--skip-hf", action="store_true", help="leave out the Hugging Face Trainer")
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds of alternated runs, order rotated; medians (default 1)"
    )
    p.add_argument(
        "--aa", action="store_true", help="also alternate a second minimal loop: the A/A noise floor"
    )
    p.add_argument("--worker", choices=["recgpt", "minimal", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra config overrides for all contenders")
    args = p.parse_args()

    if args.worker:
        clock = StepClock()
        if args.worker == "recgpt":
            worker_recgpt(args.steps, args.overrides, clock, Path(args.result).parent)
        else:
            (worker_minimal if args.worker == "minimal" else worker_hf)(args.steps, args.overrides, clock)
        rank = int(os.environ.get("RANK", "0"))
        record = {"ends": clock.ends, "cpu": clock.cpu, "compute": clock.compute, "faults": clock.faults}
        Path(f"{args.result}.{rank}").write_text(json.dumps(record))
        return
    if args.repeat < 1 or args.nproc < 1:
        p.error("--repeat and --nproc must be >= 1")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup must be in 0..--steps - 1 (got --warmup {args.warmup}, --steps {args.steps})")
    unknown = sorted(set(args.formats.split(",")) - set(FORMAT_OVERRIDES))
    if unknown:
        p.error(f"--formats: unknown {', '.join(unknown)} (known: {', '.join(FORMAT_OVERRIDES)})")

    work = Path(tempfile.mkdtemp(prefix="recgpt-throughput-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # shards (unless --shards) and runs
    shards = args.shards
    if shards is None:
        from launcher.cli import main as cli

        shards = str(work / "shards")
        assert cli(["shards", "build", str(REPO / "data" / "ml-latest-small.zip"), "--out", shards]) == 0
    rows = []
    for fmt in args.formats.split(","):
        overrides = [
            f"data.shards={shards}",
            f"train.max_steps={args.steps}",
            *FORMAT_OVERRIDES[fmt],
            *args.overrides,
        ]
        runs: dict[str, list[dict[str, float]]] = {"recgpt": [], "minimal": []}
        if args.aa:
            runs["minimal_b"] = []
        names = list(runs)
        for i in range(args.repeat):  # alternated, so a change of the machine's load hits all alike,
            # and the order rotated each round (ABC, BCA, CAB, ...), so no contender always runs first
            for name in names[i % len(names) :] + names[: i % len(names)]:
                kind = name.removesuffix("_b")
                runs[name].append(run_worker(kind, args, overrides, work / fmt / f"{name}-{i}"))
        row: dict = {"format": fmt}
        for kind, results in runs.items():
            row[kind] = statistics.median(r["samples_s"] for r in results)
            for key in ("cpu_ms", "rest_ms", "faults"):
                row[f"{kind}_{key}"] = statistics.median(r[key] for r in results)
                row[f"{kind}_{key}_runs"] = [round(r[key], 1) for r in results]
            row[f"{kind}_runs"] = [round(r["samples_s"], 2) for r in results]
        row["overhead_pct"] = 100.0 * (row["minimal"] - row["recgpt"]) / row["minimal"]
        # Paired by round (the contenders of one round ran back to back, under the same load): the mean
        # of the rounds' overheads ± 1.96 standard errors, which says whether a difference is resolved
        # at all where the medians of noisy runs cannot.
        row["overhead_paired"] = paired(runs["recgpt"], runs["minimal"])
        if args.aa:  # the same measures, minimal against minimal: what the machine alone moves
            row["aa_paired"] = paired(runs["minimal_b"], runs["minimal"])
            row["aa_pct"] = 100.0 * (row["minimal"] - row["minimal_b"]) / row["minimal"]
            row["aa_cpu_pct"] = (
                100.0 * (row["minimal_b_cpu_ms"] - row["minimal_cpu_ms"]) / row["minimal_cpu_ms"]
            )
        row["cpu_overhead_pct"] = (
            100.0 * (row["recgpt_cpu_ms"] - row["minimal_cpu_ms"]) / row["minimal_cpu_ms"]
        )
        # The loops' own CPU (outside the shared compute), as a share of the minimal loop's whole step.
        row["own_overhead_pct"] = (
            100.0 * (row["recgpt_rest_ms"] - row["minimal_rest_ms"]) / row["minimal_cpu_ms"]
        )
        if not args.skip_hf:
            row["hf"] = run_worker("hf", args, overrides, work / fmt / "hf")["samples_s"]
            row["speedup_vs_hf"] = row["recgpt"] / row["hf"]
        rows.append(row)
        print(
            f"{fmt:5s} recgpt {row['recgpt']:8.1f} samples/s | minimal DeepSpeed {row['minimal']:8.1f} "
            f"(overhead {row['overhead_pct']:+.1f} %) | CPU/step recgpt {row['recgpt_cpu_ms']:.1f} ms, "
            f"minimal {row['minimal_cpu_ms']:.1f} ms (overhead {row['cpu_overhead_pct']:+.1f} %; outside "
            f"the shared compute {row['recgpt_rest_ms']:.1f} vs {row['minimal_rest_ms']:.1f} ms: "
            f"{row['own_overhead_pct']:+.1f} %) | page faults/step {row['recgpt_faults']:.0f} vs "
            f"{row['minimal_faults']:.0f}"
            + (f" | HF Trainer {row['hf']:8.1f} (recgpt {row['speedup_vs_hf']:.2f}x)" if "hf" in row else "")
            + (
                f" | A/A: minimal {row['minimal_b']:.1f} samples/s ({row['aa_pct']:+.1f} %), CPU/step "
                f"{row['minimal_b_cpu_ms']:.1f} ms ({row['aa_cpu_pct']:+.1f} %)"
                if args.aa
                else ""
            )
            + (
                f" | paired by round (mean ± 1.96 s.e.): overhead {_pm(row['overhead_paired'])}"
                + (f", A/A {_pm(row['aa_paired'])}" if args.aa else "")
                if args.repeat >= 3
                else ""
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "nproc": args.nproc,
                "steps": args.steps,
                "warmup": args.warmup,
                "repeat": args.repeat,
                "overrides": args.overrides,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
