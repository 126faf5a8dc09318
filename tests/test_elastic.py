"""Resuming on another world size (elastic training): the reader re-plans the rest of the epoch so
every training record is served exactly once, and (slow) real 2 -> 1 and 1 -> 2 process resumes under
ZeRO-2 and ZeRO-3 through DeepSpeed's universal checkpoint."""

from __future__ import annotations

from collections import Counter

import pytest

from configs import DataError
from data_shards.reader import ShardLoader


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


def test_a_rest_that_does_not_fill_whole_batches_is_refused(sample_shards):
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
    with pytest.raises(DataError, match="rank was 0"):
        loaders(sample_shards, 2, 16)[1].load_state_dict(loaders(sample_shards, 1, 16)[0].state_dict())
