"""The one storage layer: local paths and any fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``).

Every read or write of a shard location goes through here, on fsspec (with s3fs for ``s3://``); there
are no hand-written S3 calls. Credentials and the endpoint come from the standard AWS variables, read
by botocore itself: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``),
``AWS_ENDPOINT_URL`` (an S3-compatible server: MinIO, Ceph, moto), ``AWS_DEFAULT_REGION``. They are
never passed as arguments, so they appear in no log line, config, manifest or error message (messages
are scrubbed of the secret too).

Transient errors are retried by botocore's own retry handler (``mode=standard``, ``AWS_MAX_ATTEMPTS``
attempts, default 5) and by s3fs's own retries of reads; nothing here loops. Every failure — unknown
bucket, wrong credentials, unreachable endpoint, missing object — is one :class:`DataError` line naming
the URL.

Publishing a directory: on a local filesystem the directory is renamed into place whole
(:func:`configs.files.publish_dir`); an object store has no rename, so every object is written first
and the marker (a manifest) last — a reader that finds the marker finds every object it names.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol

from configs import DataError, RecgptError, one_line, publish_dir

# Secret-bearing variables: their values are removed from every error message.
_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Variables that select the account/endpoint: a change gives a new filesystem object (fsspec caches
# instances by their arguments, and these are not arguments).
_ENV_KEYS = ("AWS_ACCESS_KEY_ID", *_SECRETS, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
             "AWS_REGION", "AWS_PROFILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")  # fmt: skip
# botocore logs "Found credentials in environment variables." at INFO: noise under INFO-level logging
# (export, Ray workers); its warnings and errors still show.
for _name in ("botocore", "aiobotocore", "s3fs"):
    logging.getLogger(_name).setLevel(logging.WARNING)
_READ_BLOCK = 8 << 20  # bytes fetched per ranged GET while a shard streams
_cache: dict[tuple, Any] = {}


def is_url(location: str | os.PathLike) -> bool:
    """True for ``protocol://…`` locations (fsspec), False for plain local paths."""
    return "://" in str(location)


def join(base: str | os.PathLike, relpath: str) -> str:
    """``relpath`` inside a directory or URL prefix."""
    base = str(base)
    return base.rstrip("/") + "/" + relpath if is_url(base) else os.path.join(base, relpath)


def _options(protocol: str) -> dict[str, Any]:
    if protocol in ("s3", "s3a"):
        return {
            # botocore's standard retry mode: exponential backoff with jitter on throttling, 5xx and
            # connection errors; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE override it as they do for the AWS CLI.
            "config_kwargs": {
                "retries": {
                    "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
                    "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                },
                "connect_timeout": 10,
                "read_timeout": 60,
            },
            "use_listings_cache": False,  # another process may have written the prefix since
            "skip_instance_cache": True,  # cached here, keyed by the AWS_* variables (see _ENV_KEYS)
        }
    return {}


def filesystem(url: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a local path or URL."""
    url = str(url)
    protocol, _ = split_protocol(url)
    protocol = protocol or "file"
    env = hashlib.sha256(repr([os.environ.get(k) for k in _ENV_KEYS]).encode()).hexdigest()
    key = (protocol, os.getpid(), env)  # a forked DataLoader worker makes its own (s3fs is not fork-safe)
    fs = _cache.get(key)
    if fs is None:
        with _errors(url):
            fs = _cache[key] = fsspec.filesystem(protocol, **_options(protocol))
    return fs, fs._strip_protocol(url)


def _scrub(text: str) -> str:
    """``text`` without the secret values. Values shorter than 8 characters (test keys, never a real
    secret) are left alone: replacing them would garble the URLs the message names."""
    for k in _SECRETS:
        value = os.environ.get(k)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    return text


def _remote_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # only local/memory filesystems in this environment
        return ()
    return (BotoCoreError, ClientError)


def _why(e: BaseException, url: str) -> str:
    detail = _scrub(one_line(e))
    name = type(e).__name__
    if isinstance(e, FileNotFoundError):
        return "no such object or file" if detail in url else f"not found ({detail})"
    if isinstance(e, PermissionError):
        return f"access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({detail})"
    if "Connect" in name or "Endpoint" in name:
        return f"cannot reach the storage endpoint ({name}: {detail})"
    return f"{name}: {detail}"


@contextlib.contextmanager
def _errors(url: str, action: str = "cannot read") -> Iterator[None]:
    """Any storage failure inside becomes one DataError line naming ``url`` (never the secret)."""
    try:
        yield
    except RecgptError:
        raise
    except (OSError, ValueError, TimeoutError, *_remote_errors()) as e:
        raise DataError(f"{url}: {action}: {_why(e, url)}") from None


def open_read(url: str | os.PathLike) -> IO[bytes]:
    """A binary read stream of ``url`` (object stores: ranged reads as it is consumed, no local copy)."""
    fs, path = filesystem(url)
    with _errors(str(url)):
        if fs.protocol and "s3" in fs.protocol:
            return fs.open(path, "rb", block_size=_READ_BLOCK, cache_type="readahead")
        return fs.open(path, "rb")


def open_write(url: str | os.PathLike) -> IO[bytes]:
    """A binary write stream of ``url`` (an object store writes the object when it is closed)."""
    fs, path = filesystem(url)
    with _errors(str(url), "cannot write"):
        if not is_url(url):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return fs.open(path, "wb")


def read_bytes(url: str | os.PathLike) -> bytes:
    """The whole content of ``url``."""
    fs, path = filesystem(url)
    with _errors(str(url)):
        return fs.cat_file(path)


def exists(url: str | os.PathLike) -> bool:
    """Whether a file/object (or a non-empty prefix) exists at ``url``."""
    fs, path = filesystem(url)
    with _errors(str(url)):
        return bool(fs.exists(path))


def size(url: str | os.PathLike) -> int:
    """Size of the file/object at ``url`` in bytes."""
    fs, path = filesystem(url)
    with _errors(str(url)):
        return int(fs.size(path))


def listdir(url: str | os.PathLike) -> list[str]:
    """Names directly under the directory or prefix ``url`` (empty when there is none); a missing bucket
    or unreachable store is a DataError."""
    fs, path = filesystem(url)
    with _errors(str(url), "cannot list"):
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            if is_url(url) and "/" in path:  # no such prefix; but the bucket must exist
                bucket = path.split("/", 1)[0]
                try:
                    fs.ls(bucket, detail=False)
                except FileNotFoundError:
                    raise FileNotFoundError(f"bucket {bucket!r} does not exist") from None
            return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def upload(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copy a local file, or a directory recursively, to ``url``."""
    fs, path = filesystem(url)
    local = Path(local)
    with _errors(str(url), "cannot write"):
        if local.is_dir():
            files = sorted(p for p in local.rglob("*") if p.is_file())
            if files:
                fs.put([str(p) for p in files], [f"{path}/{p.relative_to(local).as_posix()}" for p in files])
        else:
            fs.put_file(str(local), path)


def publish(tmp: str | os.PathLike, url: str | os.PathLike, marker: str, force: bool = False) -> str:
    """Publish the finished local directory ``tmp`` at ``url``; ``marker`` (a file in it) appears last.

    Local paths: renamed whole (:func:`configs.files.publish_dir`; ``tmp`` must be beside ``url``).
    URLs (no rename in an object store): an existing non-empty prefix is refused unless ``force``.
    Every object is uploaded under the temporary prefix ``<parent>/.<name>.tmp-<pid>/`` (the slow,
    failure-prone part; an old version at ``url`` stays whole and readable meanwhile); then the old
    version loses its marker first (no reader trusts its objects any more) and its objects; the
    objects are copied into place inside the store (server-side copies) and the marker last; the
    temporary prefix is deleted. A crash leaves at most a temporary prefix, or objects without a
    marker, which no reader trusts. ``tmp`` is left for the caller to remove.
    """
    url = str(url)
    if not is_url(url):
        return str(publish_dir(tmp, url))
    tmp = Path(tmp)
    if listdir(url) and not force:
        raise DataError(f"{url}: already exists and is not empty (--force replaces it)")
    fs, path = filesystem(url)
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    if not parent:
        raise DataError(f"{url}: give a prefix inside the bucket, not the bucket itself")
    staging = f"{parent}/.{name}.tmp-{os.getpid()}"
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    rest = [rel for rel in files if rel != marker]
    with _errors(url, "cannot write"):
        if fs.exists(staging):  # left by a crash of this pid number
            fs.rm(staging, recursive=True)
        fs.put([str(tmp / rel) for rel in files], [f"{staging}/{rel}" for rel in files])
        if fs.exists(path):
            if fs.exists(f"{path}/{marker}"):
                fs.rm_file(f"{path}/{marker}")
            fs.rm(path, recursive=True)
        for rel in [*rest, marker]:  # the marker last
            fs.copy(f"{staging}/{rel}", f"{path}/{rel}")
        fs.rm(staging, recursive=True)
    return url
