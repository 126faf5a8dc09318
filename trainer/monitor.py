"""Training telemetry on rank 0: TensorBoard scalars, a progress bar or plain log lines, a JSONL log.

Other ranks get a :class:`Monitor` whose methods do nothing, so the loop never branches on rank.
``<output_dir>/train_log.jsonl`` holds one JSON object per logged step (and per evaluation): the
machine-readable record tests and scripts use instead of parsing TensorBoard.
"""

from __future__ import annotations

import json
import resource
import sys
import time
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
    """Memory this process holds now: CUDA allocated bytes on GPU, resident set size on CPU (after
    handing freed heap pages back to the OS, so RSS counts live memory rather than allocator slack)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    _malloc_trim()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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


class Monitor:
    """Rank-0 sink for scalars; ``enabled=False`` makes every call a no-op."""

    def __init__(self, cfg, output_dir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.plain = False
        self.total_steps = total_steps
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "train_log.jsonl", "a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint we resume from.
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step or None)
        mode = cfg.logging.progress
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "plain"
        if mode == "tqdm":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )
        self.plain = mode == "plain"

    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def _record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()

    def train_step(self, step: int, train: dict[str, float], perf: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._scalars("train", train, step)
        self._scalars("perf", perf, step)
        self._record("train", step, {**train, **perf})
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{train['loss']:.4f}", samples_s=f"{perf['samples_per_s']:.0f}", refresh=False
            )
        elif self.plain:
            print(
                f"step {step}/{self.total_steps} | loss {train['loss']:.4f} | lr {train['lr']:.2e} | "
                f"{perf['samples_per_s']:.0f} samples/s | {perf['tokens_per_s']:.0f} tokens/s | "
                f"step {perf['step_time_s'] * 1000:.0f} ms (data {perf['data_wait_s'] * 1000:.0f} ms)"
                + (f" | MFU {perf['mfu']:.1%}" if "mfu" in perf else ""),
                flush=True,
            )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

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

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        elif self.plain:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
