"""A run directory on an object store (``train.output_dir=s3://bucket/prefix``, any fsspec URL).

The trainer works in a local staging run directory exactly as it does for a local ``output_dir``
(``<tmpdir>/recgpt-stage/<sha256 of the URL>[-node<N>]``, one per node: the processes of a machine
share it) and :class:`RunSync` mirrors it to the store through the one storage layer
(:mod:`data_shards.storage`; credentials come from the standard AWS variables and are written nowhere):

* start (every rank, before resume is decided): each node's leader (its lowest rank) empties the
  node's staging directory; rank 0 downloads the store's logs (``train_log.jsonl``, ``tensorboard/``)
  and, for ``train.resume=auto``, one checkpoint: ``latest``'s target, else older ones, newest first,
  each only if its ``COMPLETE`` object exists and the downloaded copy verifies (sizes + sha256,
  :func:`trainer.checkpoint.checkpoint_damage`; a damaged one is skipped with one line); the other
  nodes' leaders download the same one and verify it. The local resume logic then runs unchanged on
  the staging directory;
* after each checkpoint's local save (:meth:`trainer.checkpoint.CheckpointManager.save`, which hashes
  each rank's files on that rank): every rank uploads the files it wrote — DeepSpeed's
  ``zero_pp_rank_<r>_*`` shards, its reader and RNG state; rank 0 also the shared files — in parallel;
  then (after a collective: every rank is alive and done) rank 0 uploads ``COMPLETE`` last, then the
  ``latest`` / ``best`` pointer objects, and only then deletes in the store the checkpoints keep-N
  drops. A process killed before ``COMPLETE`` is uploaded leaves objects no reader trusts; the next
  run resumes from the previous checkpoint. A checkpoint of the same step already in the store (a
  resumed run writing it again) loses its ``COMPLETE`` first, then its objects, before the new one is
  uploaded. A node without rank 0 deletes its local copy once the checkpoint is published;
* at each log interval and at the end (rank 0): ``train_log.jsonl``, ``tensorboard/``, ``config.yaml``
  and ``metrics.json`` (files whose size changed since their last upload).

Nodes are told apart by torchrun's ``GROUP_RANK`` or Ray's node rank (``NODE_RANK``,
:func:`trainer.distributed.node_rank`): processes with the same value must share a local disk.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs import CheckpointError, ExportError, RecgptError, one_line
from data_shards import storage
from trainer.checkpoint import CHECKPOINTS, COMPLETE, checkpoint_damage, step_of
from trainer.distributed import all_gather_object, barrier, node_leaders, node_rank
from trainer.faults import Faults

LOG_FILES = ("train_log.jsonl", "config.yaml", "metrics.json")
TENSORBOARD = "tensorboard"


def staging_dir(url: str) -> Path:
    """The local staging run directory of ``url`` on this node (shared by the node's processes)."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    node = node_rank()
    return Path(tempfile.gettempdir()) / "recgpt-stage" / (f"{digest}-node{node}" if node else digest)


def _read_text(url: str) -> str | None:
    return storage.read_bytes(url).decode().strip() if storage.exists(url) else None


def download(url: str, local: Path) -> None:
    """Copy every object under the prefix ``url`` into the local directory ``local``."""
    fs, path = storage.filesystem(url)
    with storage._errors(url):
        files = [f for f in fs.find(path) if not f.endswith("/")]
        for f in files:
            dest = local / f[len(path.rstrip("/")) + 1 :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(dest))


def _together(work: Callable[[], Any]) -> list[Any]:
    """Run ``work`` on every rank and gather the results; an error on any rank is raised on every rank
    (a rank that failed alone would leave the others waiting in the next collective)."""
    error: BaseException | None = None
    try:
        outcome: dict[str, Any] = {"ok": work()}
    except Exception as e:  # noqa: BLE001 — every rank raises it (this one the original)
        error = e
        outcome = {"error": str(e) if isinstance(e, RecgptError) else f"{type(e).__name__}: {one_line(e)}"}
    everyone = all_gather_object(outcome)
    if error is not None:
        raise error
    for o in everyone:
        if "error" in o:
            raise CheckpointError(o["error"])
    return [o["ok"] for o in everyone]


class RunSync:
    """Mirrors the staging run directory ``local`` to the store prefix ``url`` (see the module docstring)."""

    def __init__(self, url: str, rank: int, keep_last: int, faults: Faults):
        self.url = url.rstrip("/")
        self.keep_last = keep_last
        self.local = staging_dir(self.url)
        self.rank = rank
        self.faults = faults
        self.leader = rank == 0  # of this node; set by prepare()
        self._sent: dict[str, int] = {}  # log file -> size at its last upload

    def store(self, rel: str) -> str:
        return storage.join(self.url, rel)

    def shown(self, local: str | os.PathLike) -> str:
        """A path in the staging directory as the URL of its copy in the store (else unchanged)."""
        p = Path(local)
        if p == self.local or p.is_relative_to(self.local):
            return (
                storage.join(self.url, p.relative_to(self.local).as_posix()) if p != self.local else self.url
            )
        return str(local)

    # ------------------------------------------------------------------ start
    def prepare(self, resume: str) -> str:
        """Every rank (collective): each node's leader empties its staging directory; rank 0 fetches
        the logs and chooses the checkpoint to resume from (``train.resume=auto``: the store's newest
        complete one that verifies; an ``s3://…`` resume: that one) and downloads it; the other nodes'
        leaders download the same one and verify it. Returns the ``train.resume`` to apply to the
        staging directory (a store's checkpoint becomes its local copy)."""
        self.leader, _ = node_leaders()
        explicit = storage.is_url(resume)
        local_resume = self.local / "resume-from"

        def start() -> str | None:
            if self.leader:
                shutil.rmtree(self.local, ignore_errors=True)
                self.local.mkdir(parents=True)
            if self.rank != 0:
                return None
            storage.listdir(self.url)  # an unknown bucket or bad credentials: one line naming the run URL
            for name in ("train_log.jsonl",):
                if storage.exists(self.store(name)):
                    fs, path = storage.filesystem(self.store(name))
                    fs.get_file(path, str(self.local / name))
            if storage.listdir(self.store(TENSORBOARD)):
                download(self.store(TENSORBOARD), self.local / TENSORBOARD)
            if resume == "auto":
                return self._fetch_checkpoint()
            if explicit:
                return fetch_checkpoint(resume, local_resume)[1]
            return None

        try:
            chosen = _together(start)[0]
        except BaseException:
            self.cleanup(logs=False)
            raise

        def follow() -> None:  # the other nodes: the same checkpoint, verified
            if not self.leader or self.rank == 0 or chosen is None:
                return
            if explicit:
                dest, _ = fetch_checkpoint(chosen, local_resume)
            else:
                name = chosen.rsplit("/", 1)[1]
                local_root = self.local / CHECKPOINTS
                dest = local_root / name
                download(chosen, dest)
                for pointer in ("latest", "best"):
                    target = _read_text(self.store(f"{CHECKPOINTS}/{pointer}"))
                    (local_root / pointer).write_text(name if pointer == "latest" else target or name)
            problem, _ = checkpoint_damage(dest)
            if problem is not None:
                raise CheckpointError(f"{chosen}: the copy on node {node_rank()} is damaged ({problem})")

        try:
            _together(follow)
        except BaseException:
            self.cleanup(logs=False)
            raise
        return str(local_resume) if explicit else resume

    def _fetch_checkpoint(self) -> str | None:
        """Rank 0, ``train.resume=auto``: download the store's newest complete checkpoint that verifies
        into the staging directory (with ``latest``/``best`` pointers); returns its URL (None: none)."""
        root = self.store(CHECKPOINTS)
        names = storage.listdir(root)
        latest = _read_text(storage.join(root, "latest")) if "latest" in names else None
        best = _read_text(storage.join(root, "best")) if "best" in names else None
        steps = sorted((n for n in names if step_of(n) is not None), reverse=True)
        if latest is not None and step_of(latest) is not None:  # newer ones: an abandoned timeline
            steps = [n for n in steps if step_of(n) <= step_of(latest)]
        local_root = self.local / CHECKPOINTS
        local_root.mkdir(parents=True, exist_ok=True)
        if best is not None:
            (local_root / "best").write_text(best)
        first_bad = None
        for name in steps:
            if not storage.exists(storage.join(root, f"{name}/{COMPLETE}")):
                continue  # never published (a crash mid-upload): invisible
            dest = local_root / name
            download(storage.join(root, name), dest)
            problem, _ = checkpoint_damage(dest)
            if problem is None:
                (local_root / "latest").write_text(name)
                if first_bad is not None:
                    print(f"recgpt: {storage.join(root, first_bad[0])}: damaged checkpoint ({first_bad[1]}); "
                          f"resuming from {name}", file=sys.stderr, flush=True)  # fmt: skip
                return storage.join(root, name)
            first_bad = first_bad or (name, problem)
            shutil.rmtree(dest, ignore_errors=True)
        if first_bad is not None:
            raise CheckpointError(
                f"{storage.join(root, first_bad[0])}: damaged checkpoint ({first_bad[1]}), and no earlier "
                "complete one verifies; remove it, or start over with train.resume=never"
            )
        return None

    # ------------------------------------------------------------------ checkpoints
    def publish_checkpoint(self, name: str, step: int, written: Path, owned: list[str]) -> None:
        """Every rank, after the local publish of checkpoint ``name`` (see the module docstring):
        ``written`` is this rank's local copy, ``owned`` the relative paths this rank uploads."""
        local_root = self.local / CHECKPOINTS
        root = self.store(CHECKPOINTS)
        target = storage.join(root, name)
        fs, path = storage.filesystem(target)
        t0 = time.perf_counter()
        if self.rank == 0:  # the same step already in the store (a resumed run): unpublish it first
            with storage._errors(target, "cannot replace"):
                if fs.exists(f"{path}/{COMPLETE}"):
                    fs.rm_file(f"{path}/{COMPLETE}")
                if fs.exists(path):
                    fs.rm(path, recursive=True)
        barrier()
        with storage._errors(target, "cannot write"):
            if owned:
                fs.put([str(written / rel) for rel in owned], [f"{path}/{rel}" for rel in owned])
        self.faults.maybe_kill("kill_during_upload", step)
        sizes = all_gather_object(sum((written / rel).stat().st_size for rel in owned))  # also a barrier
        if self.rank == 0:
            # The logs up to this checkpoint first: a crash after it resumes with them in the store.
            self.sync_logs()
            storage.upload(local_root / name / COMPLETE, storage.join(target, COMPLETE))  # last
            for pointer in ("latest", "best"):
                p = local_root / pointer
                if p.is_file():
                    storage.upload(p, storage.join(root, pointer))
            self._prune(root, local_root)
            per_rank = ", ".join(f"{s / 2**20:.1f}" for s in sizes)
            print(f"checkpoint {name} mirrored to {target} ({sum(sizes) / 2**20:.1f} MiB; per rank "
                  f"{per_rank} MiB; {time.perf_counter() - t0:.2f} s)", flush=True)  # fmt: skip
        barrier()
        if self.leader and written.name != name:
            # A node without rank 0's disk keeps no local copy: a resume downloads the published one.
            shutil.rmtree(written, ignore_errors=True)

    def _prune(self, root: str, local_root: Path) -> None:
        """keep-N in the store, as :meth:`CheckpointManager.prune` does locally: of the checkpoints up to
        ``latest`` that have a ``COMPLETE`` object, the newest ``keep_last`` stay, and ``latest``,
        ``best`` and anything newer than ``latest``; the others (and objects of unpublished ones up to
        ``latest``) are deleted, ``COMPLETE`` first."""
        latest = step_of((local_root / "latest").read_text().strip())
        keep = {
            (local_root / p).read_text().strip() for p in ("latest", "best") if (local_root / p).is_file()
        }
        names = [n for n in storage.listdir(root) if step_of(n) is not None and step_of(n) <= latest]
        published = [n for n in sorted(names) if storage.exists(storage.join(root, f"{n}/{COMPLETE}"))]
        keep |= set(published[-self.keep_last :])
        fs, _ = storage.filesystem(root)
        for name in names:
            if name in keep:
                continue
            _, path = storage.filesystem(storage.join(root, name))
            with storage._errors(storage.join(root, name), "cannot delete"):
                if fs.exists(f"{path}/{COMPLETE}"):
                    fs.rm_file(f"{path}/{COMPLETE}")
                fs.rm(path, recursive=True)

    def cleanup(self, logs: bool = True) -> None:
        """When the run ends (finished or failed): rank 0 uploads the logs written since the last sync
        (best effort: a failing store must not hide the run's own error), then each node's leader
        deletes its staging directory — the store holds the run, and the next start empties it anyway."""
        if self.rank == 0 and logs:
            try:
                self.sync_logs()
            except Exception as e:  # noqa: BLE001 — reported, and the run's own outcome stands
                print(f"recgpt: could not upload the last logs to {self.url}: {one_line(e)}", file=sys.stderr)
        if self.leader:
            shutil.rmtree(self.local, ignore_errors=True)

    # ------------------------------------------------------------------ logs
    def sync_logs(self) -> None:
        """Rank 0: upload the log files and TensorBoard events whose size changed."""
        if self.rank != 0:
            return
        paths = [self.local / n for n in LOG_FILES]
        tb = self.local / TENSORBOARD
        if tb.is_dir():
            paths += sorted(p for p in tb.rglob("*") if p.is_file())
        for p in paths:
            if not p.is_file():
                continue
            rel = p.relative_to(self.local).as_posix()
            size = p.stat().st_size
            if self._sent.get(rel) != size:
                storage.upload(p, self.store(rel))
                self._sent[rel] = size


# --------------------------------------------------------------------------- export / evaluate


def local_copy(checkpoint: str, best: bool = False) -> tuple[Path, str]:
    """``(local path, its URL)`` of a checkpoint in the store, downloaded into a temporary directory that
    is removed when the process exits (see :func:`fetch_checkpoint`)."""
    tmp = Path(tempfile.mkdtemp(prefix="recgpt-ckpt-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return fetch_checkpoint(checkpoint, tmp, best)


def local_export(url: str) -> Path:
    """A verified local copy of the export published at ``url`` (in a temporary directory removed when
    the process exits). Raises :class:`ExportError` when ``url`` holds no ``export_manifest.json``
    (nothing, or an upload that never finished) or a file differs from it."""
    from modeling.serving import MANIFEST, verify_export

    url = url.rstrip("/")
    if not storage.exists(storage.join(url, MANIFEST)):
        raise ExportError(f"{url}: no published export there (no {MANIFEST})")
    tmp = Path(tempfile.mkdtemp(prefix="recgpt-export-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    download(url, tmp)
    verify_export(tmp)
    return tmp


def fetch_checkpoint(checkpoint: str, into: Path, best: bool = False) -> tuple[Path, str]:
    """Download a checkpoint of the store into the local directory ``into`` (as ``into/step_N``, with
    ``into/latest`` naming it, so ``into`` reads as a run directory too); returns ``(into/step_N, its
    URL)``. ``checkpoint``: a run prefix (its ``latest``, or with ``best`` its ``best`` checkpoint) or
    one checkpoint's prefix. The caller verifies the copy as it verifies a local checkpoint."""
    url = checkpoint.rstrip("/")
    if storage.exists(storage.join(url, COMPLETE)) or storage.exists(storage.join(url, "trainer_state.json")):
        root, name = url.rsplit("/", 1)
    else:
        root = storage.join(url, CHECKPOINTS) if storage.listdir(storage.join(url, CHECKPOINTS)) else url
        which = "best" if best else "latest"
        name = _read_text(storage.join(root, which))
        if name is None or not storage.exists(storage.join(root, f"{name}/{COMPLETE}")):
            where = storage.join(url, f"{CHECKPOINTS}/{which}") if root == url else storage.join(root, which)
            raise CheckpointError(f"{url}: no complete checkpoint ({where} missing or points at an "
                                  "incomplete one)")  # fmt: skip
    dest = into / name
    download(storage.join(root, name), dest)
    (into / "latest").write_text(name)
    return dest, storage.join(root, name)
