"""The monitor's statistics window without a process group: steps summed by name, reduced with a fake
all-reduce, and the logged scalars (return value, train_log.jsonl, the plain log line)."""

from __future__ import annotations

import json

import pytest
import torch

from configs import load_config
from trainer.monitor import Monitor, StepStats, no_reduce, window_scalars

GB = 2**30


def _batch(rows: int, length: int, real: int) -> dict[str, torch.Tensor]:
    """``rows`` sequences of ``length`` positions, ``real`` of them non-padding in every row."""
    mask = torch.zeros(rows, length, dtype=torch.long)
    mask[:, :real] = 1
    return {"input_ids": torch.ones(rows, length, dtype=torch.long), "attention_mask": mask}


def _two_ranks(values: list[float], op: str = "sum") -> list[float]:
    """A fake all-reduce over two ranks holding the same numbers."""
    return [2 * v for v in values] if op == "sum" else list(values)


def _step(losses: list[float], wait: float, seconds: float) -> StepStats:
    """One optimizer step of len(losses) micro-batches of 4 x 10 positions, 6 real tokens a row."""
    s = StepStats()
    for v in losses:
        s.add_micro_batch({"loss": v, "clean_loss": v / 2}, _batch(4, 10, 6))
    s.data_wait_s, s.step_time_s = wait, seconds
    return s


def test_step_stats_count_micro_batches_by_name():
    s = _step([1.0, 3.0], wait=0.5, seconds=2.0)
    assert s.losses == {"loss": 4.0, "clean_loss": 2.0}
    assert (s.micro_batches, s.samples, s.tokens, s.positions) == (2, 8, 48, 80)
    s.add(_step([2.0, 2.0], wait=0.25, seconds=1.0))
    assert s.losses == {"loss": 8.0, "clean_loss": 4.0}
    assert (s.micro_batches, s.samples, s.tokens, s.positions) == (4, 16, 96, 160)
    assert (s.data_wait_s, s.step_time_s) == (0.75, 3.0)


def test_reduced_matches_names_not_positions():
    a = StepStats(losses={"loss": 1.0, "adv_loss": 5.0}, samples=3, step_time_s=1.5)
    b = StepStats(losses={"adv_loss": 5.0, "loss": 1.0}, samples=3, step_time_s=1.5)  # other insertion order
    assert a.reduced(_two_ranks) == b.reduced(_two_ranks)
    total = a.reduced(_two_ranks)
    assert total.losses == {"adv_loss": 10.0, "loss": 2.0}
    assert total.samples == 6 and isinstance(total.samples, int) and total.step_time_s == 3.0
    assert a.reduced(no_reduce) == a  # one process


def test_window_of_two_steps_is_reduced_and_logged(tmp_path, capsys):
    cfg = load_config(None, ["logging.tensorboard=false", "logging.progress=plain"])
    monitor = Monitor(cfg, tmp_path, enabled=True, total_steps=10, start_step=0, reduce=_two_ranks)
    monitor.add_step(_step([1.0, 3.0], wait=0.5, seconds=2.0))
    monitor.add_step(_step([2.0, 2.0], wait=0.25, seconds=1.0))
    train, perf = monitor.log_train(
        2, lr=1e-3, grad_norm=0.5, peak_memory_bytes=3 * GB, memory_bytes=GB,
        cluster_peak_flops=1e6, flops_per_token=10.0,
    )  # fmt: skip
    # 2 steps x 2 micro-batches x 2 ranks = 8 micro-batches; 3 s of wall time on this rank.
    assert train == {"clean_loss": 1.0, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5}
    assert perf == pytest.approx(
        {
            "samples_per_s": 32 / 3,
            "tokens_per_s": 192 / 3,
            "samples_per_s_rank0": 16 / 3,
            "tokens_per_s_rank0": 96 / 3,
            "step_time_s": 1.5,
            "data_wait_s": 0.375,
            "peak_memory_gb": 3.0,
            "peak_memory_gb_rank0": 3.0,
            "memory_gb": 1.0,
            "mfu": 10.0 * 320 / 3 / 1e6,
        }
    )
    monitor.close()
    (record,) = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert record["kind"] == "train" and record["step"] == 2
    assert {k: record[k] for k in (*train, *perf)} == {**train, **perf}
    out = capsys.readouterr().out
    assert (
        "step 2/10 | loss 2.0000 | lr 1.00e-03 | 11 samples/s | 64 tokens/s | step 1500 ms (data 375 ms)"
        in out
    )
    assert "MFU" in out
    # The window starts again after a log.
    assert monitor.window == StepStats() and monitor.window_steps == 0


def test_window_after_a_short_first_window_counts_its_own_steps():
    # A resumed run's first window can be shorter than log_interval: per-step means use its real length.
    local = StepStats(losses={"loss": 6.0}, micro_batches=3, samples=3, data_wait_s=0.3, step_time_s=3.0)
    train, perf = window_scalars(local, local, steps=3)
    assert train == {"loss": 2.0} and perf["step_time_s"] == 1.0 and perf["data_wait_s"] == pytest.approx(0.1)
    assert "mfu" not in perf  # peak FLOP/s unknown (CPU)


def test_other_ranks_reduce_but_write_nothing(tmp_path, capsys):
    cfg = load_config(None, ["logging.tensorboard=false", "logging.progress=plain"])
    calls = []

    def reduce(values, op="sum"):
        calls.append(op)
        return _two_ranks(values, op)

    monitor = Monitor(cfg, tmp_path, enabled=False, total_steps=10, start_step=0, reduce=reduce)
    monitor.add_step(_step([1.0], wait=0.0, seconds=1.0))
    train, _ = monitor.log_train(1, lr=1.0, grad_norm=None, peak_memory_bytes=0, memory_bytes=0)
    monitor.message("hello")
    monitor.close()
    assert calls == ["sum", "max"]  # the same collectives as rank 0, in the same order
    assert train["loss"] == 1.0
    assert not (tmp_path / "train_log.jsonl").exists() and capsys.readouterr().out == ""
