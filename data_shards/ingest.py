"""Interaction-log readers: MovieLens (100K, 1M/10M, ml-latest), Amazon reviews JSONL (2018, 2023) and
generic CSV/Parquet with a column mapping.

Every reader returns :class:`Interactions`: one row per interaction in **original file order** (the
leave-one-out tie-break needs it) plus item titles/metadata when the source has them. Input may be a
directory, a single file or a ``.zip``; the format is detected from file names. A malformed line raises
:class:`DataError` naming the file, line and field, or is counted and skipped with ``skip_bad_lines``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs import DataError, ShardsConfig
from configs.schema import INPUT_FORMATS

FORMATS = tuple(f for f in INPUT_FORMATS if f != "auto")

# ML-100K u.item: 5 descriptive columns, then one 0/1 flag per genre in this order.
ML100K_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir "
    "Horror Musical Mystery Romance Sci-Fi Thriller War Western"
).split()


@dataclass(frozen=True)
class InputFile:
    """One readable file of the input: a path, or a member of a ``.zip``."""

    name: str  # shown in error messages: path, or archive.zip/member
    path: str
    member: str | None = None

    @property
    def basename(self) -> str:
        return os.path.basename(self.member or self.path)

    def read_bytes(self) -> bytes:
        if self.member is not None:
            with zipfile.ZipFile(self.path) as zf:
                data = zf.read(self.member)
        else:
            data = Path(self.path).read_bytes()
        return gzip.decompress(data) if self.basename.endswith(".gz") else data


@dataclass
class Interactions:
    """Parsed interactions (file order) and item metadata."""

    frame: pd.DataFrame  # columns: user (str), item (str), rating (float64), timestamp (int64)
    titles: dict[str, str] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = ""
    files: list[str] = field(default_factory=list)
    skipped_lines: int = 0


# --------------------------------------------------------------------------- input files


def list_files(path: str | os.PathLike) -> list[InputFile]:
    """Every file of a directory (recursive, sorted), of a ``.zip``, or the single file itself."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        return [
            InputFile(str(f), str(f))
            for f in sorted(p.rglob("*"))
            if f.is_file()
            and not any(part.startswith(".") or part == "__MACOSX" for part in f.relative_to(p).parts)
        ]
    if p.suffix == ".zip":
        try:
            with zipfile.ZipFile(p) as zf:
                members = [m for m in zf.namelist() if not m.endswith("/") and "__MACOSX" not in m]
        except zipfile.BadZipFile as e:
            raise DataError(f"{p}: not a readable zip archive ({e})") from None
        return [InputFile(f"{p}/{m}", str(p), m) for m in sorted(members)]
    return [InputFile(str(p), str(p))]


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _is_json(f: InputFile) -> bool:
    return _strip_gz(f.basename).endswith((".json", ".jsonl"))


def _first_json_keys(f: InputFile) -> set[str]:
    for line in f.read_bytes().splitlines():
        if line.strip():
            try:
                return set(json.loads(line))
            except (ValueError, TypeError):
                raise DataError(f"{f.name}: line 1: not a JSON object") from None
    raise DataError(f"{f.name}: empty file")


def _by_name(files: list[InputFile], *names: str) -> InputFile | None:
    for f in files:
        if f.basename in names:
            return f
    return None


def detect_format(files: list[InputFile], fmt: str = "auto") -> tuple[str, InputFile, InputFile | None]:
    """Pick the format, the interactions file and the item metadata file (or None) from file names."""
    listing = ", ".join(f.basename for f in files[:10]) or "no files"
    for name, meta, f in (("ml-100k", "u.item", "u.data"), ("ml-1m", "movies.dat", "ratings.dat")):
        if fmt in ("auto", name) and (main := _by_name(files, f)):
            return name, main, _by_name(files, meta)
    if fmt in ("auto", "ml-latest") and (main := _by_name(files, "ratings.csv")):
        return "ml-latest", main, _by_name(files, "movies.csv")
    if fmt in ("auto", "amazon-2018", "amazon-2023"):
        logs = [f for f in files if _is_json(f) and not f.basename.startswith("meta")]
        metas = [f for f in files if _is_json(f) and f.basename.startswith("meta")]
        if len(logs) == 1:
            keys = _first_json_keys(logs[0])
            if fmt == "auto":
                if {"reviewerID", "asin"} <= keys:
                    fmt = "amazon-2018"
                elif {"user_id", "parent_asin"} <= keys:
                    fmt = "amazon-2023"
                else:
                    raise DataError(
                        f"{logs[0].name}: line 1: unknown JSONL fields {sorted(keys)[:6]} "
                        "(Amazon 2018 has reviewerID/asin, 2023 user_id/parent_asin); set shards.format"
                    )
            return fmt, logs[0], metas[0] if len(metas) == 1 else None
    if fmt in ("auto", "parquet"):
        parquets = [f for f in files if f.basename.endswith(".parquet")]
        if len(parquets) == 1:
            return "parquet", parquets[0], None
    if fmt in ("auto", "csv"):
        csvs = [f for f in files if _strip_gz(f.basename).endswith((".csv", ".tsv"))]
        if len(csvs) == 1:
            return "csv", csvs[0], None
    wanted = "a known format" if fmt == "auto" else f"format {fmt}"
    raise DataError(
        f"cannot find {wanted} among the input files ({listing}): expected u.data (ML-100K), ratings.dat "
        "(ML-1M/10M), ratings.csv (ml-latest), one Amazon *.jsonl, one *.parquet or one *.csv; "
        "set shards.format to choose"
    )


# --------------------------------------------------------------------------- delimited text


def _read_table(
    f: InputFile, *, sep: str, names: list[str] | None, encoding: str = "utf-8", skip_bad: bool = False
) -> tuple[pd.DataFrame, int]:
    """All columns as strings plus a ``_line`` column (1-based line in the file); bad lines counted.

    pandas' C parser reports lines with too many fields; with ``skip_bad_lines`` off the first one is
    an error. Blank lines are dropped silently.
    """
    raw = f.read_bytes()
    if len(sep) > 1:  # "::" of ML-1M: the C parser needs one character
        raw, sep = raw.replace(sep.encode(), b"\x1f"), "\x1f"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            df = pd.read_csv(
                io.BytesIO(raw),
                sep=sep,
                header=None if names else 0,
                names=names,
                dtype=str,
                keep_default_na=False,
                skip_blank_lines=False,
                on_bad_lines="warn",
                encoding=encoding,
                quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE,
                engine="c",
            )
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
            raise DataError(f"{f.name}: cannot parse ({str(e).splitlines()[0]})") from None
    bad = [
        (int(n), msg) for w in caught for n, msg in re.findall(r"Skipping line (\d+): (.*)", str(w.message))
    ]
    if bad and not skip_bad:
        n, msg = bad[0]
        raise DataError(f"{f.name}: line {n}: {msg} (shards.skip_bad_lines=true skips such lines)")
    first = 1 if names else 2
    lines = np.arange(first, first + len(df) + len(bad))
    df["_line"] = lines[~np.isin(lines, [n for n, _ in bad])]
    data_cols = [c for c in df.columns if c != "_line"]
    blank = (df[data_cols] == "").all(axis=1)
    return df[~blank].reset_index(drop=True), len(bad)


def _require_columns(df: pd.DataFrame, f: InputFile, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        found = [c for c in df.columns if c != "_line"]
        raise DataError(f"{f.name}: line 1: missing column {missing[0]!r} (found: {', '.join(found)})")


def _to_time(values: pd.Series) -> pd.Series:
    """Integer timestamps as given; ISO dates become Unix seconds."""
    num = pd.to_numeric(values, errors="coerce")
    if num.isna().all() and len(values):
        dt = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
        return (dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return num


def _validated(
    df: pd.DataFrame, f: InputFile, cols: dict[str, str | None], skip_bad: bool
) -> tuple[pd.DataFrame, int]:
    """Map source columns to user/item/rating/timestamp, checking every value; returns (frame, skipped)."""
    out = pd.DataFrame(
        {
            "user": df[cols["user"]].astype(str).str.strip(),
            "item": df[cols["item"]].astype(str).str.strip(),
            "rating": pd.to_numeric(df[cols["rating"]], errors="coerce") if cols.get("rating") else 1.0,
            "timestamp": _to_time(df[cols["time"]]),
        }
    )
    checks = {
        cols["user"]: out["user"].isin(["", "nan", "None"]),
        cols["item"]: out["item"].isin(["", "nan", "None"]),
        cols["time"]: out["timestamp"].isna(),
    }
    if cols.get("rating"):
        checks[cols["rating"]] = out["rating"].isna()
    bad = np.zeros(len(out), dtype=bool)
    for col, mask in checks.items():
        mask = mask.to_numpy()
        if mask.any() and not skip_bad:
            i = int(np.argmax(mask))
            where = f"line {df['_line'].iat[i]}" if "_line" in df else f"row {i + 1}"
            raise DataError(
                f"{f.name}: {where}: field {col!r}: bad value {df[col].iat[i]!r} (shards.skip_bad_lines=true skips such lines)"
            )
        bad |= mask
    out = out[~bad]
    out = out.astype({"rating": "float64", "timestamp": "int64"})
    return out.reset_index(drop=True), int(bad.sum())


# --------------------------------------------------------------------------- JSON lines


def _json_lines(
    f: InputFile, fields: list[str], skip_bad: bool, optional: tuple[str, ...] = ()
) -> tuple[list[tuple], int]:
    """The requested fields of every JSON line, prefixed by the line number; (rows, skipped lines)."""
    rows, skipped = [], 0
    for n, line in enumerate(f.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if skip_bad:
                skipped += 1
                continue
            raise DataError(f"{f.name}: line {n}: not valid JSON ({str(e).splitlines()[0]})") from None
        missing = next((k for k in fields if k not in obj and k not in optional), None)
        if missing is not None:
            if skip_bad:
                skipped += 1
                continue
            raise DataError(f"{f.name}: line {n}: missing field {missing!r}")
        rows.append((n, *(obj.get(k) for k in fields)))
    return rows, skipped


def _read_amazon(log: InputFile, meta: InputFile | None, fmt: str, skip_bad: bool) -> Interactions:
    user, item, rating, time, meta_item = (
        ("reviewerID", "asin", "overall", "unixReviewTime", "asin")
        if fmt == "amazon-2018"
        else ("user_id", "parent_asin", "rating", "timestamp", "parent_asin")
    )
    rows, skipped = _json_lines(log, [user, item, rating, time], skip_bad)
    df = pd.DataFrame(rows, columns=["_line", user, item, rating, time]).astype(
        {user: str, item: str, rating: str, time: str}
    )
    frame, bad = _validated(df, log, {"user": user, "item": item, "rating": rating, "time": time}, skip_bad)
    titles: dict[str, str] = {}
    item_meta: dict[str, dict[str, Any]] = {}
    if meta is not None:
        meta_rows, meta_skipped = _json_lines(
            meta, [meta_item, "title", "main_category"], skip_bad, optional=("title", "main_category")
        )
        for _, asin, title, category in meta_rows:
            if title:
                titles[str(asin)] = str(title)
            if category:
                item_meta[str(asin)] = {"category": category}
        skipped += meta_skipped
    return Interactions(
        frame, titles, item_meta, fmt, [log.name] + ([meta.name] if meta else []), skipped + bad
    )


# --------------------------------------------------------------------------- readers


def _read_movielens(log: InputFile, meta: InputFile | None, fmt: str, skip_bad: bool) -> Interactions:
    cols = {"user": "user", "item": "item", "rating": "rating", "time": "timestamp"}
    if fmt == "ml-latest":
        df, skipped = _read_table(log, sep=",", names=None, skip_bad=skip_bad)
        cols = {"user": "userId", "item": "movieId", "rating": "rating", "time": "timestamp"}
        _require_columns(df, log, list(cols.values()))
    else:
        sep, enc = ("\t", "latin-1") if fmt == "ml-100k" else ("::", "latin-1")
        df, skipped = _read_table(
            log, sep=sep, names=["user", "item", "rating", "timestamp"], encoding=enc, skip_bad=skip_bad
        )
    frame, bad = _validated(df, log, cols, skip_bad)
    titles: dict[str, str] = {}
    item_meta: dict[str, dict[str, Any]] = {}
    if meta is not None:
        if fmt == "ml-100k":
            m, s = _read_table(
                meta,
                sep="|",
                names=["item", "title", "date", "video", "url", *ML100K_GENRES],
                encoding="latin-1",
                skip_bad=skip_bad,
            )
            genres = m[list(ML100K_GENRES)].to_numpy() == "1"
            m["genres"] = ["|".join(np.array(ML100K_GENRES)[row]) for row in genres]
        elif fmt == "ml-1m":
            m, s = _read_table(
                meta, sep="::", names=["item", "title", "genres"], encoding="latin-1", skip_bad=skip_bad
            )
        else:
            m, s = _read_table(meta, sep=",", names=None, skip_bad=skip_bad)
            _require_columns(m, meta, ["movieId", "title", "genres"])
            m = m.rename(columns={"movieId": "item"})
        skipped += s
        for item_id, title, genres in zip(m["item"].str.strip(), m["title"], m["genres"]):
            titles[item_id] = title
            item_meta[item_id] = {"genres": genres}
    return Interactions(
        frame, titles, item_meta, fmt, [log.name] + ([meta.name] if meta else []), skipped + bad
    )


def _read_generic(log: InputFile, fmt: str, cfg: ShardsConfig) -> Interactions:
    cols = {"user": cfg.user_col, "item": cfg.item_col, "rating": cfg.rating_col, "time": cfg.time_col}
    wanted = [c for c in (*cols.values(), cfg.title_col) if c]
    skip_bad = cfg.skip_bad_lines
    if fmt == "parquet":
        try:
            df = pd.read_parquet(io.BytesIO(log.read_bytes()))
        except Exception as e:  # pyarrow raises many types for a damaged file
            raise DataError(f"{log.name}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        _require_columns(df, log, wanted)
        df = df[wanted].astype(str)
        skipped = 0
    else:
        sep = "\t" if _strip_gz(log.basename).endswith(".tsv") else ","
        df, skipped = _read_table(log, sep=sep, names=None, skip_bad=skip_bad)
        _require_columns(df, log, wanted)
    frame, bad = _validated(df, log, cols, skip_bad)
    titles = {}
    if cfg.title_col:
        pairs = zip(df[cfg.item_col].astype(str).str.strip(), df[cfg.title_col].astype(str))
        titles = {item: title for item, title in pairs if title and title != "None"}
    return Interactions(frame, titles, {}, fmt, [log.name], skipped + bad)


def read_interactions(path: str | os.PathLike, cfg: ShardsConfig) -> Interactions:
    """Read an interaction log (directory, single file or ``.zip``) as ``cfg`` says: ``shards.format``
    (auto-detected from file names), ``shards.meta``, the generic column mapping ``shards.*_col`` and
    ``shards.skip_bad_lines``. Raises DataError naming the file (and line) of the first bad input."""
    fmt, meta, skip_bad_lines = cfg.format, cfg.meta, cfg.skip_bad_lines
    files = list_files(path)
    if Path(path).is_file() and Path(path).suffix != ".zip":
        # A single log file: its metadata file (movies.csv, u.item, meta_*.jsonl) sits beside it.
        siblings = [f for f in list_files(Path(path).parent) if f.path != files[0].path]
        fmt, log, meta_file = detect_format(files, fmt)
        if meta_file is None and fmt not in ("csv", "parquet"):
            names = {"ml-100k": ("u.item",), "ml-1m": ("movies.dat",), "ml-latest": ("movies.csv",)}
            if fmt.startswith("amazon"):
                meta_file = next((f for f in siblings if _is_json(f) and f.basename.startswith("meta")), None)
            else:
                meta_file = _by_name(siblings, *names[fmt])
    else:
        fmt, log, meta_file = detect_format(files, fmt)
    if meta is not None:
        meta_file = list_files(meta)[0]
    readers: dict[str, Callable[[], Interactions]] = {
        "amazon": lambda: _read_amazon(log, meta_file, fmt, skip_bad_lines),
        "ml": lambda: _read_movielens(log, meta_file, fmt, skip_bad_lines),
        "generic": lambda: _read_generic(log, fmt, cfg),
    }
    kind = "amazon" if fmt.startswith("amazon") else "ml" if fmt.startswith("ml") else "generic"
    result = readers[kind]()
    if result.frame.empty:
        raise DataError(f"{log.name}: no interactions found")
    return result
