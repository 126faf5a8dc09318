"""``recgpt shards build``: interaction log -> filters -> leave-one-out -> WebDataset shards + manifest.

Records are packed ``records_per_member`` per tar member (``<split>-<shard>-<member>.records.json``, a
JSON list) because a tar header costs ~1 KiB per member; every member but the last of a shard is full,
which lets the reader find a record's member without reading the shard. Shards roll over at a size cap.
Tar files are byte-reproducible (fixed mtime/owner), so the same input gives the same fingerprint.

The build writes into a temporary directory beside ``out`` and renames it at the end: a crash leaves
no manifest pointing at partial shards. ``out`` may be an fsspec URL (``s3://bucket/prefix``): the
build then happens in a local temporary directory and is uploaded through the storage layer, the
manifest last, so a reader never finds a manifest before every shard it names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from webdataset import TarWriter

from configs import ConfigError, DataError, ShardsConfig, sha256_bytes, sha256_file
from data_shards import columnar, storage
from data_shards.incremental import (
    HISTORIES,
    check_chronology,
    check_id_source,
    common_unit,
    period_records,
    period_sequences,
    read_base,
)
from data_shards.ingest import REMOVAL_REASONS, Interactions, read_interactions
from data_shards.manifest import FORMAT_VERSION, ITEMS, MANIFEST, MEMBER_EXT, SPLITS, fingerprint
from data_shards.records import Record
from data_shards.split import apply_filters, eval_records, sequences, train_records, user_histories

_TAR_BLOCK, _TAR_RECORD = 512, 10240  # tarfile pads the archive (2 end blocks included) to whole records


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _tar_file_bytes(member_bytes: int) -> int:
    """Size on disk of a tar holding members of ``member_bytes`` in total."""
    return _round_up(member_bytes + 2 * _TAR_BLOCK, _TAR_RECORD)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class _ShardSink:
    """Packs records into tar members and members into size-capped shards of one split."""

    def __init__(self, root: Path, split: str, records_per_member: int, max_shard_bytes: int) -> None:
        self.root, self.split = root, split
        self.per_member, self.max_bytes = records_per_member, max_shard_bytes
        self.buffer: list[Record] = []
        self.shards: list[dict[str, Any]] = []
        self.writer: TarWriter | None = None

    def add(self, record: Record) -> None:
        self.buffer.append(record)
        if len(self.buffer) == self.per_member:
            self._flush_member()

    def _flush_member(self) -> None:
        self.add_member(_json(self.buffer), len(self.buffer))
        self.buffer = []

    def add_member(self, payload: bytes, count: int) -> None:
        """One tar member of ``count`` records (``payload``: their JSON list)."""
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
        self.records += count

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
                "sha256": sha256_file(full),
            }
        )

    def close(self) -> dict[str, Any]:
        if self.buffer:
            self._flush_member()
        if self.writer is not None:
            self._close_shard()
        return {"records": sum(s["records"] for s in self.shards), "shards": self.shards}


def write_split(
    root: Path, split: str, records: Iterable[Record], records_per_member: int, max_shard_bytes: int
) -> dict[str, Any]:
    """Write one split's shards under ``root/split``; the manifest entry ``{records, shards: [...]}``."""
    (root / split).mkdir(parents=True, exist_ok=True)
    sink = _ShardSink(root, split, records_per_member, max_shard_bytes)
    for record in records:
        sink.add(record)
    return sink.close()


def row_counts(
    logs: Interactions, removed_by: dict[str, int], kept: pd.DataFrame, keep: bool = False
) -> dict[str, Any]:
    """What happened to every row of the interaction log: ``read`` = ``kept`` + sum of ``removed`` by
    reason (in the order they apply); ``duplicates_kept``: kept rows repeating an earlier one (only
    ``keep``: shards.duplicates=keep; other modes leave none)."""
    removed = {**logs.removed, **removed_by}
    rows = {
        "read": logs.rows_read,
        "kept": len(kept),
        "removed": {reason: int(removed.get(reason, 0)) for reason in REMOVAL_REASONS},
        "duplicates_kept": int(kept.duplicated(["user", "item", "timestamp"]).sum()) if keep else 0,
    }
    if rows["read"] != rows["kept"] + sum(rows["removed"].values()):  # a reader forgot to count something
        raise AssertionError(f"row counts do not reconcile: {rows}")
    return rows


@dataclass
class Parts:
    """What an engine hands to the writer: the manifest's counts and a function writing the files
    (``write(dir)`` -> (items.jsonl sha256, histories.jsonl sha256, the manifest's ``splits``))."""

    source: dict[str, Any]
    filters: dict[str, Any]
    rows: dict[str, Any]
    unit: str
    num_users: int
    num_items: int
    num_interactions: int
    rating_levels: list[float]
    write: Callable[[Path], tuple[str, str, dict[str, Any]]]  # dir -> (items sha, histories sha, splits)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # base, period


def source_entry(input_path: str | os.PathLike, logs: Any) -> dict[str, Any]:
    return {
        "input": str(input_path),
        "format": logs.format,
        "files": logs.files,
        "skipped_lines": logs.skipped_lines,
        "metadata_items": len(logs.titles),
        **logs.time,
        "notices": logs.notices,
    }


def _reference_parts(input_path: str | os.PathLike, cfg: ShardsConfig, base: Any) -> Parts:
    """The reference engine (``shards.engine=python``, and every periodic build): pandas frames and one
    Python dict per record."""
    max_history, window_stride, prefix_records = cfg.max_history, cfg.window_stride, cfg.prefix_records
    logs = read_interactions(input_path, cfg)
    unit = logs.timestamp_unit
    if base is None:
        frame, filter_stats = apply_filters(logs.frame, cfg)
        seqs = sequences(frame)
    else:
        check_id_source(base.location, base.manifest, logs.format, cfg)
        known_users, known_items = set(base.users), {str(it["item_id"]) for it in base.items}
        frame, filter_stats = apply_filters(logs.frame, cfg, known_users, known_items)
        unit, base_scale, new_scale = common_unit(base.manifest.get("timestamp_unit", "s"), unit)
        frame = frame.assign(timestamp=frame["timestamp"] * new_scale)
        seqs = period_sequences(frame, base)
        check_chronology(seqs, base, str(input_path))
        period = period_records(seqs, base, cfg, base_scale)
    rows = row_counts(logs, filter_stats.pop("removed_by"), frame, keep=cfg.duplicates == "keep")

    def write(tmp: Path) -> tuple[str, str, dict[str, Any]]:
        known = base.items if base is not None else []
        items_bytes = b"".join(
            _json(
                {
                    "index": i,
                    "item_id": str(item_id),
                    # base items keep their title and metadata unless the new period's metadata has them
                    "title": logs.titles.get(str(item_id), "")
                    or (known[i]["title"] if i < len(known) else ""),
                    "count": int(seqs.item_counts[i]),
                    "meta": logs.meta.get(str(item_id))
                    or (known[i].get("meta", {}) if i < len(known) else {}),
                }
            )
            + b"\n"
            for i, item_id in enumerate(seqs.items)
        )
        (tmp / ITEMS).write_bytes(items_bytes)
        if base is None:
            sources = {
                "train": train_records(seqs, max_history, prefix_records, window_stride),
                "valid": eval_records(seqs, "valid", max_history),
                "test": eval_records(seqs, "test", max_history),
            }
            histories = user_histories(seqs, max_history)
        else:
            sources = {"train": period.train, "valid": period.valid, "test": period.test}
            histories = period.histories
        histories_bytes = b"".join(_json(h) + b"\n" for h in histories)
        (tmp / HISTORIES).write_bytes(histories_bytes)
        per_member, max_bytes = cfg.records_per_member, cfg.max_shard_bytes
        splits = {s: write_split(tmp, s, sources[s], per_member, max_bytes) for s in SPLITS}
        return sha256_bytes(items_bytes), sha256_bytes(histories_bytes), splits

    extra: dict[str, Any] = {}
    if base is not None:
        extra["base"] = {
            "location": base.location,
            "fingerprint": base.manifest["fingerprint"],
            "num_users": base.manifest["num_users"],
            "num_items": base.manifest["num_items"],
            "num_interactions": base.manifest["num_interactions"],
        }
        extra["period"] = {
            "interactions": len(seqs.item_idx),
            "first_timestamp": int(seqs.timestamps.min()),
            "last_timestamp": int(seqs.timestamps.max()),
            "carry_base_train": cfg.carry_base_train,
            **period.stats,
        }
    return Parts(
        source=source_entry(input_path, logs),
        filters=filter_stats,
        rows=rows,
        unit=unit,
        num_users=len(seqs.users),
        num_items=len(seqs.items),
        num_interactions=len(seqs.item_idx) + (base.manifest["num_interactions"] if base else 0),
        rating_levels=sorted(
            set(seqs.ratings.tolist()) | set(base.manifest.get("rating_levels", []) if base else [])
        ),
        write=write,
        extra=extra,
    )


class _Packer:
    """Packs record texts (JSON objects each followed by a comma, back to back) into tar members of
    ``records_per_member`` records: a member is ``[`` + its records without the last comma + ``]``,
    the bytes ``json.dumps`` gives the list of those records."""

    def __init__(self, sink: _ShardSink) -> None:
        self.sink, self.pieces, self.count = sink, [], 0

    def add(self, texts: Any) -> None:
        data, off = columnar.text_bytes(texts)
        i, n = 0, len(off) - 1
        while i < n:
            take = min(self.sink.per_member - self.count, n - i)
            self.pieces.append(data[off[i] : off[i + take]])
            self.count += take
            i += take
            if self.count == self.sink.per_member:
                self._emit()

    def _emit(self) -> None:
        body = b"".join(self.pieces)
        self.sink.add_member(b"[" + body[:-1] + b"]", self.count)
        self.pieces, self.count = [], 0

    def close(self) -> dict[str, Any]:
        if self.count:
            self._emit()
        return self.sink.close()


def write_texts(
    root: Path, cfg: ShardsConfig, pieces: Iterable[tuple[str, Any]]
) -> tuple[str, dict[str, Any]]:
    """Write record texts into each split's shards under ``root`` and history lines into
    ``histories.jsonl``, each in the order they come: (histories sha256, the manifest's ``splits``).

    ``pieces``: (split or columnar.HISTORY_LINES, Arrow string array); a record text ends with a comma
    (:class:`_Packer`), a history line with a newline. Splits may interleave; within a split the order is
    the output's. Both columnar engines (local and Ray) write through here."""
    packers = {}
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
        packers[split] = _Packer(_ShardSink(root, split, cfg.records_per_member, cfg.max_shard_bytes))
    h = hashlib.sha256()
    with open(root / HISTORIES, "wb") as f:
        for kind, texts in pieces:
            if kind != columnar.HISTORY_LINES:
                packers[kind].add(texts)
                continue
            data, off = columnar.text_bytes(texts)
            chunk = data[off[0] : off[-1]]
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest(), {s: packers[s].close() for s in SPLITS}


def _local_parts(input_path: str | os.PathLike, cfg: ShardsConfig) -> Parts:
    """The columnar engine (``shards.engine=local``, :mod:`data_shards.columnar`)."""
    prep = columnar.prepare(input_path, cfg)
    kept, src = prep.kept, prep.source

    def pieces() -> Iterator[tuple[str, Any]]:
        texts = columnar.RecordTexts(kept)
        for chunk in columnar.train_chunks(kept, texts, cfg):
            yield "train", chunk
        for _, valid, test, history in columnar.eval_chunks(kept, texts, cfg.max_history):
            yield "valid", valid
            yield "test", test
            yield columnar.HISTORY_LINES, history

    def write(tmp: Path) -> tuple[str, str, dict[str, Any]]:
        items_bytes = columnar.items_lines(kept.items, kept.item_counts, src.titles, src.meta)
        (tmp / ITEMS).write_bytes(items_bytes)
        histories_sha, splits = write_texts(tmp, cfg, pieces())
        return sha256_bytes(items_bytes), histories_sha, splits

    return Parts(
        source=source_entry(input_path, src),
        filters=prep.filters,
        rows=prep.rows,
        unit=src.unit,
        num_users=len(kept.users),
        num_items=len(kept.items),
        num_interactions=len(kept.uid),
        rating_levels=kept.levels[np.unique(kept.rating)].tolist(),
        write=write,
    )


def build_shards(
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ShardsConfig | None = None,
    *,
    force: bool = False,
    command: str = "",
    engine: Callable[[str | os.PathLike, ShardsConfig], Parts] | None = None,
) -> dict[str, Any]:
    """Build a shard directory at ``out`` (atomically) from the logs at ``input_path``; returns the manifest.

    ``cfg`` (default: every ``shards.*`` default) says how to read, filter, split and pack; it is
    recorded in the manifest (``shards_config``) with ``command``, the command line that rebuilds it.
    ``force`` replaces a non-empty ``out``. ``shards.engine`` picks the engine: ``local`` (the columnar
    one, :mod:`data_shards.columnar`), ``python`` (the reference) or ``ray`` (``engine``: the Ray Data
    pipeline of :mod:`launcher.ray_shards`, which this layer may not import; ConfigError without it);
    all write the same bytes. With ``shards.base`` the input holds only a new period and the build
    continues the base (:mod:`data_shards.incremental`, on the reference engine). Raises DataError
    naming the file, line or key.
    """
    cfg = cfg or ShardsConfig()
    remote = storage.is_url(out)
    if remote:
        out = str(out)
        if storage.listdir(out) and not force:  # also: the bucket exists and the credentials work
            raise DataError(f"{out}: already exists and is not empty (--force replaces it)")
    else:
        out = Path(out)
        if out.exists() and any(out.iterdir()) and not force:
            raise DataError(f"{out}: already exists and is not empty (--force replaces it)")

    base = read_base(str(cfg.base), cfg) if cfg.base else None  # first: a bad base fails at once
    # One dispatch: the columnar engine, or the reference path (asked for, or a periodic build).
    if base is None and cfg.engine == "local":
        parts = _local_parts(input_path, cfg)
    elif base is None and cfg.engine == "ray":
        if engine is None:
            raise ConfigError(
                "shards.engine: ray runs from the launcher (recgpt shards build --engine ray), which "
                "connects to Ray"
            )
        parts = engine(input_path, cfg)
    else:
        parts = _reference_parts(input_path, cfg, base)

    if remote:  # built locally, then uploaded (manifest last)
        scratch = Path(tempfile.mkdtemp(prefix="recgpt-shards-"))
        tmp = scratch / "build"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        items_sha, histories_sha, splits = parts.write(tmp)
        prefix_records = cfg.prefix_records
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": parts.source,
            "command": command,
            "shards_config": dataclasses.asdict(cfg),
            "filters": parts.filters,
            "rows": parts.rows,
            "max_history": cfg.max_history,
            "train_records": "prefix" if prefix_records else "windows",
            "window_stride": None if prefix_records else (cfg.window_stride or cfg.max_history),
            "records_per_member": cfg.records_per_member,
            "num_users": parts.num_users,
            "num_items": parts.num_items,
            "num_interactions": parts.num_interactions,
            "timestamp_unit": parts.unit,
            "rating_levels": parts.rating_levels,
            "items_file": ITEMS,
            "items_sha256": items_sha,
            "histories_file": HISTORIES,
            "histories_sha256": histories_sha,
            "fingerprint": fingerprint(splits, items_sha),
            "splits": splits,
            **parts.extra,
        }
        # The manifest is written last and the directory renamed whole (an object store: uploaded
        # last): readers never see a partial build.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        storage.publish(tmp, out, marker=MANIFEST, force=force)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if remote:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest
