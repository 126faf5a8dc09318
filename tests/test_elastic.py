"""Resuming on another world size (elastic training): the reader re-plans the rest of the epoch so
every training record is served exactly once, and (slow) real 2 -> 1 and 1 -> 2 process resumes under
ZeRO-2 and ZeRO-3 through DeepSpeed's universal checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter

import pytest

from configs import DataError
from data_shards.reader import ShardLoader
from tests.conftest import (
    BIN,
    REPO,
    RUN_STEPS,
    TINY,
    losses,
    recgpt_train,
    subprocess_env,
    torchrun_two_hosts,
    train_log,
)


def uids(batch) -> list[tuple[int, int]]:
    """Identity of each training record (a window) of a raw batch: (user index, time of its last item)."""
    return [(r["uid"], r["timestamps"][-1], r["items"][-1]) for r in batch if not r.get("pad")]


def loaders(shards, world_size: int, batch_size: int, epoch: int = 0) -> list[ShardLoader]:
    return [
        ShardLoader(shards, "train", rank=r, world_size=world_size, batch_size=batch_size, seed=7,
                    num_workers=0, epoch=epoch)
        for r in range(world_size)
    ]  # fmt: skip


def take(loader: ShardLoader, n: int) -> list:
    out, it = [], iter(loader)
    for _ in range(n):
        out.append(next(it))
    return out


def epoch_records(shards, world_size: int, batch_size: int) -> Counter:
    seen: Counter = Counter()
    for loader in loaders(shards, world_size, batch_size):
        for batch in loader:
            seen.update(uids(batch))
    return seen


@pytest.mark.parametrize(
    "before, after",
    [((2, 16), (1, 32)), ((1, 32), (2, 16)), ((2, 16), (4, 8))],
)
def test_rest_of_the_epoch_is_served_exactly_once_on_another_world_size(sample_shards, before, after):
    (w0, b0), (w1, b1) = before, after
    # Uninterrupted: the records of each step (one batch of every rank; w0 x b0 == w1 x b1 here).
    steps = [Counter() for _ in range(len(loaders(sample_shards, w0, b0)[0]))]
    for loader in loaders(sample_shards, w0, b0):
        for i, batch in enumerate(loader):
            steps[i].update(uids(batch))
    full = sum(steps, Counter())
    assert set(full.values()) == {1}  # each record once in an uninterrupted epoch
    first = loaders(sample_shards, w0, b0)
    served: Counter = Counter()
    for loader in first:
        for batch in take(loader, 5):
            served.update(uids(batch))
    state = first[0].state_dict()
    second = loaders(sample_shards, w1, b1)
    after_change = [Counter() for _ in range(len(steps) - 5)]
    for loader in second:
        loader.load_state_dict(state, replan=True)
        assert len(loader) == (len(first[0]) - 5) * w0 * b0 // (w1 * b1)
        for i, batch in enumerate(loader):
            served.update(uids(batch))
            after_change[i].update(uids(batch))
    assert served == full  # every record of the epoch once, none of the dropped tail
    assert after_change == steps[5:]  # and each step gets the records it would have got
    assert all(loader.epoch == 1 and loader.state_dict()["segments"] == [] for loader in second)


def test_two_changes_in_one_epoch_and_a_restore_at_the_new_size(sample_shards):
    full = epoch_records(sample_shards, 2, 16)
    served: Counter = Counter()
    a = loaders(sample_shards, 2, 16)
    for loader in a:
        for batch in take(loader, 3):
            served.update(uids(batch))
    b = loaders(sample_shards, 1, 32)
    b[0].load_state_dict(a[1].state_dict(), replan=True)  # any rank's state: they are in lockstep
    for batch in take(b[0], 4):
        served.update(uids(batch))
    state = b[0].state_dict()
    assert state["segments"] == [[2, 16, 3]] and state["batch"] == 4
    # a restore at the same size rebuilds the same rest (no replan needed)
    again = loaders(sample_shards, 1, 32)[0]
    again.load_state_dict(state)
    restored, continued = take(again, 2), take(b[0], 2)
    assert [uids(x) for x in restored] == [uids(x) for x in continued]
    for batch in continued:
        served.update(uids(batch))
    c = loaders(sample_shards, 2, 16)
    for loader in c:
        loader.load_state_dict(b[0].state_dict(), replan=True)
        for batch in loader:
            served.update(uids(batch))
    assert served == full


def test_a_rest_that_does_not_fill_whole_batches_is_refused_or_dropped_with_a_warning(sample_shards, caplog):
    a = loaders(sample_shards, 1, 32)[0]
    take(a, 1)
    # 32 x (n - 1) records left; 3 x 32 batches leave a remainder unless (n - 1) is a multiple of 3
    n = len(a)
    b = loaders(sample_shards, 3, 32)[0]
    if (n - 1) % 3 == 0:
        take(a, 1)
    with pytest.raises(
        DataError, match=r"^reader state: the \d+ records left of epoch 0 do not fill batches of 3 x 32"
    ):
        b.load_state_dict(a.state_dict(), replan=True)
    # a global batch changed on purpose (train.keep_global_batch=false): the few left over are named
    rest = (len(a) - a.state_dict()["batch"]) * 32
    b.load_state_dict(a.state_dict(), replan=True, drop_remainder=True)
    assert len(b) == rest // 96
    assert f"reader: {rest % 96} records left of epoch 0 do not fill a batch of 3 x 32" in caplog.text
    with pytest.raises(DataError, match="rank was 0"):
        loaders(sample_shards, 2, 16)[1].load_state_dict(loaders(sample_shards, 1, 16)[0].state_dict())


# ---------------------------------------------------------------- real resumes on another world size

# Without dropout the resumed run sees the same records per step and the same weights and optimizer
# state, so its losses equal the uninterrupted run's up to the order of floating-point reductions.
ELASTIC_STEPS = [
    "train.max_steps=8", "train.eval_interval=4", "train.checkpoint_interval=4", "train.log_interval=1",
    "model.dropout=0", "lora.dropout=0",
]  # fmt: skip
ZERO3_LORA = ["zero.stage=3", "lora.enabled=true", "optim.lr=0.01"]


def launch(shards, out, overrides: list[str], nproc: int, torchrun: bool = False):
    """``recgpt train`` on ``nproc`` processes (torchrun for > 1, or when asked)."""
    if nproc == 1 and not torchrun:
        return recgpt_train(shards, out, overrides, nproc=1)
    args = ["train", "--config", str(TINY), f"data.shards={shards}", f"train.output_dir={out}", *overrides]
    cmd = [str(BIN / "torchrun"), "--standalone", "--no-python", f"--nproc_per_node={nproc}", "recgpt", *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def served(state: dict) -> tuple[int, int]:
    """(epoch, records of it served) of a saved reader state, across re-planned segments."""
    done = sum(w * b * n for w, b, n in state.get("segments", []))
    return state["epoch"], done + state["world_size"] * state["batch_size"] * state["batch"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "before, after, extra",
    [
        (2, 1, ["zero.stage=1"]),
        (2, 1, ["zero.stage=2"]),
        (1, 2, ["zero.stage=2"]),
        (2, 1, ZERO3_LORA),
        (1, 2, ZERO3_LORA),
    ],
    ids=["zero1-full-2to1", "zero2-full-2to1", "zero2-full-1to2", "zero3-lora-2to1", "zero3-lora-1to2"],
)
def test_resume_on_another_world_size_continues_the_run(sample_shards, tmp_path, before, after, extra):
    base = tmp_path / "base"
    p = launch(sample_shards, base, [*ELASTIC_STEPS, *extra], before)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "resized"
    ckpt = base / "checkpoints" / "step_00000004"
    p = launch(sample_shards, out, [*ELASTIC_STEPS, *extra, f"train.resume={ckpt}"], after, torchrun=True)
    assert p.returncode == 0, p.stderr[-3000:]
    text = p.stdout + p.stderr
    g = 32 * before
    mb, acc = (32, 2) if after < before else (16, 1)
    assert (
        f"resume: world size {before} -> {after}: global batch {g} kept as {after} ranks x micro_batch_size {mb} "
        f"x grad_accum {acc}" in text
    )
    assert re.search(r"resume: converted step_00000004 to DeepSpeed's universal checkpoint in \d+\.\ds", text)
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list((base / "checkpoints").glob(".tmp-*"))
    got, want = losses(train_log(out)), losses(train_log(base))
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():  # the curve continues: the same records, weights and moments
        assert loss == pytest.approx(want[step], abs=2e-4), step
    got_m = json.loads((out / "metrics.json").read_text())
    want_m = json.loads((base / "metrics.json").read_text())
    assert got_m["consumed_samples"] == want_m["consumed_samples"] == 8 * g
    assert got_m["ndcg@10"] == pytest.approx(want_m["ndcg@10"], abs=2e-4)
    # Every record of the epoch so far once: the cursors have served the same records.
    final = "checkpoints/step_00000008/reader/rank_00000.json"
    assert served(json.loads((out / final).read_text())) == served(json.loads((base / final).read_text()))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_hosts_give_the_losses_of_two_local_processes(zero0_run, sample_shards, tmp_path):
    """``torchrun --nnodes 2`` (c10d rendezvous on loopback, one process per "host", one shared run
    directory) trains exactly like ``--nproc_per_node 2``."""
    out = tmp_path / "run"
    code, stdout, stderr = torchrun_two_hosts(sample_shards, out, [*RUN_STEPS, "zero.stage=0"], tmp_path)
    assert code == 0, stderr[-3000:]
    got, want = losses(train_log(out)), losses(zero0_run.log)
    assert got.keys() == want.keys() and len(got) == 30
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
