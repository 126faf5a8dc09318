"""The training loop: ``train(cfg, report=None) -> final metrics``.

Runs unchanged as one process, under ``torchrun`` (any number of processes and nodes) and inside a
Ray Train worker (the launcher passes ``report``; this module never imports Ray). One readable
function in the nanoGPT spirit: fetch batch -> forward (adversarial inside the loss) -> one backward
-> step -> log -> evaluate / checkpoint on their intervals. The helpers it uses live in sibling
modules: ``distributed`` (process group), ``engine`` (DeepSpeed, AdamW, schedule), ``checkpoint``
(atomic checkpoints, exact resume), ``evaluate`` (distributed full ranking), ``monitor``
(TensorBoard, progress, JSONL log), ``faults`` (test-only crash injection).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configs import RecGPTConfig, TrainingError, save_resolved
from trainer.checkpoint import CheckpointManager, find_resume_checkpoint, set_rng_state
from trainer.distributed import all_reduce_tensor, any_rank, setup_distributed, teardown_distributed
from trainer.engine import build_engine, deepspeed_config, global_grad_norm, param_grad_norm, tracks_grad_norm
from trainer.evaluate import evaluate, to_device
from trainer.faults import Faults
from trainer.monitor import Monitor, flops_per_token, memory_bytes, peak_flops, peak_memory_bytes

ReportFn = Callable[[dict[str, Any], "str | None"], None]


class NonFiniteLossError(TrainingError):
    """train.max_bad_steps consecutive micro-batches had a NaN/inf loss on some rank."""


@dataclass
class TrainState:
    """What a checkpoint must carry besides DeepSpeed's state to continue exactly."""

    step: int = 0
    epoch: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    best_metric: float | None = None
    """Best eval.metric of any evaluation (early stopping)."""
    best_checkpoint_metric: float | None = None
    """Best eval.metric among checkpoints (the ``best`` pointer)."""
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    """Metrics of the last evaluation."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def batch_stream(loader, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches, epoch after epoch, moved to ``device``.

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
            yield to_device(batch, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: RecGPTConfig, report: ReportFn | None = None) -> dict[str, Any]:
    """Train ``cfg``; returns (on every rank) the final metrics also written to ``<output_dir>/metrics.json``.

    ``report(metrics, checkpoint_dir)`` is called on every rank after each complete checkpoint.
    """
    from data_shards.manifest import load_manifest, read_items
    from modeling.data import build_loader, resolve_max_history
    from modeling.factory import build_model_and_tokenizer
    from modeling.lora import adalora_update, trainable_parameters
    from modeling.loss import LossComputer

    info = setup_distributed()
    tc = cfg.train
    out_dir = Path(tc.output_dir)
    faults = Faults.from_env(info.rank)
    ckpts = CheckpointManager(out_dir, info.rank, info.world_size, tc.keep_last, faults)
    resume_from = find_resume_checkpoint(tc.resume, out_dir)
    monitor = None
    try:
        # ---------------------------------------------------------------- model, data, engine
        manifest = load_manifest(cfg.data.shards)
        # The resolved config (saved with the run, every checkpoint and export) says the real history length.
        cfg.data.max_history = resolve_max_history(cfg, manifest, cfg.data.shards)
        items = read_items(cfg.data.shards, manifest)
        model, tokenizer = build_model_and_tokenizer(
            cfg, cfg.data.shards, ds_config=deepspeed_config(cfg, info.world_size)
        )
        train_loader = build_loader(
            cfg, "train", tokenizer, items, rank=info.rank, world_size=info.world_size
        )
        valid_loader = build_loader(
            cfg, "valid", tokenizer, items, rank=info.rank, world_size=info.world_size
        )
        n_trainable, n_params = trainable_parameters(model)
        total_steps = tc.max_steps or tc.epochs * max(1, len(train_loader) // tc.grad_accum)
        engine = build_engine(cfg, model, info.world_size, total_steps)
        engine.train()
        loss_fn = LossComputer(cfg)
        seed_everything(cfg.seed + info.rank)  # per-rank dropout streams (the weights are already identical)

        st, rng = TrainState(), None
        if resume_from is not None:
            saved, rng = ckpts.load(engine, resume_from, train_loader)
            st = TrainState.from_dict(saved)
        if info.is_main:
            save_resolved(cfg, out_dir)
        monitor = Monitor(cfg, out_dir, info.is_main, total_steps, st.step)
        if resume_from is not None:
            monitor.message(f"resumed from {resume_from} at step {st.step}")
            set_rng_state(rng)  # last: nothing may draw from the RNGs between here and the first step

        # ---------------------------------------------------------------- loop
        batches = batch_stream(train_loader, info.device)
        fpt = peak = None  # MFU terms, computed at the first log
        log_keys: list[str] = []
        window = None  # per-rank sums since the last log
        window_time = 0.0
        bad_in_a_row = 0
        grad_norm = None
        last_ckpt_step = st.step if resume_from is not None else -1
        stop = st.step >= total_steps
        while not stop:
            t_step = time.perf_counter()
            wait = 0.0
            micro = 0
            sums: dict[str, float] = {}
            samples = tokens = positions = 0
            while micro < tc.grad_accum:
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                loss, logs = loss_fn(engine, batch, st.step)
                if faults.nan_loss(st.step + 1):
                    loss = loss * float("nan")
                # Agreed across ranks, before backward: every rank skips the same micro-batch, so the
                # collectives inside backward/step stay matched and DeepSpeed's micro-step counter (hence
                # the accumulation boundary) is untouched. ZeRO-0 would otherwise apply NaN gradients.
                if any_rank(not bool(torch.isfinite(loss.detach())), info.device):
                    bad_in_a_row += 1
                    monitor.message(
                        f"step {st.step + 1}: non-finite loss, micro-batch skipped ({bad_in_a_row} in a row)"
                    )
                    if bad_in_a_row >= tc.max_bad_steps:
                        raise NonFiniteLossError(
                            f"{bad_in_a_row} consecutive non-finite losses at step {st.step + 1} "
                            f"(train.max_bad_steps={tc.max_bad_steps}); lower optim.lr, check the data, or "
                            "use bf16 instead of fp16. The last complete checkpoint is untouched."
                        )
                    continue
                bad_in_a_row = 0
                engine.backward(loss)
                boundary = micro == tc.grad_accum - 1
                if boundary and cfg.lora.method == "adalora" and cfg.lora.enabled:
                    adalora_update(engine, st.step)  # reads .grad: before step() zeroes it
                log_next = (st.step + 1) % tc.log_interval == 0 or st.step + 1 == total_steps
                if boundary and log_next and not tracks_grad_norm(cfg):
                    grad_norm = param_grad_norm(engine.module)  # fp32 ZeRO-0: before step() zeroes .grad
                engine.step()
                micro += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                samples += batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum())
                positions += batch["input_ids"].numel()
            st.step += 1
            st.epoch = train_loader.epoch
            step_time = time.perf_counter() - t_step
            if tracks_grad_norm(cfg):
                grad_norm = global_grad_norm(engine)
            # One small all-reduce per step keeps sample/token counts exact in every checkpoint.
            log_keys = log_keys or sorted(sums)
            local = [sums.get(k, 0.0) for k in log_keys] + [samples, tokens, positions, wait, step_time]
            window = local if window is None else [a + b for a, b in zip(window, local)]
            window_time += step_time
            counts = all_reduce_tensor(
                torch.tensor([samples, tokens], dtype=torch.float64, device=info.device)
            )
            st.consumed_samples += int(counts[0])
            st.consumed_tokens += int(counts[1])
            monitor.advance()

            # ------------------------------------------------------------ log
            if st.step % tc.log_interval == 0 or st.step == total_steps:
                n_steps = tc.log_interval if st.step % tc.log_interval == 0 else st.step % tc.log_interval
                total = all_reduce_tensor(
                    torch.tensor(window, dtype=torch.float64, device=info.device)
                ).tolist()
                mem = all_reduce_tensor(
                    torch.tensor(
                        [peak_memory_bytes(info.device), memory_bytes(info.device)],
                        dtype=torch.float64,
                        device=info.device,
                    ),
                    "max",
                )
                n_micro = n_steps * tc.grad_accum * info.world_size
                train_scalars = {k: total[i] / n_micro for i, k in enumerate(log_keys)}
                train_scalars["lr"] = engine.get_lr()[0]
                train_scalars["grad_norm"] = grad_norm  # of this step (clipping happens after measuring)
                g_samples, g_tokens, g_positions = total[len(log_keys) : len(log_keys) + 3]
                r_samples, r_tokens = window[len(log_keys)], window[len(log_keys) + 1]
                perf = {
                    "samples_per_s": g_samples / window_time * 1.0,
                    "tokens_per_s": g_tokens / window_time,
                    "samples_per_s_rank0": r_samples / window_time,
                    "tokens_per_s_rank0": r_tokens / window_time,
                    "step_time_s": window_time / n_steps,
                    "data_wait_s": window[-2] / n_steps,
                    "peak_memory_gb": float(mem[0]) / 2**30,
                    "peak_memory_gb_rank0": peak_memory_bytes(info.device) / 2**30,
                    "memory_gb": float(mem[1]) / 2**30,  # held now (after the step), max over ranks
                }
                if peak is None:
                    peak = peak_flops(info.device) or 0.0
                    fpt = flops_per_token(engine.module, batch["input_ids"].shape[1])
                if peak:
                    perf["mfu"] = fpt * g_positions / window_time / (peak * info.world_size)
                monitor.train_step(st.step, train_scalars, perf)
                window, window_time = None, 0.0

            # ------------------------------------------------------------ evaluate
            last = st.step >= total_steps
            evaluated = False
            if (tc.eval_interval and st.step % tc.eval_interval == 0) or last:
                st.metrics = evaluate(engine, valid_loader, cfg, info.device)
                evaluated = True
                monitor.eval(st.step, st.metrics)
                value = st.metrics[cfg.eval.metric]
                if st.best_metric is None or value > st.best_metric:
                    st.best_metric, st.evals_without_improvement = value, 0
                else:
                    st.evals_without_improvement += 1
                if tc.early_stopping_patience and st.evals_without_improvement >= tc.early_stopping_patience:
                    monitor.message(
                        f"early stopping at step {st.step}: {cfg.eval.metric} did not improve for "
                        f"{st.evals_without_improvement} evaluations (best {st.best_metric:.4f})"
                    )
                    last = True
            stop = last

            # ------------------------------------------------------------ checkpoint
            if (tc.checkpoint_interval and st.step % tc.checkpoint_interval == 0) or last:
                value = st.metrics.get(cfg.eval.metric) if evaluated else None
                is_best = value is not None and (
                    st.best_checkpoint_metric is None or value > st.best_checkpoint_metric
                )
                if is_best:
                    st.best_checkpoint_metric = value
                    st.best_checkpoint = f"step_{st.step:08d}"
                ckpt_metrics = {**(st.metrics if evaluated else {}), "step": st.step, "epoch": st.epoch}
                path = ckpts.save(
                    engine, st.step, train_loader, asdict(st), cfg, ckpt_metrics, tokenizer, is_best
                )
                last_ckpt_step = st.step
                if report is not None:
                    report(ckpt_metrics, str(path))
            faults.maybe_kill("kill", st.step)

        # ---------------------------------------------------------------- the end
        if last_ckpt_step != st.step:
            raise RuntimeError(f"internal: finished at step {st.step} without a final checkpoint")
        final = {
            **st.metrics,
            "step": st.step,
            "epoch": st.epoch,
            "consumed_samples": st.consumed_samples,
            "consumed_tokens": st.consumed_tokens,
            "best_checkpoint": st.best_checkpoint,
            f"best_{cfg.eval.metric}": st.best_checkpoint_metric,
            "trainable_parameters": n_trainable,
            "parameters": n_params,
        }
        if info.is_main:
            tmp = out_dir / ".metrics.json.tmp"
            tmp.write_text(json.dumps(final, indent=2, sort_keys=True))
            tmp.replace(out_dir / "metrics.json")
            monitor.message("final: " + json.dumps(final, sort_keys=True))
        return final
    finally:
        if monitor is not None:
            monitor.close()
        teardown_distributed(info)
