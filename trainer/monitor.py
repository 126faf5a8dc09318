"""Training telemetry: the per-rank statistics window, and on rank 0 TensorBoard scalars, a progress
bar or plain log lines, a JSONL log.

Every rank holds a :class:`Monitor`: the statistics window (:class:`StepStats`, summed step after step)
lives on every rank because reducing it at log time is a collective; only rank 0 writes, the other
ranks' writing methods do nothing, so the loop never branches on rank. ``<output_dir>/train_log.jsonl``
holds one JSON object per logged step (and per evaluation): the machine-readable record tests and
scripts use instead of parsing TensorBoard.
"""

from __future__ import annotations

import ctypes
import functools
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak of one GPU, by device-name substring (MFU denominator). Override: RECGPT_PEAK_FLOPS.
_PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_bytes(device: torch.device) -> int:
    """Memory this process holds now: CUDA allocated bytes on GPU; on CPU the resident set size less
    the bytes malloc keeps free in its arenas (glibc's ``mallinfo2().fordblks``), so the holes freed
    tensors leave stop counting, as after ``malloc_trim`` — without trimming: a trim hands those pages
    back to the OS, and the next steps fault them in again (measured: one trim inside an 80-step
    window of the text throughput benchmark cost ~5 % of it; docs/BENCHMARKS.md). ``mallinfo2`` walks
    malloc's free lists: ~20 µs in a small process, 3.6 ms in the text benchmark's training process, so
    the loop reads it through :class:`HeldMemory`. Elsewhere than glibc (no ``mallinfo2``): the RSS.
    """
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * resource.getpagesize()
    return max(rss - _free_heap_bytes(), 0)


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library already loaded in this process (``ctypes.util.find_library`` would run ``ldconfig``
    in a subprocess at every call)."""
    return ctypes.CDLL(None)


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc >= 2.33): every field a ``size_t``."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    fn = getattr(_libc(), "mallinfo2", None)
    if fn is not None:
        fn.restype, fn.argtypes = _MallInfo2, []
    return fn


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit
# (DEFAULT_MMAP_THRESHOLD_MAX); mallopt takes a C int, hence the trim threshold's bound.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc malloc keep the memory a training step frees for the next step instead of handing it
    back to the OS (``train.keep_freed_memory``); True if glibc took both settings.

    A CPU step allocates and frees the same activations, gradients and optimizer temporaries every
    time. glibc's defaults serve a block above its *dynamic* mmap threshold (128 KiB, raised as mapped
    blocks are freed) with a fresh ``mmap`` and unmap it on free, and trim the heap's free top above a
    trim threshold that follows it, so each step faults its pages in again: 4-8 thousand minor page
    faults a step in the text throughput benchmark (2 ranks), ~1.6 µs each, 5-10 % of the step's CPU
    time, and varying from run to run with the order of allocations (docs/BENCHMARKS.md). Fixing both
    thresholds (mallopt ``M_MMAP_THRESHOLD`` 32 MiB, glibc's largest; ``M_TRIM_THRESHOLD`` 2 GiB) takes
    that to ~100. Both are needed: a fixed mmap threshold alone keeps the 128 KiB trim threshold (more
    faults), a fixed trim threshold alone keeps the 128 KiB mmap threshold (every block above it mapped
    afresh). The cost: the process's resident memory stays at its peak (blocks above 32 MiB are still
    mapped and unmapped; ``memory_gb`` counts held memory without malloc's free bytes). The same effect
    as preloading jemalloc or tcmalloc, PyTorch's advice for CPU training, without a preload. Elsewhere
    than glibc (no ``mallopt``) nothing changes and False is returned.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None or _mallinfo2() is None:  # not glibc (musl's mallopt accepts and ignores)
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def _free_heap_bytes() -> int:
    """Bytes malloc holds free in all its arenas (0 where ``mallinfo2`` is missing)."""
    fn = _mallinfo2()
    return int(fn().fordblks) if fn is not None else 0


class HeldMemory:
    """:func:`memory_bytes` for every log, read at most once per ``min_interval_s`` on CPU.

    A CPU reading walks malloc's free lists (3.6 ms a reading in the text throughput benchmark's
    process; at ``train.log_interval=1`` that is ~3 % of its step). Held memory changes slowly, so a
    reading at most once a minute (and on ``fresh`` requests: the last step's log) keeps
    ``perf/memory_gb`` meaningful at a negligible cost; the logs in between repeat the last reading.
    GPU readings are a counter read and always fresh.
    """

    def __init__(
        self, device: torch.device, min_interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.device = device
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.value: int | None = None
        self.at = 0.0

    def __call__(self, fresh: bool = False) -> int:
        if self.device.type == "cuda":
            return memory_bytes(self.device)
        now = self.clock()
        if fresh or self.value is None or now - self.at >= self.min_interval_s:
            self.value, self.at = memory_bytes(self.device), now
        return self.value


def state_bytes(module: torch.nn.Module, optimizer: Any) -> dict[str, int]:
    """Bytes of training state this rank holds now: ``model`` (its parameters and buffers; under ZeRO-3
    the rank's partition, ``ds_tensor``, plus what is gathered at the moment) and ``optimizer``
    (everything else the optimizer object reaches: moments, fp32 master copies, the gradients held
    between steps, the gradient partitions and buffers of DeepSpeed's ZeRO optimizers).

    Counted by tensor storage, each storage once (views share one), so a flat ZeRO buffer and the
    partitions viewing it count once. The steady-state figure ZeRO partitions, free of interpreter,
    allocator slack and transient peaks (RSS and ``perf/peak_memory_gb`` include those).
    """
    seen: set[int] = set()

    def storage_bytes(t: torch.Tensor) -> int:
        s = t.untyped_storage()
        key = s.data_ptr()
        if key in seen or s.nbytes() == 0:
            return 0
        seen.add(key)
        return s.nbytes()

    model = 0
    for p in module.parameters():
        model += storage_bytes(p.data) + (storage_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else 0)
    for b in module.buffers():
        model += storage_bytes(b)

    visited: set[int] = set()
    stack: list[Any] = [optimizer]
    opt = 0
    while stack:
        obj = stack.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            opt += storage_bytes(obj)
            if obj.grad is not None:
                stack.append(obj.grad)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif type(obj).__module__.split(".")[0] == "deepspeed" or isinstance(obj, torch.optim.Optimizer):
            # Only the optimizer's own objects are walked (DeepSpeed's ZeRO optimizers keep their state in
            # attributes); a module it refers to adds nothing new: its parameters were counted above.
            stack.extend(getattr(obj, "__dict__", {}).values())
    return {"model": model, "optimizer": opt}


def peak_flops(device: torch.device) -> float | None:
    import os

    if os.environ.get("RECGPT_PEAK_FLOPS"):
        return float(os.environ["RECGPT_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B / nanoGPT): 6N + 12 * layers * width * seq_len.

    N counts every weight (ZeRO-3 partitioned ones by their full size). Frozen LoRA base weights
    still cost forward + input-gradient FLOPs, so this slightly overestimates LoRA runs; the extra
    forward/backward passes of adversarial training are not counted (MFU of the clean step).
    """
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    layers = width = 0
    for m in model.modules():
        conf = getattr(m, "config", None)
        if conf is not None and hasattr(conf, "num_hidden_layers"):
            layers, width = conf.num_hidden_layers, conf.hidden_size
            break
    return 6.0 * n + 12.0 * layers * width * seq_len


Reduce = Callable[[list[float], list[float]], tuple[list[float], list[float]]]
"""``reduce(sums, maxima) -> (sums over ranks, maxima over ranks)`` of two short lists of numbers, in ONE
collective (the loop passes one built on ``trainer.distributed``; tests pass a fake). Every rank must
call it, in the same order, with lists of the same lengths."""


StartReduce = Callable[[list[float], list[float]], Callable[[], tuple[list[float], list[float]]]]
"""``start(sums, maxima) -> wait``: the same collective as :data:`Reduce`, started without waiting for
it; ``wait()`` (called once) returns its result. The loop's step collective starts before the forward and
is waited for after it, so a rank that arrives first computes instead of sleeping until the others come."""


def no_reduce(sums: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
    """The :data:`Reduce` of a single process."""
    return [float(v) for v in sums], [float(v) for v in maxima]


def started_at_once(reduce: Reduce) -> StartReduce:
    """``reduce`` as a :data:`StartReduce` that runs when started (one process, tests' fakes)."""

    def start(sums: list[float], maxima: list[float]) -> Callable[[], tuple[list[float], list[float]]]:
        result = reduce(sums, maxima)
        return lambda: result

    return start


_COUNTS = ("micro_batches", "non_finite", "samples", "tokens", "positions")
_SECONDS = ("data_wait_s", "step_time_s")


@dataclass
class StepStats:
    """One rank's numbers for one optimizer step, or summed over the steps of a log window."""

    losses: dict[str, float] = field(default_factory=dict)
    """Sums over micro-batches of the logged loss terms, by name (loss, clean_loss, adv_loss, ...)."""
    micro_batches: int = 0
    """Micro-batches whose loss went into the step(s): the finite ones."""
    non_finite: int = 0
    """Micro-batches whose loss was non-finite: their backward ran with zeroed gradients (they add
    nothing to the step); their samples, tokens and positions count (they were read and computed)."""
    samples: int = 0
    """Sequences."""
    tokens: int = 0
    """Non-padding tokens (``attention_mask`` ones)."""
    positions: int = 0
    """Sequence positions, padding included: what the forward computes (the MFU numerator)."""
    data_wait_s: float = 0.0
    """Seconds spent waiting for the next batch."""
    step_time_s: float = 0.0
    """Wall seconds of the step(s), data wait included."""

    def add_micro_batch(
        self,
        logs: dict[str, float],
        batch: dict[str, torch.Tensor],
        tokens: int | None = None,
        finite: bool = True,
    ) -> None:
        """Count one micro-batch that went through backward and step. ``tokens``: its non-padding tokens
        when the caller counted them already (the loop counts on the host: summing the mask on the
        device would wait for the GPU). ``finite=False``: its loss was non-finite; ``logs`` add 0 (their
        names still enter: every rank's window must hold the same names for the collective)."""
        for k, v in logs.items():
            self.losses[k] = self.losses.get(k, 0.0) + (v if finite else 0.0)
        self.micro_batches += finite
        self.non_finite += not finite
        self.samples += batch["input_ids"].shape[0]
        self.tokens += int(batch["attention_mask"].sum()) if tokens is None else tokens
        self.positions += batch["input_ids"].numel()

    def add(self, other: StepStats) -> None:
        """Add ``other`` (the next step) into these sums."""
        for k, v in other.losses.items():
            self.losses[k] = self.losses.get(k, 0.0) + v
        for name in _COUNTS + _SECONDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def reduced(self, reduce: Reduce, maxima: list[float] | None = None) -> tuple[StepStats, list[float]]:
        """The sums over every rank, matched by name, and the maxima over the ranks of ``maxima`` (one
        collective for both: every rank calls it)."""
        names, values = self.flat()
        total, top = reduce(values, maxima or [])
        return StepStats.unflat(names, total), top

    def flat(self) -> tuple[list[str], list[float]]:
        """``(loss names, numbers)``: the losses in name order, then the counts and seconds — what a
        collective sums (every rank has the same loss names)."""
        names = sorted(self.losses)
        return names, [self.losses[k] for k in names] + [getattr(self, n) for n in _COUNTS + _SECONDS]

    @staticmethod
    def unflat(names: list[str], values: list[float]) -> StepStats:
        """The inverse of :meth:`flat` (counts back to ``int``)."""
        out = StepStats(losses=dict(zip(names, values[: len(names)])))
        for n, v in zip(_COUNTS + _SECONDS, values[len(names) :]):
            setattr(out, n, int(v) if n in _COUNTS else float(v))
        return out


@dataclass
class _ClosedWindow:
    """A log window as closed at its last step, with that step's readings (what its record will hold)."""

    step: int
    window: StepStats
    steps: int
    lr: float
    grad_norm: float | None
    peak_memory_bytes: float
    memory_bytes: float
    cluster_peak_flops: float
    flops_per_token: float
    time: float
    """Unix seconds when the window closed: the record's ``time``, even when written a micro-batch later."""


def window_scalars(
    local: StepStats,
    total: StepStats,
    steps: int,
    memory_gb: dict[str, float] | None = None,
    cluster_peak_flops: float = 0.0,
    flops_per_token: float = 0.0,
) -> tuple[dict[str, float], dict[str, float]]:
    """``(train, perf)`` scalars of a log window of ``steps`` optimizer steps.

    ``local``: this rank's sums (its wall time is the window's time; ``*_rank0`` are its rates),
    ``total``: the sums over all ranks. train: the mean of each loss term over every micro-batch of
    every rank whose loss was finite (``None`` when none was), and ``non_finite_micro_batches`` when
    there were others. perf: throughput, step and data-wait time per step, ``memory_gb`` as given, and MFU
    when ``cluster_peak_flops`` (all ranks' peak FLOP/s together) is known.
    """
    seconds = local.step_time_s
    # Every micro-batch of the window non-finite: no mean to give (null in the JSONL, no TensorBoard point).
    finite = total.micro_batches
    train = {k: v / finite if finite else None for k, v in total.losses.items()} or {"loss": None}
    if total.non_finite:
        train["non_finite_micro_batches"] = float(total.non_finite)
    perf = {
        "samples_per_s": total.samples / seconds,
        "tokens_per_s": total.tokens / seconds,
        "samples_per_s_rank0": local.samples / seconds,
        "tokens_per_s_rank0": local.tokens / seconds,
        "step_time_s": seconds / steps,
        "data_wait_s": local.data_wait_s / steps,
        **(memory_gb or {}),
    }
    if cluster_peak_flops:
        perf["mfu"] = flops_per_token * total.positions / seconds / cluster_peak_flops
    return train, perf


class Monitor:
    """Telemetry of one rank. The statistics window works on every rank; with ``enabled=False`` (every
    rank but 0) the writing calls are no-ops."""

    def __init__(
        self,
        cfg,
        output_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        reduce: Reduce = no_reduce,
        start_reduce: StartReduce | None = None,
    ):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.plain = False
        self.total_steps = total_steps
        self.reduce = reduce
        self.start_reduce = start_reduce or started_at_once(reduce)
        """The same collective as ``reduce``, started without waiting (:meth:`step_reduce`)."""
        self.window = StepStats()
        """This rank's sums since the last log."""
        self.window_steps = 0
        self._pending: _ClosedWindow | None = None
        """A closed log window whose reduction waits for the next step's collective."""
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "train_log.jsonl", "a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at steps >= it: those a crashed run wrote after the checkpoint we
            # resume from (step start_step's own events belong to the checkpoint and stay).
            self.writer = SummaryWriter(
                str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        mode = cfg.logging.progress
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "plain"
        if mode == "tqdm":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )
        self.plain = mode == "plain"

    # ------------------------------------------------------------------ the statistics window
    def add_step(self, stats: StepStats) -> None:
        """One optimizer step done on this rank: add its numbers to the window, move the progress bar."""
        self.window.add(stats)
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def log_train(
        self,
        step: int,
        *,
        lr: float,
        grad_norm: float | None,
        peak_memory_bytes: float,
        memory_bytes: float,
        cluster_peak_flops: float = 0.0,
        flops_per_token: float = 0.0,
        defer: bool = False,
    ) -> tuple[dict[str, float], dict[str, float]] | None:
        """Close the log window at ``step``: reduce it over the ranks, log it (rank 0) and start a new
        one; returns ``(train, perf)``, or ``None`` with ``defer``.

        Every rank calls it at the same steps. The reduction is one collective: the window's sums by
        name, and this rank's peak and current memory, max over ranks. With ``defer`` that collective is
        not made here: the closed window rides on the next :meth:`step_reduce` (the next step's
        collective, which every rank makes anyway) and is written when that is waited for, after the
        step's first forward — a logged step then costs no extra meeting of the ranks. The loop defers except where the record must be
        on disk at this step (the last step, an evaluation or a checkpoint). ``grad_norm`` is the step's
        (measured before clipping); the ``*_rank0`` scalars are this rank's.
        """
        self._log_pending()  # a deferred window not yet carried (no micro-batch since): reduce it first
        self._pending = _ClosedWindow(
            step, self.window, self.window_steps, lr, grad_norm, float(peak_memory_bytes),
            float(memory_bytes), cluster_peak_flops, flops_per_token, time.time(),
        )  # fmt: skip
        self.window, self.window_steps = StepStats(), 0
        return None if defer else self._log_pending()

    def step_reduce(self, sums: list[float]) -> Callable[[], list[float]]:
        """Start the loop's step collective: ``sums`` summed over the ranks; returns the function that
        waits for it and gives them. When a deferred log window is waiting, its sums and memory maxima
        travel in the same collective, and it is written when the result is waited for (until then it
        stays pending: a run that fails in between still writes it at :meth:`close`)."""
        closed = self._pending
        if closed is None:
            wait = self.start_reduce(sums, [])
            return lambda: wait()[0]
        names, window = closed.window.flat()
        wait = self.start_reduce([*sums, *window], [closed.peak_memory_bytes, closed.memory_bytes])

        def finish() -> list[float]:
            total, maxima = wait()
            self._pending = None
            self._write_window(closed, StepStats.unflat(names, total[len(sums) :]), maxima)
            return total[: len(sums)]

        return finish

    def _log_pending(self) -> tuple[dict[str, float], dict[str, float]] | None:
        """Reduce and write the waiting window, if any, in a collective of its own."""
        closed, self._pending = self._pending, None
        if closed is None:
            return None
        total, maxima = closed.window.reduced(self.reduce, [closed.peak_memory_bytes, closed.memory_bytes])
        return self._write_window(closed, total, maxima)

    def _write_window(
        self, closed: _ClosedWindow, total: StepStats, maxima: list[float], note: str | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        peak_max, held_max = maxima
        memory_gb = {
            "peak_memory_gb": float(peak_max) / 2**30,
            "peak_memory_gb_rank0": closed.peak_memory_bytes / 2**30,
            "memory_gb": float(held_max) / 2**30,  # held at the window's end, max over ranks
        }
        train, perf = window_scalars(
            closed.window, total, closed.steps, memory_gb, closed.cluster_peak_flops, closed.flops_per_token
        )
        train["lr"] = closed.lr
        train["grad_norm"] = closed.grad_norm
        self.train_step(closed.step, train, perf, at=closed.time, note=note)
        return train, perf

    # ------------------------------------------------------------------ writing (rank 0)
    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def _record(self, kind: str, step: int, values: dict[str, Any], at: float | None = None) -> None:
        at = time.time() if at is None else at
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": at, **values}) + "\n")
        self.jsonl.flush()

    def train_step(
        self,
        step: int,
        train: dict[str, float],
        perf: dict[str, float],
        at: float | None = None,
        note: str | None = None,
    ) -> None:
        """Write one ``train`` record (``at``: its time, default now; ``note``: a caveat it carries)."""
        if not self.enabled:
            return
        self._scalars("train", train, step)
        self._scalars("perf", perf, step)
        self._record("train", step, {**train, **perf, **({"note": note} if note else {})}, at)
        loss = "non-finite" if train["loss"] is None else f"{train['loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(loss=loss, samples_s=f"{perf['samples_per_s']:.0f}", refresh=False)
        elif self.plain:
            print(
                f"step {step}/{self.total_steps} | loss {loss} | lr {train['lr']:.2e} | "
                f"{perf['samples_per_s']:.0f} samples/s | {perf['tokens_per_s']:.0f} tokens/s | "
                f"step {perf['step_time_s'] * 1000:.0f} ms (data {perf['data_wait_s'] * 1000:.0f} ms)"
                + (f" | MFU {perf['mfu']:.1%}" if "mfu" in perf else ""),
                flush=True,
            )

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._scalars("eval", metrics, step)
        self._record("eval", step, metrics)
        line = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.write(f"eval step {step}: {line}")
        elif self.plain:
            print(f"eval step {step}: {line}", flush=True)

    def timing(self, kind: str, step: int, seconds: dict[str, float]) -> None:
        """Record rank 0's wall seconds of a part of the run outside the steps: ``setup`` (``model_s``:
        building the model and tokenizer; ``engine_s``: DeepSpeed's engine) or ``checkpoint`` (``save_s``:
        one complete checkpoint, every rank's files). A JSONL record, no log line."""
        if self.enabled:
            self._record(kind, step, {k: round(v, 3) for k, v in seconds.items()})

    def state(self, step: int, per_rank: list[list[float]]) -> None:
        """Record each rank's ``[model, optimizer]`` state bytes (:func:`state_bytes`): a ``state`` record
        in the JSONL log and one line."""
        if not self.enabled:
            return
        model, opt = [[int(r[i]) for r in per_rank] for i in (0, 1)]
        self._record("state", step, {"model_bytes": model, "optimizer_bytes": opt})
        shown = ", ".join(f"{(m + o) / 2**20:,.1f}" for m, o in zip(model, opt))
        self.message(
            f"model + optimizer state per rank: {shown} MiB (model {model[0] / 2**20:,.1f} on rank 0)"
        )

    def non_finite(self, step: int, micro_batches: int, in_a_row: int) -> None:
        """Step ``step`` had ``micro_batches`` micro-batches with a non-finite loss over the ranks (the
        ``in_a_row``-th such step in a row): a ``non_finite`` JSONL record and one log line."""
        if not self.enabled:
            return
        self._record("non_finite", step, {"micro_batches": micro_batches, "steps_in_a_row": in_a_row})
        self.message(
            f"step {step}: non-finite loss in {micro_batches} micro-batch(es) over the ranks, which added no "
            f"gradient ({in_a_row} such step(s) in a row)"
        )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        elif self.plain:
            print(text, flush=True)

    def flush(self) -> None:
        """Put what was logged so far on disk (before the run directory is mirrored to a store)."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.flush()
        self.jsonl.flush()

    def close(self) -> None:
        """End of the run, or of a failed one: a deferred window no collective carried (the run stopped
        within the next step) is still written, with this rank's numbers (the other ranks may be gone,
        so no collective is attempted), and says so when there are other ranks."""
        closed, self._pending = self._pending, None
        if closed is not None and self.enabled:
            alone = self.reduce is no_reduce
            total, maxima = closed.window, [closed.peak_memory_bytes, closed.memory_bytes]
            note = None if alone else "this rank's numbers only: the run stopped before the ranks' sums met"
            self._write_window(closed, total, maxima, note)
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
