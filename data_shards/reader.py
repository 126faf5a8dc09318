"""``ShardLoader``: a deterministic, exactly resumable stream of batches from a shard directory.

The plan of an epoch is computed from the manifest alone, identically in every rank and worker (no
``split_by_node`` guesswork, PITFALLS "Data streaming"):

1. the global record sequence G: shards in an order shuffled by (seed, epoch), each shard's records in
   a permutation drawn from (seed, epoch, shard) (eval splits keep the written order);
2. ``nb`` batches per rank: ``N // (world_size * batch_size)`` with ``drop_last`` (train; the remainder,
   a different tail of G every epoch, is dropped) or ``ceil(N / (world_size * batch_size))`` otherwise
   (eval; the free slots hold ``"pad": True`` copies of real records, so every record is yielded exactly
   once and every rank has the same count);
3. rank r takes the contiguous range ``G[r*nb*B : (r+1)*nb*B]`` (ranks read disjoint shards, mostly),
   batch i of the rank is the i-th run of B records of that range;
4. DataLoader worker w yields the rank's batches w, w+K, w+2K, … — exactly the order in which the
   DataLoader collects them — so the batch sequence does not depend on ``num_workers``.

Each worker reads (through the storage layer, streaming, or webdataset's ``gopen`` for ``pipe:`` URLs;
webdataset's tar iterator either way) only the
shards holding its batches and JSON-decodes only the members holding them. A shard is hashed while it
streams and checked against the manifest before any of its records is used, so a corrupt or truncated
shard never yields data: it raises :class:`CorruptShardError` naming it, or, within
``corrupt_tolerance``, is skipped (logged) and its records are replaced by ``"pad": True`` copies of a
real record — batch counts never change.

Resume: batches are counted in the main process as the trainer receives them (not as workers prefetch
them); a restored loader computes the plan and starts at the saved batch, reading at most the one shard
that the saved position is inside of before yielding.

Scale (issue 15, docs/BENCHMARKS.md "Reader at scale"): nothing is planned per record ahead of use. The
plan is O(shards) numbers (shard order and offsets) and a few shard permutations; a batch's slots are
computed when it is due, and when a shard is first needed :meth:`EpochPlan.uses` tells, in O(records of
that shard), which of its records this worker needs and when it is done with the shard. So the reader's
memory is a few decoded shards whatever the epoch's length, a restore costs one shard's read wherever
the position is, and the state is a dozen numbers (plus three per plan change).

Resume on another plan (world size or batch size changed mid-epoch, elastic training): the records
that the saved plan had not yet served form the rest of the epoch, in the order the saved plan would
have served them step by step (its batch b of rank 0, of rank 1, …, then batch b + 1, …), and the
new plan serves that sequence step-major: its i-th batch of rank r is the run of B records starting at
``(i * world_size + r) * B``. With the global batch kept (``trainer.resume.batch_for_world_size``)
each optimizer step then gets the very records it would have got without the change — split over
other ranks or into other micro-batches. Each change is a *segment* ``[world_size, batch_size,
batches served]`` in the state, applied in turn, so a second change (or a restore at the new size)
rebuilds the same sequence; the next epoch starts afresh with the plan above. Every record of the
epoch is served exactly once across the change, provided the rest fills whole batches of the new plan
(:meth:`ShardLoader.load_state_dict` refuses otherwise).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch.utils.data
from webdataset.tariterators import tar_file_iterator

from configs import CorruptShardError, DataError, one_line
from data_shards.manifest import MEMBER_EXT, HashingReader, load_manifest, open_stream, resolve
from data_shards.records import Record

log = logging.getLogger(__name__)

STATE_KEYS = ("fingerprint", "split", "rank", "world_size", "batch_size", "seed", "epoch", "batch")


PERM_CACHE = 16
"""Shard permutations an :class:`EpochPlan` keeps (LRU): a batch touches one or two shards of the
rank-contiguous plan, or one per rank of an earlier plan after a world-size change, so 16 avoids
recomputing them while keeping the plan's memory O(shard size), not O(epoch)."""


class RestOfEpoch:
    """The positions in G that earlier plans of the epoch left to serve, in serving order (module
    docstring: resume on another plan), as arithmetic: O(1) memory whatever the epoch's size.

    The first change leaves the rank-contiguous plan ``world_size`` x ``batch_size`` after ``served``
    batches per rank; its rest is ``j -> position`` of batch ``b``, rank ``r``, slot ``k`` of that plan
    with ``j = (b * world_size + r) * batch_size + k - offset`` (step-major). Every later change keeps
    a slice of whole steps of the rest before it, so any chain of changes is ``offset`` and ``length``
    over the first one. Only drop_last (train) plans are re-planned, so no position of it is a pad.
    """

    def __init__(self, total: int, world_size: int, batch_size: int, served: int) -> None:
        self.world_size, self.batch_size = world_size, batch_size
        self.num_batches = total // (world_size * batch_size)  # per rank, the tail dropped
        self.offset = served * world_size * batch_size
        self.length = max((self.num_batches - served) * world_size * batch_size, 0)

    def after(self, world_size: int, batch_size: int, served: int) -> RestOfEpoch:
        """The rest once a plan ``world_size`` x ``batch_size`` over this rest served ``served`` batches
        per rank (its tail that fills no whole step is dropped)."""
        per_step = world_size * batch_size
        out = RestOfEpoch.__new__(RestOfEpoch)
        out.world_size, out.batch_size, out.num_batches = self.world_size, self.batch_size, self.num_batches
        out.offset = self.offset + served * per_step
        out.length = max((self.length // per_step - served) * per_step, 0)
        return out

    def __len__(self) -> int:
        return self.length

    def positions(self, index: np.ndarray) -> np.ndarray:
        """int64 positions in G of the rest's entries ``index`` (int64, each in [0, len))."""
        j = index + self.offset
        step = self.world_size * self.batch_size
        b, r, k = j // step, (j % step) // self.batch_size, j % self.batch_size
        return (r * self.num_batches + b) * self.batch_size + k

    def index_of(self, pos: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`positions`: the index in the rest of each position in G (int64), -1
        where the position is not in it (served before the change, or dropped)."""
        per_rank = self.num_batches * self.batch_size
        if per_rank == 0:
            return np.full(pos.shape, -1, dtype=np.int64)
        r, within = pos // per_rank, pos % per_rank
        b, k = within // self.batch_size, within % self.batch_size
        j = (b * self.world_size + r) * self.batch_size + k - self.offset
        return np.where((r < self.world_size) & (j >= 0) & (j < self.length), j, -1)


class EpochPlan:
    """Which records, in which order, form every batch of one epoch (see the module docstring).

    Memory is O(shards) plus at most :data:`PERM_CACHE` shard permutations: batches and the records a
    shard gives to them are computed when asked for, so a plan of a 50M-interaction epoch is as small
    as one of the sample's, and starting deep inside an epoch costs no more than starting at its head.
    """

    def __init__(
        self, manifest: dict[str, Any], split: str, world_size: int, batch_size: int, seed: int, epoch: int,
        shuffle: bool, drop_last: bool, segments: list[list[int]] | tuple = (), limit: int | None = None,
    ) -> None:  # fmt: skip
        """``limit``: serve only the first ``limit`` records of G (or of the rest), e.g. a prefix of an
        eval split (``eval.max_users``); None serves them all."""
        self.shards = manifest["splits"][split]["shards"]
        self.counts = np.array([s["records"] for s in self.shards], dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.batch_size, self.world_size = batch_size, world_size
        # rest: the positions in G still to serve this epoch (None: all of G, the common case).
        self.rest: RestOfEpoch | None = None
        for seg_world, seg_batch, served in segments:
            if not drop_last:  # ShardLoader.load_state_dict refuses this first, with the reason
                raise DataError("reader: only a drop_last (train) plan can be re-planned mid-epoch")
            self.rest = (
                RestOfEpoch(self.total, seg_world, seg_batch, served)
                if self.rest is None
                else self.rest.after(seg_world, seg_batch, served)
            )
        n = self.total if self.rest is None else len(self.rest)
        if limit is not None:
            # Positions past ``available`` are never served (``batch`` and ``uses`` stop there), so a
            # prefix needs nothing else: eval pads copy records of the prefix.
            n = min(n, limit)
        per_step = world_size * batch_size
        self.available = n
        self.num_batches = n // per_step if drop_last else math.ceil(n / per_step)
        self.per_rank = self.num_batches * batch_size
        self.slots = self.num_batches * per_step
        """Slots of the epoch, all ranks; slot q holds rest entry q (q < available) or a pad copy."""
        rng = np.random.default_rng([seed, epoch, 0])
        self.order = rng.permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
        self.place = np.empty_like(self.order)  # shard -> its index in the shard order
        self.place[self.order] = np.arange(len(self.order))
        self.starts = np.concatenate([[0], np.cumsum(self.counts[self.order])])
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _perm(self, shard: int) -> np.ndarray:
        """int64 [records of the shard]: record-in-shard at each of the shard's positions in G."""
        perm = self._perms.pop(shard, None)
        if perm is None:
            n = int(self.counts[shard])
            rng = np.random.default_rng([self.seed, self.epoch, 1, shard])
            perm = rng.permutation(n) if self.shuffle else np.arange(n)
            if len(self._perms) >= PERM_CACHE:
                self._perms.popitem(last=False)
        self._perms[shard] = perm
        return perm

    def _slot_pos(self, rank: int, i: int) -> np.ndarray:
        """int64 [batch_size]: the slots (see ``slots``) of batch i of a rank."""
        if self.rest is None:
            return rank * self.per_rank + i * self.batch_size + np.arange(self.batch_size)
        # a re-planned rest: step-major (module docstring)
        return (i * self.world_size + rank) * self.batch_size + np.arange(self.batch_size)

    def batch(self, rank: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, record-in-shard, is-pad), each [batch_size], of every slot of batch i of a rank."""
        pos = self._slot_pos(rank, i)
        pad = pos >= self.available
        pos = pos % self.available  # a pad slot copies a real record
        if self.rest is not None:
            pos = self.rest.positions(pos)
        k = np.searchsorted(self.starts, pos, side="right") - 1
        shard = self.order[k]
        offset = pos - self.starts[k]
        record = np.empty_like(offset)
        for s in np.unique(shard).tolist():
            here = shard == s
            record[here] = self._perm(s)[offset[here]]
        return shard, record, pad

    def uses(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every slot of the epoch that a record of ``shard`` fills, pad copies included: (record-in-
        shard, rank, batch), int64 arrays of equal length (at most the shard's records + one step).
        The inverse of :meth:`batch`, in O(records of the shard): a reader learns which of a shard's
        records it needs, and until which batch, without planning the rest of the epoch."""
        lo, n = int(self.starts[self.place[shard]]), int(self.counts[shard])
        pos = np.arange(lo, lo + n, dtype=np.int64)
        slot = pos if self.rest is None else self.rest.index_of(pos)
        keep = (slot >= 0) & (slot < min(self.available, self.slots))  # not served before, not dropped
        perm = self._perm(shard)
        records, slot = perm[pos[keep] - lo], slot[keep]
        if self.slots > self.available:  # eval: the last slots are pad copies of the first records
            pads = np.arange(self.available, self.slots, dtype=np.int64)
            source = pads % self.available
            if self.rest is not None:
                source = self.rest.positions(source)
            here = (source >= lo) & (source < lo + n)
            records = np.concatenate([records, perm[source[here] - lo]])
            slot = np.concatenate([slot, pads[here]])
        if self.rest is None:
            rank, batch = slot // self.per_rank, (slot % self.per_rank) // self.batch_size
        else:
            rank, batch = (
                (slot // self.batch_size) % self.world_size,
                slot // (self.world_size * self.batch_size),
            )
        return records, rank, batch


def read_shard(
    url: str, meta: dict[str, Any], records_per_member: int, wanted: set[int]
) -> dict[int, Record]:
    """The ``wanted`` records of one shard, after checking its size, sha256 and record count."""
    by_member: dict[int, list[int]] = defaultdict(list)
    for r in wanted:
        by_member[r // records_per_member].append(r)
    n_members = math.ceil(meta["records"] / records_per_member)
    out: dict[int, Record] = {}
    try:
        stream = open_stream(url)
        reader = HashingReader(stream)
        member = 0
        for f in tar_file_iterator(reader):
            if not f["fname"].endswith("." + MEMBER_EXT) or member >= n_members:
                raise CorruptShardError(f"{url}: unexpected tar member {f['fname']!r}")
            if member in by_member:
                records = json.loads(f["data"])
                expected = min(records_per_member, meta["records"] - member * records_per_member)
                if len(records) != expected:
                    raise CorruptShardError(
                        f"{url}: member {f['fname']} holds {len(records)} records, expected {expected}"
                    )
                for r in by_member[member]:
                    out[r] = records[r - member * records_per_member]
            member += 1
        reader.drain()
        stream.close()  # a pipe: stream raises here when its command failed
    except DataError:  # CorruptShardError, or the store failed (credentials, endpoint, missing object)
        raise
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        why = str(e).splitlines()[0].split(" @ ")[0]  # webdataset appends " @ <stream>"
        raise CorruptShardError(f"{url}: unreadable shard ({type(e).__name__}: {why})") from None
    if reader.size != meta["bytes"] or reader.sha256.hexdigest() != meta["sha256"]:
        raise CorruptShardError(
            f"{url}: {reader.size} bytes with a sha256 that differs from the manifest (truncated or damaged)"
        )
    if member != n_members:
        raise CorruptShardError(f"{url}: {member} tar members, expected {n_members}")
    return out


class _EpochStream(torch.utils.data.IterableDataset):
    """One rank's batches start… of one epoch; inside worker w only the batches w, w+K, … ."""

    def __init__(
        self, plan: EpochPlan, location: str, rank: int, start: int, records_per_member: int,
        collate_fn: Callable[[list[Record]], Any] | None, corrupt_tolerance: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.plan, self.location, self.rank, self.start = plan, location, rank, start
        self.records_per_member, self.collate_fn, self.tolerance = (
            records_per_member,
            collate_fn,
            corrupt_tolerance,
        )

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = self.start + worker
        # Planned batch by batch: a shard's records for this worker (and its last batch here) come from
        # plan.uses when the shard is first needed, so nothing here grows with the epoch (issue 15).
        cache: dict[int, dict[int, Record]] = {}
        last_use: dict[int, int] = {}
        skipped = 0
        last_real: Record | None = None
        for i in range(first, self.plan.num_batches, workers):
            shards, records, pads = self.plan.batch(self.rank, i)
            for s in dict.fromkeys(shards.tolist()):  # first-use order
                if s in cache:
                    continue
                used, ranks, batches = self.plan.uses(s)
                mine = (ranks == self.rank) & (batches >= i) & ((batches - first) % workers == 0)
                wanted = set(used[mine].tolist())
                last_use[s] = int(batches[mine].max())
                meta = self.plan.shards[s]
                try:
                    cache[s] = read_shard(
                        resolve(self.location, meta["path"]), meta, self.records_per_member, wanted
                    )
                except CorruptShardError as e:
                    skipped += 1
                    if skipped > self.tolerance:
                        raise
                    log.warning(
                        "skipping corrupt shard (%d of %d tolerated in this reader): %s; its %d records are "
                        "replaced by pad copies", skipped, self.tolerance, e, len(wanted),
                    )  # fmt: skip
                    cache[s] = {}
            batch: list[Record | None] = []
            for s, r, pad in zip(shards.tolist(), records.tolist(), pads.tolist()):
                rec = cache[s].get(r)
                batch.append({**rec, "pad": True} if rec is not None and pad else rec)
            real = next((r for r in batch if r is not None and not r.get("pad")), last_real)
            last_real = real
            filled = [r if r is not None else _substitute(real) for r in batch]
            for s in set(shards.tolist()):
                if last_use[s] == i:
                    del cache[s]
            yield self.collate_fn(filled) if self.collate_fn is not None else filled


def _substitute(template: Record | None) -> Record:
    """A masked stand-in for a record of a skipped corrupt shard."""
    if template is None:  # no real record read yet by this worker: a minimal one-item record
        return {
            "user": "",
            "uid": 0,
            "items": [0],
            "ratings": [0.0],
            "timestamps": [0],
            "seen": [],
            "pad": True,
        }
    return {**template, "pad": True}


def _identity(x: Any) -> Any:
    return x


class ShardLoader:
    """Batches of one split for one rank; ``len()`` is identical on every rank (see module docstring)."""

    def __init__(
        self,
        location: str | os.PathLike,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 1,
        collate_fn: Callable[[list[Record]], Any] | None = None,
        drop_last: bool | None = None,
        corrupt_tolerance: int = 0,
        prefetch_factor: int = 4,
        shuffle: bool | None = None,
        epoch: int = 0,
        max_records: int | None = None,
    ) -> None:
        """``max_records``: read only the first ``max_records`` records of the split's sequence G (module
        docstring; eval splits: in written order), e.g. the first users of a valid split
        (``eval.max_users``); None reads the whole split. Not part of :meth:`state_dict`: it is meant for
        evaluation, whose loaders are never resumed."""
        self.location = str(location)
        self.manifest = load_manifest(self.location)
        if split not in self.manifest["splits"]:
            raise DataError(f"split {split!r}: not in {resolve(self.location, 'manifest.json')}")
        for name, value, low in (("world_size", world_size, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("num_workers", num_workers, 0), ("corrupt_tolerance", corrupt_tolerance, 0),
                                 ("prefetch_factor", prefetch_factor, 1), ("epoch", epoch, 0)):  # fmt: skip
            if not isinstance(value, int) or value < low:
                raise DataError(f"ShardLoader {name}: got {value!r}, must be an int >= {low}")
        if max_records is not None and (not isinstance(max_records, int) or max_records < 1):
            raise DataError(f"ShardLoader max_records: got {max_records!r}, must be None or an int >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"ShardLoader rank: got {rank}, must be in [0, {world_size})")
        self.split, self.rank, self.world_size, self.batch_size, self.seed = (
            split,
            rank,
            world_size,
            batch_size,
            seed,
        )
        self.num_workers, self.collate_fn, self.prefetch_factor = num_workers, collate_fn, prefetch_factor
        self.corrupt_tolerance, self.max_records = corrupt_tolerance, max_records
        self.drop_last = split == "train" if drop_last is None else drop_last
        self.shuffle = split == "train" if shuffle is None else shuffle
        self._epoch, self._batch = epoch, 0
        self._segments: list[list[int]] = []
        """Earlier plans of the current epoch (module docstring: resume on another plan)."""
        self._len = self._plan(epoch).num_batches
        if self._len == 0:
            total = self.manifest["splits"][split]["records"]
            raise DataError(
                f"split {split!r} has {total} records, fewer than world_size x batch_size = "
                f"{world_size * batch_size}: no full batch (lower the batch size)"
            )

    def _plan(self, epoch: int) -> EpochPlan:
        segments = self._segments if epoch == self._epoch else ()
        return EpochPlan(self.manifest, self.split, self.world_size, self.batch_size, self.seed, epoch,
                         self.shuffle, self.drop_last, segments, self.max_records)  # fmt: skip

    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch; when it is exhausted the loader moves to (epoch + 1, 0)."""
        stream = _EpochStream(
            self._plan(self._epoch), self.location, self.rank, self._batch,
            self.manifest.get("records_per_member", 256), self.collate_fn, self.corrupt_tolerance,
        )  # fmt: skip
        if self.num_workers == 0:
            batches: Any = iter(stream)
        else:
            batches = iter(
                torch.utils.data.DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_identity,
                    prefetch_factor=self.prefetch_factor,
                    persistent_workers=False,
                )  # fmt: skip
            )
        try:
            for batch in batches:
                self._batch += 1  # counted here, as the trainer receives it: prefetched batches do not count
                yield batch
        except DataError as e:
            raise type(e)(one_line(e)) from None
        finally:
            del batches  # shuts DataLoader workers down when the trainer stops mid-epoch
        self._epoch, self._batch, self._segments = self._epoch + 1, 0, []
        self._len = self._plan(self._epoch).num_batches

    def state_dict(self) -> dict[str, Any]:
        done = self._batch >= self._len
        epoch, batch = (self._epoch + 1, 0) if done else (self._epoch, self._batch)
        return {
            "segments": [] if done else [list(seg) for seg in self._segments],
            "fingerprint": self.manifest["fingerprint"],
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": epoch,
            "batch": batch,
        }

    def load_state_dict(
        self, state: dict[str, Any], replan: bool = False, drop_remainder: bool = False
    ) -> None:
        """Continue at batch ``state["batch"]`` of epoch ``state["epoch"]``; refuses another plan's state.

        ``replan``: the state may come from a plan of another world size or batch size (any rank's state
        of that plan: they are in lockstep); the rest of its epoch is re-planned over this loader's ranks
        (module docstring). Raises :class:`DataError` when the rest does not fill whole batches of this
        plan (a record would be dropped; ``drop_remainder``: leave those records out of this epoch with
        a warning naming their count instead) or the state belongs to other data."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"reader state: missing key {missing[0]!r}")
        mine = self.state_dict()
        if state["fingerprint"] != mine["fingerprint"]:
            raise DataError(
                f"reader state: saved for shards with fingerprint {state['fingerprint'][:12]}…, but "
                f"{self.location} has {mine['fingerprint'][:12]}… (another build of the data)"
            )
        same_plan = all(state[k] == mine[k] for k in ("world_size", "batch_size"))
        for key in ("split", "seed") if replan else ("split", "rank", "world_size", "batch_size", "seed"):
            if state[key] != mine[key]:
                raise DataError(
                    f"reader state: {key} was {state[key]!r}, this reader has {mine[key]!r}; resuming exactly "
                    "needs the same data plan"
                )
        segments = [list(map(int, seg)) for seg in state.get("segments", [])]
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not same_plan and (batch > 0 or segments):
            if not self.drop_last:
                raise DataError(f"reader state: split {self.split!r} cannot be re-planned mid-epoch")
            segments.append([int(state["world_size"]), int(state["batch_size"]), batch])
            batch = 0
        self._epoch, self._segments = epoch, segments
        plan = self._plan(epoch)
        if not 0 <= batch <= plan.num_batches:
            raise DataError(f"reader state: batch {batch} outside 0..{plan.num_batches}")
        left = plan.available - plan.num_batches * self.world_size * self.batch_size
        if segments and left and drop_remainder:
            log.warning(
                "reader: %d records left of epoch %d do not fill a batch of %d x %d and are left out of "
                "this epoch", left, epoch, self.world_size, self.batch_size,
            )  # fmt: skip
        elif segments and left:
            raise DataError(
                f"reader state: the {plan.available} records left of epoch {epoch} do not fill batches of "
                f"{self.world_size} x {self.batch_size}; {left} would be dropped (choose a micro-batch size "
                "that divides them)"
            )
        self._batch, self._len = batch, plan.num_batches
