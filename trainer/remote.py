"""A run directory on an object store (``train.output_dir=s3://bucket/prefix``, any fsspec URL).

The trainer works in a local staging run directory exactly as it does for a local ``output_dir``
(``<tmpdir>/recgpt-stage/<sha256 of the URL>``) and :class:`RunSync` mirrors it to the store through
the one storage layer (:mod:`data_shards.storage`; credentials come from the standard AWS variables and
are written nowhere):

* start (rank 0, before resume is decided): the staging directory is emptied and the store's logs
  (``train_log.jsonl``, ``tensorboard/``) and, for ``train.resume=auto``, one checkpoint are
  downloaded: ``latest``'s target, else older ones, newest first, each only if its ``COMPLETE`` object
  exists and the downloaded copy verifies (sizes + sha256, :func:`trainer.checkpoint.checkpoint_damage`).
  The local resume logic then runs unchanged on the staging directory;
* after each checkpoint's local publish: rank 0 uploads every file of the checkpoint, then (after a
  barrier: every rank is still alive) ``COMPLETE`` last, then the ``latest`` / ``best`` pointer
  objects, and only then deletes in the store the checkpoints the local prune deleted. A process killed
  before ``COMPLETE`` is uploaded leaves objects no reader trusts; the next run resumes from the
  previous checkpoint. A checkpoint of the same step already in the store (a resumed run writing it
  again) loses its ``COMPLETE`` first, then its objects, before the new one is uploaded;
* at each log interval and at the end (rank 0): ``train_log.jsonl``, ``tensorboard/``, ``config.yaml``
  and ``metrics.json`` (files whose size changed since their last upload).

Limitation: the staging directory is per machine and rank 0 uploads the checkpoint, so every rank must
run on rank 0's node (one node, any number of processes).
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from configs import CheckpointError
from data_shards import storage
from trainer.checkpoint import CHECKPOINTS, COMPLETE, checkpoint_damage, step_of
from trainer.distributed import barrier
from trainer.faults import Faults

LOG_FILES = ("train_log.jsonl", "config.yaml", "metrics.json")
TENSORBOARD = "tensorboard"


def staging_dir(url: str) -> Path:
    """The local staging run directory of ``url`` (the same on every process of this machine)."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "recgpt-stage" / digest


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


class RunSync:
    """Mirrors the staging run directory ``local`` to the store prefix ``url`` (see the module docstring)."""

    def __init__(self, url: str, rank: int, keep_last: int, faults: Faults):
        self.url = url.rstrip("/")
        self.keep_last = keep_last
        self.local = staging_dir(self.url)
        self.rank = rank
        self.faults = faults
        self._sent: dict[str, int] = {}  # log file -> size at its last upload

    def store(self, rel: str) -> str:
        return storage.join(self.url, rel)

    # ------------------------------------------------------------------ start
    def prepare(self, resume: str) -> str:
        """Rank 0: empty the staging directory, fetch the logs and (resume=auto) a checkpoint, or the
        checkpoint ``train.resume`` names in a store; barrier. Returns the ``train.resume`` to apply to
        the staging directory (a store's checkpoint becomes its local copy)."""
        explicit = storage.is_url(resume)
        local_resume = self.local / "resume-from"
        if self.rank == 0:
            shutil.rmtree(self.local, ignore_errors=True)
            self.local.mkdir(parents=True)
            for name in ("train_log.jsonl",):
                if storage.exists(self.store(name)):
                    fs, path = storage.filesystem(self.store(name))
                    fs.get_file(path, str(self.local / name))
            if storage.listdir(self.store(TENSORBOARD)):
                download(self.store(TENSORBOARD), self.local / TENSORBOARD)
            if resume == "auto":
                self._fetch_checkpoint()
            elif explicit:
                fetch_checkpoint(resume, local_resume)
        barrier()
        return str(local_resume) if explicit else resume

    def _fetch_checkpoint(self) -> None:
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
                return
            first_bad = first_bad or (name, problem)
            shutil.rmtree(dest, ignore_errors=True)
        if first_bad is not None:
            raise CheckpointError(
                f"{storage.join(root, first_bad[0])}: damaged checkpoint ({first_bad[1]}), and no earlier "
                "complete one verifies; remove it, or start over with train.resume=never"
            )

    # ------------------------------------------------------------------ checkpoints
    def publish_checkpoint(self, name: str, step: int) -> None:
        """Every rank, after the local publish of checkpoint ``name`` (see the module docstring)."""
        local_root = self.local / CHECKPOINTS
        root = self.store(CHECKPOINTS)
        target = storage.join(root, name)
        t0 = time.perf_counter()
        files: list[Path] = []
        if self.rank == 0:
            fs, path = storage.filesystem(target)
            with storage._errors(target, "cannot replace"):
                if fs.exists(f"{path}/{COMPLETE}"):
                    fs.rm_file(f"{path}/{COMPLETE}")
                if fs.exists(path):
                    fs.rm(path, recursive=True)
            ckpt = local_root / name
            files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE)
            with storage._errors(target, "cannot write"):
                fs.put([str(p) for p in files], [f"{path}/{p.relative_to(ckpt).as_posix()}" for p in files])
        self.faults.maybe_kill("kill_during_upload", step)
        barrier()
        if self.rank == 0:
            storage.upload(local_root / name / COMPLETE, storage.join(target, COMPLETE))  # last
            for pointer in ("latest", "best"):
                p = local_root / pointer
                if p.is_file():
                    storage.upload(p, storage.join(root, pointer))
            self._prune(root, local_root)
            mib = sum(p.stat().st_size for p in files) / 2**20
            print(f"checkpoint {name} mirrored to {target} ({len(files) + 1} files, {mib:.1f} MiB, "
                  f"{time.perf_counter() - t0:.2f} s)", flush=True)  # fmt: skip
        barrier()

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
            raise CheckpointError(f"{url}: no complete checkpoint ({storage.join(root, which)} missing or "
                                  "points at an incomplete one)")  # fmt: skip
    dest = into / name
    download(storage.join(root, name), dest)
    (into / "latest").write_text(name)
    return dest, storage.join(root, name)
