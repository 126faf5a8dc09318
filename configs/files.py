"""The two file primitives every layer shares: one atomic write and one checksum.

Atomic: readers see the old content or the new one, never half a file — the file is written beside
its target, flushed to disk and renamed over it (``os.replace`` is atomic on POSIX filesystems).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

_CHUNK = 1 << 20


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns the path.

    The temporary file ``.<name>.tmp<pid>`` lives in the same directory (a rename across filesystems
    would not be atomic); on any error it is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rename the finished directory ``tmp`` to ``out`` (same filesystem); returns ``out``.

    An existing ``out`` is first renamed aside and deleted only once the new one is in place, so a
    reader sees the old directory or the new one, never a half-written one (the caller decides
    whether replacing is allowed). Directories are written under a temporary name beside ``out``
    (``.<name>.tmp-<pid>``) and published with this.
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()
