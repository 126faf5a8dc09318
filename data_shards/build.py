"""``recgpt shards build``: interaction log -> filters -> leave-one-out -> WebDataset shards + manifest.

Records are packed ``records_per_member`` per tar member (``<split>-<shard>-<member>.records.json``, a
JSON list) because a tar header costs ~1 KiB per member; every member but the last of a shard is full,
which lets the reader find a record's member without reading the shard. Shards roll over at a size cap.
Tar files are byte-reproducible (fixed mtime/owner), so the same input gives the same fingerprint.

The build writes into a temporary directory beside ``out`` and renames it at the end: a crash leaves
no manifest pointing at partial shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from webdataset import TarWriter

from configs import DataError
from data_shards.ingest import Columns, read_interactions
from data_shards.manifest import FORMAT_VERSION, ITEMS, MANIFEST, MEMBER_EXT, SPLITS, fingerprint
from data_shards.split import Filters, apply_filters, eval_records, sequences, train_records

_TAR_BLOCK, _TAR_RECORD = 512, 10240  # tarfile pads the archive (2 end blocks included) to whole records


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _tar_file_bytes(member_bytes: int) -> int:
    """Size on disk of a tar holding members of ``member_bytes`` in total."""
    return _round_up(member_bytes + 2 * _TAR_BLOCK, _TAR_RECORD)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _ShardSink:
    """Packs records into tar members and members into size-capped shards of one split."""

    def __init__(self, root: Path, split: str, records_per_member: int, max_shard_bytes: int) -> None:
        self.root, self.split = root, split
        self.per_member, self.max_bytes = records_per_member, max_shard_bytes
        self.buffer: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []
        self.writer: TarWriter | None = None

    def add(self, record: dict[str, Any]) -> None:
        self.buffer.append(record)
        if len(self.buffer) == self.per_member:
            self._flush_member()

    def _flush_member(self) -> None:
        payload = _json(self.buffer)
        member_bytes = _TAR_BLOCK + _round_up(len(payload), _TAR_BLOCK)  # header + padded data
        if self.writer is not None and _tar_file_bytes(self.size + member_bytes) > self.max_bytes:
            self._close_shard()
        if self.writer is None:
            self.path = f"{self.split}/{self.split}-{len(self.shards):06d}.tar"
            self.file = open(self.root / self.path, "wb")
            self.writer = TarWriter(self.file, encoder=False, mtime=0, user="recgpt", group="recgpt")
            self.size, self.members, self.records = 0, 0, 0
        key = f"{self.split}-{len(self.shards):06d}-{self.members:06d}"
        self.writer.write({"__key__": key, MEMBER_EXT: payload})
        self.size += member_bytes
        self.members += 1
        self.records += len(self.buffer)
        self.buffer = []

    def _close_shard(self) -> None:
        assert self.writer is not None
        self.writer.close()
        self.file.close()
        self.writer = None
        full = self.root / self.path
        self.shards.append(
            {
                "path": self.path,
                "records": self.records,
                "bytes": full.stat().st_size,
                "sha256": _sha256(full),
            }
        )

    def close(self) -> dict[str, Any]:
        if self.buffer:
            self._flush_member()
        if self.writer is not None:
            self._close_shard()
        return {"records": sum(s["records"] for s in self.shards), "shards": self.shards}


def write_split(
    root: Path, split: str, records: Iterable[dict[str, Any]], records_per_member: int, max_shard_bytes: int
) -> dict[str, Any]:
    """Write one split's shards under ``root/split``; the manifest entry ``{records, shards: [...]}``."""
    (root / split).mkdir(parents=True, exist_ok=True)
    sink = _ShardSink(root, split, records_per_member, max_shard_bytes)
    for record in records:
        sink.add(record)
    return sink.close()


def build_shards(
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "auto",
    meta: str | None = None,
    columns: Columns = Columns(),
    filters: Filters = Filters(),
    max_history: int = 50,
    prefix_records: bool = False,
    window_stride: int | None = None,
    records_per_member: int = 256,
    max_shard_bytes: int = 16 << 20,
    skip_bad_lines: bool = False,
    force: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Build a shard directory at ``out`` (atomically) and return its manifest."""
    if max_history < 1:
        raise DataError(f"--max-history: got {max_history}, must be >= 1")
    if window_stride is not None and not 1 <= window_stride <= max_history:
        raise DataError(f"--window-stride: got {window_stride}, must be in 1..--max-history ({max_history})")
    if records_per_member < 1:
        raise DataError(f"--records-per-member: got {records_per_member}, must be >= 1")
    if max_shard_bytes < 2 * _TAR_RECORD:
        raise DataError(f"--max-shard-mb: got {max_shard_bytes / 2**20:g}, must hold at least one tar member")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"{out}: already exists and is not empty (pass --force to replace it)")

    logs = read_interactions(input_path, fmt, meta, columns, skip_bad_lines)
    frame, filter_stats = apply_filters(logs.frame, filters)
    seqs = sequences(frame)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        items_bytes = b"".join(
            _json(
                {
                    "index": i,
                    "item_id": str(item_id),
                    "title": logs.titles.get(str(item_id), ""),
                    "count": int(seqs.item_counts[i]),
                    "meta": logs.meta.get(str(item_id), {}),
                }
            )
            + b"\n"
            for i, item_id in enumerate(seqs.items)
        )
        (tmp / ITEMS).write_bytes(items_bytes)
        sources = {
            "train": train_records(seqs, max_history, prefix_records, window_stride),
            "valid": eval_records(seqs, "valid", max_history),
            "test": eval_records(seqs, "test", max_history),
        }
        splits = {s: write_split(tmp, s, sources[s], records_per_member, max_shard_bytes) for s in SPLITS}
        items_sha = hashlib.sha256(items_bytes).hexdigest()
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": {
                "input": str(input_path),
                "format": logs.format,
                "files": logs.files,
                "skipped_lines": logs.skipped_lines,
                "metadata_items": len(logs.titles),
            },
            "command": command,
            "filters": filter_stats,
            "max_history": max_history,
            "train_records": "prefix" if prefix_records else "windows",
            "window_stride": None if prefix_records else (window_stride or max_history),
            "records_per_member": records_per_member,
            "num_users": len(seqs.users),
            "num_items": len(seqs.items),
            "num_interactions": len(seqs.item_idx),
            "rating_levels": sorted(set(seqs.ratings.tolist())),
            "items_file": ITEMS,
            "items_sha256": items_sha,
            "fingerprint": fingerprint(splits, items_sha),
            "splits": splits,
        }
        # The manifest is written last and the directory renamed whole: readers never see a partial build.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
