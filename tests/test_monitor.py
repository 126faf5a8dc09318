"""The monitor's statistics window without a process group: steps summed by name, reduced with a fake
all-reduce, and the logged scalars (return value, train_log.jsonl, the plain log line)."""

from __future__ import annotations

import json
import resource
import time

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


def _two_ranks(sums: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
    """A fake collective over two ranks holding the same numbers."""
    return [2 * v for v in sums], list(maxima)


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


def test_a_non_finite_micro_batch_counts_its_work_not_its_loss():
    s = StepStats()
    s.add_micro_batch({"loss": 2.0}, _batch(4, 10, 6))
    s.add_micro_batch({"loss": float("nan")}, _batch(4, 10, 6), finite=False)
    assert s.losses == {"loss": 2.0} and (s.micro_batches, s.non_finite) == (1, 1)
    assert (s.samples, s.tokens, s.positions) == (8, 48, 80)  # read and computed: throughput counts it
    s.step_time_s = 1.0
    train, _ = window_scalars(s, s, steps=1)
    assert train == {"loss": 2.0, "non_finite_micro_batches": 1.0}
    bad = StepStats(non_finite=2, samples=8, step_time_s=1.0)  # a window with no finite loss at all
    train, _ = window_scalars(bad, bad, steps=1)
    assert train == {"loss": None, "non_finite_micro_batches": 2.0}  # null in the JSONL, not NaN


def test_reduced_matches_names_not_positions():
    a = StepStats(losses={"loss": 1.0, "adv_loss": 5.0}, samples=3, step_time_s=1.5)
    b = StepStats(losses={"adv_loss": 5.0, "loss": 1.0}, samples=3, step_time_s=1.5)  # other insertion order
    assert a.reduced(_two_ranks) == b.reduced(_two_ranks)
    total, maxima = a.reduced(_two_ranks)
    assert maxima == []
    assert total.losses == {"adv_loss": 10.0, "loss": 2.0}
    assert total.samples == 6 and isinstance(total.samples, int) and total.step_time_s == 3.0
    assert a.reduced(no_reduce) == (a, [])  # one process
    assert a.reduced(no_reduce, [7.0, 2.0])[1] == [7.0, 2.0]


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

    def reduce(sums, maxima):
        calls.append((len(sums), len(maxima)))
        return _two_ranks(sums, maxima)

    monitor = Monitor(cfg, tmp_path, enabled=False, total_steps=10, start_step=0, reduce=reduce)
    monitor.add_step(_step([1.0], wait=0.0, seconds=1.0))
    train, _ = monitor.log_train(1, lr=1.0, grad_norm=None, peak_memory_bytes=0, memory_bytes=0)
    monitor.message("hello")
    monitor.close()
    # The same collective as rank 0: one for the window's sums and the memory maxima together.
    assert calls == [(2 + 5 + 2, 2)]  # sums: 2 losses, 5 counts, 2 times; maxima: peak and held memory
    assert train["loss"] == 1.0
    assert not (tmp_path / "train_log.jsonl").exists() and capsys.readouterr().out == ""


def test_deferred_log_rides_on_the_next_step_collective(tmp_path, capsys):
    """A deferred window is reduced inside the next step_reduce (one collective for both), written
    then with the time and readings of the step that closed it; the numbers equal an immediate log."""
    cfg = load_config(None, ["logging.tensorboard=false", "logging.progress=plain"])
    calls = []

    def reduce(sums, maxima):
        calls.append((len(sums), len(maxima)))
        return _two_ranks(sums, maxima)

    now = Monitor(cfg, tmp_path / "now", enabled=True, total_steps=10, start_step=0, reduce=_two_ranks)
    later = Monitor(cfg, tmp_path / "later", enabled=True, total_steps=10, start_step=0, reduce=reduce)
    readings = dict(lr=1e-3, grad_norm=0.5, peak_memory_bytes=3 * GB, memory_bytes=GB)
    for m in (now, later):
        m.add_step(_step([1.0, 3.0], wait=0.5, seconds=2.0))
    expected = now.log_train(1, **readings)
    t_closed = time.time()
    assert later.log_train(1, **readings, defer=True) is None
    assert calls == [] and (tmp_path / "later" / "train_log.jsonl").read_text() == ""
    later.add_step(_step([5.0], wait=0.0, seconds=1.0))  # the next step's numbers start a new window
    wait = later.step_reduce([1.0, 0.0, 4.0])  # started (here: run at once); written when waited for
    assert calls == [(3 + 2 + 5 + 2, 2)]  # the step's sums, then the window's, and the maxima
    assert (tmp_path / "later" / "train_log.jsonl").read_text() == ""
    assert wait() == [2.0, 0.0, 8.0]
    (record,) = [json.loads(ln) for ln in (tmp_path / "later" / "train_log.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["time"] <= t_closed + 1e-3
    assert {k: record[k] for k in (*expected[0], *expected[1])} == {**expected[0], **expected[1]}
    assert later.step_reduce([1.0])() == [2.0] and calls[-1] == (1, 0)  # nothing pending: sums only
    assert later.window_steps == 1 and later.window.losses == {"loss": 5.0, "clean_loss": 2.5}
    now.close()
    later.close()


def test_a_deferred_window_is_reduced_before_the_next_one_closes(tmp_path):
    # Two logs with no micro-batch between them (never in the loop, but the window must not be lost).
    cfg = load_config(None, ["logging.tensorboard=false", "logging.progress=none"])
    monitor = Monitor(cfg, tmp_path, enabled=True, total_steps=10, start_step=0, reduce=_two_ranks)
    monitor.add_step(_step([1.0], wait=0.0, seconds=1.0))
    monitor.log_train(1, lr=1.0, grad_norm=None, peak_memory_bytes=0, memory_bytes=0, defer=True)
    monitor.add_step(_step([3.0], wait=0.0, seconds=1.0))
    train, _ = monitor.log_train(2, lr=1.0, grad_norm=None, peak_memory_bytes=0, memory_bytes=0)
    monitor.close()
    records = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 3.0)] and train["loss"] == 3.0


@pytest.mark.parametrize("alone", [True, False], ids=["one-process", "two-ranks"])
def test_a_window_still_deferred_at_close_is_written_with_this_ranks_numbers(tmp_path, alone):
    """A run that fails within the step after a deferred log: no collective at close (other ranks may
    be gone); the record is this rank's window, marked so when there are other ranks."""
    cfg = load_config(None, ["logging.tensorboard=false", "logging.progress=none"])
    reduce = no_reduce if alone else _two_ranks
    monitor = Monitor(cfg, tmp_path, enabled=True, total_steps=10, start_step=0, reduce=reduce)
    monitor.add_step(_step([2.0], wait=0.0, seconds=1.0))
    monitor.log_train(1, lr=1.0, grad_norm=None, peak_memory_bytes=0, memory_bytes=0, defer=True)
    monitor.close()
    (record,) = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["loss"] == 2.0 and record["samples_per_s"] == 4.0
    assert ("note" in record) is not alone


def test_a_window_in_a_step_collective_never_waited_for_is_written_at_close(tmp_path):
    """The step collective started, the run failed before waiting for it (in the forward): the window
    stays pending and close() writes it with this rank's numbers."""
    cfg = load_config(None, ["logging.tensorboard=false", "logging.progress=none"])
    monitor = Monitor(cfg, tmp_path, enabled=True, total_steps=10, start_step=0, reduce=_two_ranks)
    monitor.add_step(_step([2.0], wait=0.0, seconds=1.0))
    monitor.log_train(1, lr=1.0, grad_norm=None, peak_memory_bytes=0, memory_bytes=0, defer=True)
    monitor.step_reduce([1.0])  # never waited for
    monitor.close()
    (record,) = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["loss"] == 2.0 and "note" in record


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_held_memory_leaves_out_free_heap_bytes_without_trimming():
    """On CPU the held memory is the RSS less what malloc keeps free (the holes freed tensors leave), read
    without malloc_trim: the reading hands no page back, so the next step has nothing to fault in."""
    import trainer.monitor as monitor

    cpu = torch.device("cpu")
    blocks = [torch.ones(16 * 1024) for _ in range(1024)]  # 64 KiB each, on malloc's heap: 64 MiB
    before, rss_before = monitor.memory_bytes(cpu), _rss()
    del blocks[::2]  # 32 MiB of holes between live blocks
    after, rss_after = monitor.memory_bytes(cpu), _rss()
    assert rss_after - rss_before == pytest.approx(0, abs=2 * 2**20)  # nothing handed back
    if monitor._mallinfo2() is not None:  # glibc >= 2.33: the holes do not count
        assert after - before == pytest.approx(-32 * 2**20, rel=0.2)
    else:
        assert after == rss_after


def test_held_memory_is_read_at_most_once_a_minute_and_fresh_at_the_last_step(monkeypatch):
    """A CPU reading walks malloc's free lists (3.6 ms in the text benchmark's process): the loop's
    HeldMemory reads at most once a minute and when asked for a fresh reading (the last step); the logs
    in between repeat the last reading."""
    import trainer.monitor as monitor

    reads, now = [], [1000.0]
    monkeypatch.setattr(monitor, "memory_bytes", lambda device: reads.append(now[0]) or len(reads))
    held = monitor.HeldMemory(torch.device("cpu"), min_interval_s=60.0, clock=lambda: now[0])
    assert held() == 1
    for t in (1001.0, 1030.0, 1059.0):  # logs within the minute: the first reading again
        now[0] = t
        assert held() == 1
    now[0] = 1060.0
    assert held() == 2
    now[0] = 1061.0
    assert held(fresh=True) == 3
    assert reads == [1000.0, 1060.0, 1061.0]


_STEPS_SCRIPT = """
import ctypes, resource, sys
from trainer.monitor import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # a step's temporaries: allocated, written, freed (1 MiB each)
    blocks = [libc.malloc(2**20) for _ in range(16)]
    for b in blocks:
        libc.memset(b, 1, 2**20)
    for b in blocks:
        libc.free(b)
step(); step()  # glibc's dynamic thresholds settle
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_each_step_faulting_its_memory_in_again():
    """With glibc's defaults, a step's 16 MiB of 1 MiB temporaries is handed back to the OS when freed
    (the heap's free top exceeds the dynamic trim threshold) and faulted in again by the next step: ~4K
    minor page faults a step. keep_freed_memory (train.keep_freed_memory, on by default) keeps it for
    reuse. Each case runs in a process of its own: the setting is process-wide. malloc itself, not
    tensors: whether torch's own pattern trims depends on its threads (with OMP_NUM_THREADS=1 this
    pattern of tensors did not; the benchmark's steps did, docs/BENCHMARKS.md)."""
    import subprocess
    import sys
    from pathlib import Path

    import trainer.monitor as monitor

    if monitor._mallinfo2() is None:
        pytest.skip("not glibc >= 2.33")
    repo = Path(__file__).resolve().parents[1]

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _STEPS_SCRIPT, mode],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default > 10 * 2000  # 10 steps, most of 4,096 pages each
    assert kept < 500
