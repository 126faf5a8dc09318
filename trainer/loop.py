"""The training loop: ``train(cfg, report=None) -> final metrics``.

Runs unchanged as one process, under ``torchrun`` (any number of processes and nodes) and inside a
Ray Train worker (the launcher passes ``report``; this module never imports Ray). One readable
function in the nanoGPT spirit: fetch the step's micro-batches (their supervised positions, samples
and tokens counted on the host) -> start the step's one collective -> per micro-batch: forward
(adversarial inside the loss) -> (the first: wait for the collective) -> one backward -> step -> log ->
evaluate / checkpoint on their intervals. The helpers it uses live in sibling modules:
``distributed`` (process group), ``engine`` (DeepSpeed, AdamW, schedule), ``checkpoint`` (atomic
checkpoints, exact resume), ``resume`` (what a resumed run may change; the restored schedule follows
this run's settings), ``evaluate`` (distributed full ranking), ``monitor`` (the statistics window
reduced across ranks by name, TensorBoard, progress, JSONL log), ``faults`` (test-only crash
injection). :class:`TrainState` (with its two :class:`BestMetric` trackers) is what
``trainer_state.json`` holds.

Loss weighting (``modeling.loss``): every supervised position of an optimizer step weighs 1/N, N the
step's supervised positions over all its micro-batches and ranks, so ``grad_accum`` x micro-batch and
ranks x micro-batch give the gradient of one batch of the same sequences. The logged ``loss`` /
``clean_loss`` / ``adv_loss`` are per-position means of the step.

Non-finite losses: a rank whose micro-batch has a NaN/inf loss runs its backward anyway, with every
parameter gradient zeroed before it is accumulated (``trainer.engine.gradients_zeroed``): the collectives
inside backward and step stay matched across ranks (ZeRO 0-3), DeepSpeed's micro-step counter is
untouched, and the micro-batch adds exactly nothing; the other ranks' micro-batches of that step count as
usual. N still holds its positions, so that step's weights sum to (N - its positions) / N. No rank waits
to learn this before its backward: the count travels in the next step's collective (at a step that is
evaluated or checkpointed, and the last, in a collective of its own right after the step), where every
rank alike logs it and counts ``train.max_bad_steps`` consecutive such steps before
:class:`NonFiniteLossError` — raised before such a step is evaluated or checkpointed. A step whose every
micro-batch on every rank was non-finite still steps the optimizer with zero gradients: AdamW's momentum
and weight decay move the weights a little (as after any zero gradient); ``train.max_bad_steps`` bounds
how many such steps a run takes. Consumed samples and tokens count every micro-batch read (as
the reader's position does); the log window counts the non-finite ones apart
(``non_finite_micro_batches``), their losses out of the means.

Collectives (each a host sync on GPU, and a meeting point that waits for the slowest rank): one per
optimizer step, whatever ``grad_accum``, an all-gather of a few numbers summed on every rank
(:func:`make_reduce`) — N, the step's samples and tokens, the previous step's non-finite micro-batches —
all known on the host before the forward, so it is *started* before the first forward and waited for
after it, before the first backward divides the loss sums by N (``modeling.loss.divide``): a rank that
arrives first computes its forward instead of sleeping until the others arrive (measured: a blocking
collective between forward and backward cost the text format ~3 % of a step, docs/BENCHMARKS.md).
A step that is evaluated or checkpointed adds one (its non-finite count, above); a logged step adds
none: its statistics window and memory readings travel in the next step's
collective and are written then; only where the record must be on disk at once (the last step, an
evaluation or a checkpoint) does the log make its own collective. Nothing else on the hot path reads the
device or the other ranks: the counts come from the host copies of the batches, the gradient norm is
read on logging steps only (tests/test_training_state.py counts the collectives).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from configs import (
    AdversarialConfig,
    DataError,
    RecGPTConfig,
    TrainingError,
    atomic_write,
    one_line,
    save_resolved,
)
from data_shards.storage import is_url
from trainer.checkpoint import (
    CheckpointManager,
    checkpoint_name,
    find_resume_checkpoint,
    read_checkpoint_config,
    read_trainer_state,
    set_rng_state,
    step_of,
)
from trainer.distributed import (
    all_gather_tensor,
    setup_distributed,
    start_all_gather_tensor,
    teardown_distributed,
)
from trainer.engine import (
    build_engine,
    deepspeed_config,
    global_grad_norm,
    gradients_zeroed,
    param_grad_norm,
    tracks_grad_norm,
)
from trainer.evaluate import evaluate, to_device
from trainer.faults import Faults
from trainer.monitor import (
    HeldMemory,
    Monitor,
    StartReduce,
    StepStats,
    flops_per_token,
    keep_freed_memory,
    peak_flops,
    peak_memory_bytes,
    state_bytes,
)
from trainer.remote import RunSync
from trainer.resume import (
    apply_schedule,
    batch_for_world_size,
    check_data,
    other_changes,
    refuse_fixed_changes,
)
from trainer.warm_start import load_source, read_record_files, record_files

ReportFn = Callable[[dict[str, Any], "str | None"], None]


class NonFiniteLossError(TrainingError):
    """train.max_bad_steps consecutive steps had a NaN/inf loss in some micro-batch on some rank."""


@dataclass
class BestMetric:
    """The best value of ``eval.metric`` seen so far (higher is better): the one place that decides
    "improved". The loop keeps two: over every evaluation (early stopping) and among checkpoints (the
    ``best`` pointer; a checkpoint whose step was not evaluated is never best)."""

    value: float | None = None
    step: int | None = None
    """Step of the best value (of its checkpoint, for the checkpoint tracker)."""
    stale: int = 0
    """Updates since the last improvement (evaluations without improvement, for early stopping)."""

    def improves(self, value: float | None) -> bool:
        return value is not None and (self.value is None or value > self.value)

    def update(self, value: float | None, step: int) -> bool:
        """Record ``value`` measured at ``step``; True if it is the new best."""
        if self.improves(value):
            self.value, self.step, self.stale = value, step, 0
            return True
        self.stale += 1
        return False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BestMetric:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class TrainState:
    """What a checkpoint must carry besides DeepSpeed's state to continue exactly (trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    requested_batch: list[int] = field(default_factory=list)
    """[train.micro_batch_size, train.grad_accum] as the config asked: a resume on another world size
    may run others to keep the global batch (trainer.resume.batch_for_world_size)."""
    best_eval: BestMetric = field(default_factory=BestMetric)
    """Best eval.metric of any evaluation; ``stale`` counts evaluations for early stopping."""
    best_saved: BestMetric = field(default_factory=BestMetric)
    """Best eval.metric among checkpoints: the ``best`` pointer."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Metrics of the last evaluation."""

    @property
    def best_checkpoint(self) -> str | None:
        return None if self.best_saved.step is None else checkpoint_name(self.best_saved.step)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        """Tolerant: unknown keys are ignored, and the flat best-metric keys of trainer_state.json files
        written before :class:`BestMetric` (best_metric, evals_without_improvement,
        best_checkpoint_metric, best_checkpoint) are read into the two trackers."""
        plain = {
            k: d[k]
            for k in ("step", "epoch", "consumed_samples", "consumed_tokens", "metrics", "requested_batch")
            if k in d
        }
        st = cls(**plain)
        if isinstance(d.get("best_eval"), dict):
            st.best_eval = BestMetric.from_dict(d["best_eval"])
        else:
            st.best_eval = BestMetric(d.get("best_metric"), None, d.get("evals_without_improvement", 0))
        if isinstance(d.get("best_saved"), dict):
            st.best_saved = BestMetric.from_dict(d["best_saved"])
        else:
            name = d.get("best_checkpoint")
            st.best_saved = BestMetric(
                d.get("best_checkpoint_metric"), None if name is None else step_of(name)
            )
        return st


class Counts(NamedTuple):
    """A micro-batch's numbers that the step needs, counted on the host before it moves to the device."""

    positions: int
    """Supervised positions (``labels != IGNORE_INDEX``): what the loss sums over."""
    samples: int
    tokens: int
    """Non-padding tokens (``attention_mask`` ones)."""


def batch_counts(batch: dict[str, torch.Tensor]) -> Counts:
    from modeling.loss import supervised_positions

    return Counts(
        supervised_positions(batch), batch["input_ids"].shape[0], int(batch["attention_mask"].sum())
    )


def batch_stream(loader, device: torch.device) -> Iterator[tuple[dict[str, torch.Tensor], Counts]]:
    """Endless ``(batch, counts)``, epoch after epoch, the batch moved to ``device``, the counts made on
    the host copy (on a GPU, counting the device copy would wait for the device at every micro-batch).

    Fetching is kept out of the training RNG stream (the DataLoader draws worker seeds from the global
    torch RNG when an epoch's iterator starts): a resumed run, which starts its iterator mid-epoch,
    then draws the same dropout masks as the uninterrupted run.
    """
    while True:
        it = iter(loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(it, None)
            if batch is None:
                break  # epoch done; the loader has moved to (epoch + 1, 0)
            yield to_device(batch, device), batch_counts(batch)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def on_interval(step: int, interval: int, last: bool = False) -> bool:
    """True every ``interval`` steps (never for 0) and at the ``last`` step."""
    return bool(interval and step % interval == 0) or last


def make_reduce(device: torch.device) -> StartReduce:
    """The loop's and the monitor's one collective for a few numbers, started without waiting: sums and
    maxima over the ranks (``start(sums, maxima)() -> (sums, maxima)``, :data:`trainer.monitor.StartReduce`).

    One float64 tensor on this rank's device, all-gathered and reduced here, in rank order (the same
    result on every rank). An all-gather, not an all-reduce, even for sums only (every step): for a few
    numbers on gloo it costs less than half as much (2 CPU ranks here: 0.47 vs 1.06 ms wall, 0.30 vs
    0.65 ms CPU a call; docs/BENCHMARKS.md), a few % of a short CPU step.
    """

    def start(sums: list[float], maxima: list[float]) -> Callable[[], tuple[list[float], list[float]]]:
        wait = start_all_gather_tensor(torch.tensor([*sums, *maxima], dtype=torch.float64, device=device))

        def result() -> tuple[list[float], list[float]]:
            every = wait()  # [ranks, values]
            n = len(sums)
            return every[:, :n].sum(0).tolist(), every[:, n:].amax(0).tolist()

        return result

    return start


def count_bad_steps(monitor: Monitor, step: int, non_finite: int, in_a_row: int, limit: int) -> int:
    """``in_a_row`` (consecutive steps with a non-finite loss) after step ``step``, whose ``non_finite``
    micro-batches over all ranks the loop learns by a collective after it. Every rank calls it with the
    same numbers, so all stop together: :class:`NonFiniteLossError` at ``limit`` (``train.max_bad_steps``),
    raised before that step is evaluated or checkpointed."""
    if not non_finite:
        return 0
    in_a_row += 1
    monitor.non_finite(step, non_finite, in_a_row)
    if in_a_row >= limit:
        raise NonFiniteLossError(
            f"non-finite losses in {in_a_row} consecutive steps, the last step {step} "
            f"(train.max_bad_steps={limit}); lower optim.lr or check the data (with fp16: use bf16). "
            f"Step {step} is not checkpointed; train.resume=auto continues from the latest checkpoint."
        )
    return in_a_row


def adversarial_start_message(acfg: AdversarialConfig, step: int) -> str:
    """The log line of the first perturbed step (``step`` completed steps so far): the loss jumps there."""
    if acfg.method == "freelb":
        formula = f"the mean of the {acfg.steps} losses along the FreeLB ascent path"
    else:
        formula = f"clean_loss + {acfg.adv_weight:g} x adv_loss"
    after = f" after {acfg.warmup_steps} clean steps" if acfg.warmup_steps else ""
    return (
        f"step {step + 1}: adversarial training ({acfg.method}, epsilon {acfg.epsilon:g}) starts{after}; "
        f"the logged loss becomes {formula} and jumps here (clean_loss stays comparable)"
    )


def train(cfg: RecGPTConfig, report: ReportFn | None = None) -> dict[str, Any]:
    """Train ``cfg``; returns (on every rank) the final metrics also written to ``<output_dir>/metrics.json``.

    ``report(metrics, checkpoint_dir)`` is called on every rank after each complete checkpoint (its
    metrics hold the evaluation when that step was evaluated) and, with ``checkpoint_dir=None``, after
    each evaluation at a step without a checkpoint.
    """
    from data_shards.manifest import load_manifest, read_items
    from modeling.data import build_loader, check_data_settings
    from modeling.factory import build_model_and_tokenizer
    from modeling.lora import adalora_update, trainable_parameters
    from modeling.loss import LossComputer, divide, step_denominator

    # First: every allocation of the run is served under the fixed thresholds.
    kept_freed_memory = keep_freed_memory() if cfg.train.keep_freed_memory else None
    # The data settings are checked before the process group and DeepSpeed start: a wrong path or a
    # history longer than the shards' windows is one line at once, not after the op build.
    try:
        manifest = load_manifest(cfg.data.shards)
    except DataError as e:
        raise type(e)(f"data.shards: {one_line(e)}") from None
    # The resolved config (saved with the run, every checkpoint and export) says the real history length.
    cfg.data.max_history = check_data_settings(cfg, manifest, cfg.data.shards)
    info = setup_distributed()
    tc = cfg.train
    faults = Faults.from_env(info.rank)
    # An object-store output_dir: the run works in a local staging directory mirrored to the store.
    sync = RunSync(tc.output_dir, info.rank, tc.keep_last, faults) if is_url(tc.output_dir) else None
    out_dir = sync.local if sync is not None else Path(tc.output_dir)
    resume = sync.prepare(tc.resume) if sync is not None else tc.resume
    ckpts = CheckpointManager(out_dir, info.rank, info.world_size, tc.keep_last, faults)
    resume_from = find_resume_checkpoint(resume, out_dir)
    monitor = None
    try:
        # ---------------------------------------------------------------- model, data, engine
        saved_cfg, saved_world, resize_line = None, info.world_size, None
        requested = [tc.micro_batch_size, tc.grad_accum]
        if resume_from is not None:
            # Before anything is built: a setting the checkpoint cannot continue with is one line naming it.
            saved_cfg = read_checkpoint_config(resume_from)
            refuse_fixed_changes(saved_cfg, cfg, resume_from)
            check_data(resume_from, manifest, cfg, saved_cfg)
            saved_state = read_trainer_state(resume_from)
            saved_world = int(saved_state["world_size"])
            # Another world size keeps the global batch: micro-batch x accumulation re-chosen per rank.
            tc.micro_batch_size, tc.grad_accum, requested, resize_line = batch_for_world_size(
                saved_cfg, saved_state, cfg, info.world_size
            )
        # ZeRO >= 1 state of another world size loads through DeepSpeed's universal checkpoint.
        universal = saved_world != info.world_size and cfg.zero.stage >= 1
        items = read_items(cfg.data.shards, manifest)
        # train.init_from: a new run's weights come from a trained model (a resumed one has its own).
        warm = load_source(cfg) if tc.init_from and resume_from is None else None
        t_setup = time.perf_counter()
        model, tokenizer = build_model_and_tokenizer(
            cfg, cfg.data.shards, ds_config=deepspeed_config(cfg, info.world_size), warm_start=warm
        )
        setup_s = {"model_s": time.perf_counter() - t_setup}
        # Every checkpoint (hence the export) says where a warm-started run came from.
        ckpts.extra_files = (
            record_files(warm, cfg, items, manifest) if warm is not None
            else read_record_files(resume_from) if resume_from is not None else {}
        )  # fmt: skip
        if info.is_main and ckpts.extra_files:
            out_dir.mkdir(parents=True, exist_ok=True)
            for name, data in ckpts.extra_files.items():
                atomic_write(out_dir / name, data)
        train_loader = build_loader(
            cfg, "train", tokenizer, items, rank=info.rank, world_size=info.world_size
        )
        valid_loader = build_loader(
            cfg, "valid", tokenizer, items, rank=info.rank, world_size=info.world_size
        )
        n_trainable, n_params = trainable_parameters(model)
        total_steps = tc.max_steps or tc.epochs * max(1, len(train_loader) // tc.grad_accum)
        t_setup = time.perf_counter()
        engine = build_engine(cfg, model, info.world_size, total_steps, load_universal=universal)
        setup_s["engine_s"] = time.perf_counter() - t_setup
        engine.train()
        counts = [it.get("count") for it in items]
        loss_fn = LossComputer(cfg, None if None in counts else [int(c) for c in counts])
        seed_everything(cfg.seed + info.rank)  # per-rank dropout streams (the weights are already identical)

        st, rng, resume_lines = TrainState(requested_batch=requested), None, []
        if resume_from is not None:
            # One converter per run directory: rank 0, or each node's first rank on node-local staging.
            convert = info.is_main if sync is None else info.local_rank == 0
            saved, rng = ckpts.load(
                engine, resume_from, train_loader, universal=universal, convert=convert,
                drop_remainder=not tc.keep_global_batch,
            )  # fmt: skip
            st = TrainState.from_dict(saved)
            st.requested_batch = requested
            if saved_world != info.world_size:
                resume_lines.append(resize_line or f"resume: world size {saved_world} -> {info.world_size}")
                if ckpts.conversion_s is not None:
                    resume_lines.append(
                        f"resume: converted {resume_from.name} to DeepSpeed's universal checkpoint in "
                        f"{ckpts.conversion_s:.1f}s"
                    )
                resume_lines.append(
                    f"resume: the rest of epoch {train_loader.epoch} re-planned over {info.world_size} "
                    f"rank(s): {len(train_loader)} batches of {tc.micro_batch_size} per rank"
                )
            elif resize_line:
                resume_lines.append(resize_line)
            # DeepSpeed restored the checkpoint's schedule and optimizer settings: this run's config rules.
            resume_lines += apply_schedule(engine, cfg, total_steps, st.step)
            changed = other_changes(saved_cfg, cfg)
            if changed:
                resume_lines.append(f"resume: changed since the checkpoint (from step {st.step + 1}): "
                                    + ", ".join(changed))  # fmt: skip
        if info.is_main:
            save_resolved(cfg, out_dir)  # after apply_schedule: it says what the optimizer does
        start_reduce = make_reduce(info.device)
        monitor = Monitor(
            cfg, out_dir, info.is_main, total_steps, st.step,
            reduce=lambda sums, maxima: start_reduce(sums, maxima)(), start_reduce=start_reduce,
        )  # fmt: skip
        monitor.timing("setup", st.step, setup_s)
        if kept_freed_memory is False:
            monitor.message(
                "train.keep_freed_memory: not glibc >= 2.33 here; the allocator keeps its defaults"
            )
        if resume_from is not None:
            shown = sync.shown(resume_from) if sync is not None else resume_from
            monitor.message(f"resumed from {shown} at step {st.step}")
            for line in resume_lines:
                monitor.message(line)
            if rng is not None:
                set_rng_state(rng)  # last: nothing may draw from the RNGs between here and the first step
            else:  # another world size: fresh per-rank streams, reproducible from seed, rank and step
                seed_everything(cfg.seed + info.rank + 1_000_003 * st.step)

        # ---------------------------------------------------------------- loop
        acfg = cfg.adversarial
        batches = batch_stream(train_loader, info.device)
        mfu_terms = None  # (peak FLOP/s of all ranks, FLOPs per token), computed at the first log
        held_memory = HeldMemory(info.device)
        bad_steps = 0  # consecutive steps with a non-finite loss on some rank, as far as known
        non_finite = 0  # this rank's non-finite micro-batches of the step just done (reported in the next)
        counted = True  # whether the step just done (if any) was counted already (see count_bad_steps)
        grad_norm = None
        step_lr = 0.0  # the learning rate of the step being run (read before step() advances the schedule)
        last_ckpt_step = st.step if resume_from is not None else -1
        stop = st.step >= total_steps
        while not stop:
            if acfg.method != "none" and st.step == acfg.warmup_steps:
                monitor.message(adversarial_start_message(acfg, st.step))
            t_step = time.perf_counter()
            stats = StepStats()
            t0 = time.perf_counter()
            micro_batches = [next(batches) for _ in range(tc.grad_accum)]
            stats.data_wait_s += time.perf_counter() - t0
            # The step's one collective, started here and waited for after the first forward (a rank
            # that arrives first computes instead of sleeping): N (every supervised position of the
            # step, on every rank, weighs 1/N: modeling.loss), the samples and tokens (exact in
            # checkpoints), the previous step's non-finite micro-batches, and a log window closed at the
            # previous step, if any (Monitor.log_train). All known on the host before the forward.
            wait = monitor.step_reduce(
                [
                    sum(counts.positions for _, counts in micro_batches),
                    sum(counts.samples for _, counts in micro_batches),
                    sum(counts.tokens for _, counts in micro_batches),
                    non_finite,
                ]
            )
            carried, non_finite, counted, denominator = not counted, 0, False, None
            for i, (batch, counts) in enumerate(micro_batches):
                # The sums over the supervised positions, divided once N is known (modeling.loss.divide).
                loss, logs = loss_fn(engine, batch, st.step, 1.0)
                if faults.nan_loss(st.step + 1):
                    loss, logs = loss * float("nan"), {**logs, "loss": float("nan")}
                if denominator is None:
                    n, samples, tokens, bad_before = wait()
                    denominator = step_denominator(int(n), tc.grad_accum, info.world_size)
                    if carried:  # the previous step's count rode in this collective
                        bad_steps = count_bad_steps(
                            monitor, st.step, int(bad_before), bad_steps, tc.max_bad_steps
                        )
                loss, logs = divide(loss, logs, denominator)
                # A non-finite loss (logs["loss"] is the loss read back) is this rank's alone to know:
                # its backward still runs, so every collective inside backward and step stays matched
                # with the other ranks and DeepSpeed's micro-step counter is untouched, but with every
                # parameter gradient zeroed before it is accumulated: the micro-batch adds nothing.
                finite = math.isfinite(logs["loss"])
                if finite:
                    engine.backward(loss)
                else:
                    non_finite += 1
                    with gradients_zeroed(engine.module):
                        engine.backward(loss)
                boundary = i == tc.grad_accum - 1
                if boundary and cfg.lora.method == "adalora" and cfg.lora.enabled:
                    adalora_update(engine, st.step)  # reads .grad: before step() zeroes it
                log_next = on_interval(st.step + 1, tc.log_interval, st.step + 1 == total_steps)
                if boundary and log_next and not tracks_grad_norm(cfg):
                    grad_norm = param_grad_norm(engine.module)  # fp32 ZeRO-0: before step() zeroes .grad
                if boundary:
                    step_lr = engine.get_lr()[0]  # what this step uses: step() advances the schedule
                engine.step()
                stats.add_micro_batch(logs, batch, counts.tokens, finite)
            st.step += 1
            st.epoch = train_loader.epoch
            stats.step_time_s = time.perf_counter() - t_step
            st.consumed_samples += int(samples)  # exact in every checkpoint
            st.consumed_tokens += int(tokens)
            monitor.add_step(stats)
            # The last step, or one that is evaluated or checkpointed: what it did must be known now.
            settles = (
                st.step == total_steps
                or on_interval(st.step, tc.eval_interval)
                or on_interval(st.step, tc.checkpoint_interval)
            )
            if settles:
                # Its non-finite count, at once (its own collective, at these steps only), so a run
                # that reaches train.max_bad_steps here stops before writing it.
                (now,), _ = monitor.reduce([non_finite], [])
                bad_steps = count_bad_steps(monitor, st.step, int(now), bad_steps, tc.max_bad_steps)
                non_finite, counted = 0, True

            # ------------------------------------------------------------ log
            if on_interval(st.step, tc.log_interval, st.step == total_steps):
                if tracks_grad_norm(cfg):
                    # DeepSpeed keeps the last step's norm: read (a host sync) when it is logged only.
                    grad_norm = global_grad_norm(engine)
                if mfu_terms is None:
                    cluster_peak = (peak_flops(info.device) or 0.0) * info.world_size
                    mfu_terms = cluster_peak, flops_per_token(engine.module, batch["input_ids"].shape[1])
                monitor.log_train(
                    st.step,
                    lr=step_lr,  # the learning rate this step's update used
                    grad_norm=grad_norm,  # of this step (clipping happens after measuring)
                    peak_memory_bytes=peak_memory_bytes(info.device),
                    memory_bytes=held_memory(fresh=st.step == total_steps),
                    cluster_peak_flops=mfu_terms[0],
                    flops_per_token=mfu_terms[1],
                    # Reduced with the next step's collective (no extra meeting of the ranks),
                    # except where the record must be written now: last step, evaluation, checkpoint,
                    # and the step before the adversarial start's message (which must follow it).
                    defer=not (settles or (acfg.method != "none" and st.step == acfg.warmup_steps)),
                )
                if sync is not None:
                    monitor.flush()
                    sync.sync_logs()

            # ------------------------------------------------------------ evaluate
            last = st.step >= total_steps
            evaluated = on_interval(st.step, tc.eval_interval, last)
            if evaluated:
                st.metrics = evaluate(engine, valid_loader, cfg, info.device)
                monitor.eval(st.step, st.metrics)
                st.best_eval.update(st.metrics[cfg.eval.metric], st.step)
                patience = tc.early_stopping_patience
                if patience and st.best_eval.stale >= patience:
                    monitor.message(
                        f"early stopping at step {st.step}: {cfg.eval.metric} did not improve for "
                        f"{st.best_eval.stale} evaluations (best {st.best_eval.value:.4f})"
                    )
                    last = True
            stop = last

            # ------------------------------------------------------------ checkpoint
            if on_interval(st.step, tc.checkpoint_interval, last):
                # Only an evaluated checkpoint can be the best one.
                is_best = evaluated and st.best_saved.update(st.metrics[cfg.eval.metric], st.step)
                ckpt_metrics = {**(st.metrics if evaluated else {}), "step": st.step, "epoch": st.epoch}
                t_save = time.perf_counter()
                path = ckpts.save(
                    engine, st.step, train_loader, st.to_dict(), cfg, ckpt_metrics, tokenizer, is_best
                )
                monitor.timing("checkpoint", st.step, {"save_s": time.perf_counter() - t_save})
                last_ckpt_step = st.step
                if sync is not None:
                    if info.is_main:
                        monitor.flush()  # the logs up to this checkpoint go to the store with it
                    sync.publish_checkpoint(path.name, st.step, ckpts.written, ckpts.owned)
                    path = sync.store(f"checkpoints/{path.name}")
                if report is not None:
                    report(ckpt_metrics, str(path))
            elif evaluated and report is not None:
                # Every evaluation reaches the launcher, so a scheduler (Ray Tune's ASHA) can stop a weak trial.
                report({**st.metrics, "step": st.step, "epoch": st.epoch}, None)
            faults.maybe_kill("kill", st.step)

        # ---------------------------------------------------------------- the end
        if last_ckpt_step != st.step:
            raise RuntimeError(f"internal: finished at step {st.step} without a final checkpoint")
        # What each rank holds of model and optimizer state: the figure ZeRO partitions (one collective).
        held = state_bytes(engine.module, engine.optimizer)
        monitor.state(st.step, all_gather_tensor(
            torch.tensor([held["model"], held["optimizer"]], dtype=torch.float64, device=info.device)
        ).tolist())  # fmt: skip
        final = {
            **st.metrics,
            "step": st.step,
            "epoch": st.epoch,
            "consumed_samples": st.consumed_samples,
            "consumed_tokens": st.consumed_tokens,
            "best_checkpoint": st.best_checkpoint,
            f"best_{cfg.eval.metric}": st.best_saved.value,
            "trainable_parameters": n_trainable,
            "parameters": n_params,
        }
        if info.is_main:
            atomic_write(out_dir / "metrics.json", json.dumps(final, indent=2, sort_keys=True))
            monitor.message("final: " + json.dumps(final, sort_keys=True))
            monitor.message(
                f"run directory {sync.url if sync is not None else out_dir}: checkpoints/ (latest: "
                f"{checkpoint_name(st.step)}, best: "
                f"{st.best_checkpoint}), {'tensorboard/, ' if cfg.logging.tensorboard else ''}train_log.jsonl, "
                "metrics.json, config.yaml"
            )
            if sync is not None:
                monitor.flush()
                sync.sync_logs()
        return final
    finally:
        if monitor is not None:
            monitor.close()
        if sync is not None:
            sync.cleanup()
        teardown_distributed(info)
