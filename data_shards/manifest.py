"""The shard directory's manifest and item vocabulary, read from a local directory or any URL.

A shard location is a directory path, an fsspec URL prefix (``s3://bucket/shards``, ``gs://…``,
``file:///data/shards``, ``http://host/shards``), read through the one storage layer
(:mod:`data_shards.storage`), or a template with ``{}`` standing for the relative path, which is how a
``pipe:`` command names a file (opened by webdataset's ``gopen``): ``pipe:aws s3 cp s3://bucket/shards/{} -``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, BinaryIO

from webdataset.gopen import gopen

from configs import CorruptShardError, DataError
from data_shards import storage

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS = "items.jsonl"
SPLITS = ("train", "valid", "test")
MEMBER_EXT = "records.json"  # one tar member = a JSON list of records
_REQUIRED = (
    "format_version",
    "fingerprint",
    "num_items",
    "num_users",
    "splits",
    "items_file",
    "items_sha256",
)


def resolve(base: str | os.PathLike, relpath: str) -> str:
    """The URL or path of ``relpath`` inside a shard location (see the module docstring)."""
    base = str(base)
    if "{}" in base:
        return base.replace("{}", relpath)
    if base.startswith("pipe:"):
        raise DataError(
            f"{base}: a pipe: location needs {{}} where the file name goes, e.g. 'pipe:aws s3 cp s3://b/shards/{{}} -'"
        )
    return storage.join(base, relpath)


def fingerprint(splits: dict[str, Any], items_sha256: str) -> str:
    """sha256 over every shard's hash (split order, then shard order) and the item vocabulary's hash."""
    h = hashlib.sha256(items_sha256.encode())
    for split in SPLITS:
        for shard in splits[split]["shards"]:
            h.update(f"{shard['path']}:{shard['sha256']}\n".encode())
    return h.hexdigest()


class HashingReader:
    """Wraps a read stream, hashing and counting every byte that passes through."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.sha256, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def open_stream(url: str) -> BinaryIO:
    """A binary read stream of a shard file: ``pipe:`` commands through webdataset's ``gopen``, paths
    and every other URL through the storage layer (streaming; DataError naming the URL)."""
    if url.startswith("pipe:"):
        try:
            return gopen(url, "rb")
        except (OSError, ValueError) as e:
            raise DataError(f"{url}: cannot read ({e})") from None
    return storage.open_read(url)


def read_url(url: str) -> bytes:
    """The whole content of a path or URL (errors name the URL)."""
    if not url.startswith("pipe:"):
        return storage.read_bytes(url)
    stream = open_stream(url)
    try:
        return stream.read()
    except (OSError, ValueError) as e:
        raise DataError(f"{url}: cannot read ({e})") from None
    finally:
        stream.close()


def load_manifest(location: str | os.PathLike) -> dict[str, Any]:
    """``manifest.json`` of a shard location, checked for the format version and the stable keys."""
    url = resolve(location, MANIFEST)
    try:
        manifest = json.loads(read_url(url))
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{url}: not valid JSON ({e})") from None
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise DataError(f"{url}: missing key {missing[0]!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{url}: format_version {manifest['format_version']} (this recgpt reads {FORMAT_VERSION})"
        )
    return manifest


def read_items(location: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The item vocabulary, one dict per dense index: index, item_id, title, count, meta."""
    manifest = manifest or load_manifest(location)
    url = resolve(location, manifest["items_file"])
    data = read_url(url)
    if hashlib.sha256(data).hexdigest() != manifest["items_sha256"]:
        raise CorruptShardError(f"{url}: sha256 differs from the manifest (damaged or from another build)")
    # One parse of the lines as a JSON array: a million json.loads calls took ~20 s at 1M items.
    items = json.loads(b"[" + b",".join(line for line in data.splitlines() if line.strip()) + b"]")
    if len(items) != manifest["num_items"] or any(it["index"] != i for i, it in enumerate(items)):
        raise CorruptShardError(f"{url}: expected items with index 0..{manifest['num_items'] - 1}")
    return items


def check_file(url: str, size: int, sha256: str) -> str | None:
    """Why the bytes at ``url`` are not the expected ones, or None when they are."""
    try:
        stream = open_stream(url)
        reader = HashingReader(stream)
        reader.drain()
        stream.close()
    except DataError as e:
        return str(e).removeprefix(f"{url}: ")
    except (OSError, ValueError) as e:
        return f"cannot read ({e})"
    if reader.size != size:
        return f"size {reader.size} bytes, manifest says {size}"
    if reader.sha256.hexdigest() != sha256:
        return "sha256 differs from the manifest"
    return None


def verify(location: str | os.PathLike) -> tuple[int, list[str]]:
    """Re-check every shard's size and sha256 and the item file; (files checked, problems)."""
    manifest = load_manifest(location)
    problems, checked = [], 0
    try:
        read_items(location, manifest)
    except DataError as e:
        problems.append(str(e))
    checked += 1
    if manifest.get("histories_file"):  # builds since periodic builds (shards.base) exist
        url = resolve(location, manifest["histories_file"])
        try:
            if hashlib.sha256(read_url(url)).hexdigest() != manifest.get("histories_sha256"):
                problems.append(f"{url}: sha256 differs from the manifest")
        except DataError as e:
            problems.append(str(e))
        checked += 1
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            url = resolve(location, shard["path"])
            why = check_file(url, shard["bytes"], shard["sha256"])
            checked += 1
            if why:
                problems.append(f"{url}: {why}")
    if fingerprint(manifest["splits"], manifest["items_sha256"]) != manifest["fingerprint"]:
        problems.append(f"{resolve(location, MANIFEST)}: fingerprint does not match the shard hashes")
    return checked, problems
