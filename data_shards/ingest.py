"""Interaction-log readers: MovieLens (100K, 1M/10M, ml-latest), Amazon reviews JSONL (2018, 2023),
generic CSV/Parquet/JSON lines with a column mapping, and the academic sequence files: ``s3rec`` (one
line per user, ``user item item …`` in time order: the S3-Rec preprocessing many papers reuse) and
``sasrec`` (one interaction per line, ``user item``, in time order: SASRec's data files).

Every reader returns :class:`Interactions`: one row per interaction in **original file order** (the
leave-one-out tie-break needs it) plus item titles/metadata when the source has them. Input may be a
directory, a single file or a ``.zip``; the format is detected from file names. Every read or decode
failure (zip, gzip, text encoding, CSV, JSON, Parquet) is a :class:`DataError` naming the file (and line).
A line that cannot be parsed or lacks a value raises a DataError naming the file, line and field, or is
counted and skipped with ``skip_bad_lines``; exact duplicates (user, item, timestamp) are dropped and
counted, kept or refused (``shards.duplicates``). ``Interactions.rows`` says what happened to every row.

Timestamps keep their full resolution: epoch numbers are parsed from their text exactly (a decimal
``1700000040.900`` is 1700000040900 ms, never a float), ISO 8601 strings and Parquet timestamp columns
become integers of their own unit (UTC; a time without an offset is read as UTC). The frame holds int64
in the coarsest of s/ms/us/ns that represents every time exactly (``Interactions.timestamp_unit``): the
same events give the same integers whichever way they are written, and MovieLens seconds stay seconds.
Digits finer than a nanosecond are cut.
"""

from __future__ import annotations

import csv
import decimal
import gzip
import io
import json
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from configs import DataError, ShardsConfig, one_line
from configs.schema import INPUT_FORMATS, TIME_UNITS

FORMATS = tuple(f for f in INPUT_FORMATS if f != "auto")
GZIP_MAGIC = b"\x1f\x8b"

# ML-100K u.item: 5 descriptive columns, then one 0/1 flag per genre in this order.
ML100K_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir "
    "Horror Musical Mystery Romance Sci-Fi Thriller War Western"
).split()

# The unit of epoch numbers each format documents (generic formats: from the magnitude).
FORMAT_TIME_UNIT = {"ml-100k": "s", "ml-1m": "s", "ml-latest": "s", "amazon-2018": "s", "amazon-2023": "ms"}
_EXP = {u: 3 * i for i, u in enumerate(TIME_UNITS)}  # s 0, ms 3, us 6, ns 9 (digits after the second)
# Row removal reasons in the order they apply (ingest: the first three; split: the rest).
REMOVAL_REASONS = ("bad_line", "missing_value", "duplicate", "rating_threshold", "too_short", "k_core")


@dataclass(frozen=True)
class InputFile:
    """One readable file of the input: a path, or a member of a ``.zip``."""

    name: str  # shown in error messages: path, or archive.zip/member
    path: str
    member: str | None = None

    @property
    def basename(self) -> str:
        return os.path.basename(self.member or self.path)

    def _raw(self, n: int = -1) -> bytes:
        """The stored bytes (all, or the first ``n``), errors as one DataError line."""
        try:
            if self.member is not None:
                with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as stream:
                    return stream.read(n)
            with open(self.path, "rb") as stream:
                return stream.read(n)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as e:
            raise DataError(f"{self.name}: cannot read ({one_line(e)})") from None

    @property
    def gzip_mislabelled(self) -> bool:
        """Named ``.gz`` but without the gzip magic bytes (already decompressed): read as it is."""
        return self.basename.endswith(".gz") and self._raw(2) != GZIP_MAGIC

    def _gunzip(self, read: Callable[[], bytes]) -> bytes:
        try:
            return read()
        except EOFError as e:
            raise DataError(f"{self.name}: truncated gzip data ({one_line(e)})") from None
        except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{self.name}: damaged gzip data ({one_line(e)})") from None

    def read_bytes(self) -> bytes:
        data = self._raw()
        if not self.basename.endswith(".gz") or not data.startswith(GZIP_MAGIC):
            return data
        return self._gunzip(lambda: gzip.decompress(data))

    def first_line(self) -> tuple[int, bytes] | None:
        """(line number, bytes) of the first non-blank line, read without decompressing the whole file."""
        size = 1 << 20
        if self.basename.endswith(".gz") and not self.gzip_mislabelled:

            def head() -> bytes:
                with gzip.GzipFile(fileobj=io.BytesIO(self._raw())) as stream:
                    return stream.read(size)

            data = self._gunzip(head)
        else:
            data = self._raw(size)
        lines = data.splitlines()[:-1] if len(data) == size else data.splitlines()  # the last may be cut
        found = next(((n, line) for n, line in enumerate(lines, start=1) if line.strip()), None)
        if found is None and len(data) == size:
            lines = self.read_bytes().splitlines()
            found = next(((n, line) for n, line in enumerate(lines, start=1) if line.strip()), None)
        return found


@dataclass
class Interactions:
    """Parsed interactions (file order) and item metadata."""

    # columns: user (str), item (str), rating (float64), timestamp (int64, in timestamp_unit),
    # line (int64: the line, or Parquet row, of the log file); the index is the file order
    frame: pd.DataFrame
    titles: dict[str, str] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = ""
    files: list[str] = field(default_factory=list)
    skipped_lines: int = 0  # interaction lines skipped (bad or missing a value) + metadata lines skipped
    rows_read: int = 0  # data rows of the interaction log (blank lines are not rows)
    removed: dict[str, int] = field(default_factory=dict)  # bad_line, missing_value, duplicate
    time: dict[str, Any] = field(default_factory=dict)  # time_format, time_unit, time_unit_from
    timestamp_unit: str = "s"  # unit of frame["timestamp"]
    notices: list[str] = field(default_factory=list)  # one line each: input read in a way to know about


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
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{p}: not a readable zip archive ({one_line(e)})") from None
        return [InputFile(f"{p}/{m}", str(p), m) for m in sorted(members)]
    return [InputFile(str(p), str(p))]


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _is_json(f: InputFile) -> bool:
    return _strip_gz(f.basename).endswith((".json", ".jsonl"))


def _json_objects(f: InputFile, skip_bad: bool) -> tuple[Iterator[tuple[int, dict]], list[int]]:
    """(line number, object) of every non-blank JSON line, and a list the bad lines' numbers are
    appended to as the iterator runs (skipped with ``skip_bad``, else the first is a DataError).

    Floats stay the text they were written as (``parse_float=str``): ``1700000040.900`` is not rounded.
    """
    data = f.read_bytes()
    bad: list[int] = []

    def objects() -> Iterator[tuple[int, dict]]:
        for n, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_float=str)
                if not isinstance(obj, dict):
                    raise ValueError(f"a JSON {type(obj).__name__}, not an object")
            except (ValueError, RecursionError) as e:
                if skip_bad:
                    bad.append(n)
                    continue
                if isinstance(e, UnicodeDecodeError):
                    raise DataError(f"{f.name}: line {n}: not UTF-8 text ({e.reason})") from None
                raise DataError(f"{f.name}: line {n}: not valid JSON ({one_line(e)})") from None
            yield n, obj

    return objects(), bad


def _first_json_keys(f: InputFile) -> set[str]:
    first = f.first_line()
    if first is None:
        raise DataError(f"{f.name}: empty file")
    n, line = first
    try:
        obj = json.loads(line, parse_float=str)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{f.name}: line {n}: not valid JSON ({one_line(e)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{f.name}: line {n}: a JSON {type(obj).__name__}, not an object")
    return set(obj)


def _by_name(files: list[InputFile], *names: str) -> InputFile | None:
    for f in files:
        if f.basename in names:
            return f
    return None


def detect_format(
    files: list[InputFile], fmt: str = "auto", columns: tuple[str, str] = ("user_id", "item_id")
) -> tuple[str, InputFile, InputFile | None]:
    """Pick the format, the interactions file and the item metadata file (or None) from file names.

    A single JSON-lines log is Amazon 2018 (reviewerID/asin), Amazon 2023 (user_id/parent_asin) or,
    holding the generic ``columns`` (user, item), generic ``jsonl``."""
    listing = ", ".join(f.basename for f in files[:10]) or "no files"
    for name, meta, f in (("ml-100k", "u.item", "u.data"), ("ml-1m", "movies.dat", "ratings.dat")):
        if fmt in ("auto", name) and (main := _by_name(files, f)):
            return name, main, _by_name(files, meta)
    if fmt in ("auto", "ml-latest") and (main := _by_name(files, "ratings.csv")):
        return "ml-latest", main, _by_name(files, "movies.csv")
    if fmt in ("auto", "amazon-2018", "amazon-2023", "jsonl"):
        logs = [f for f in files if _is_json(f) and not f.basename.startswith("meta")]
        metas = [f for f in files if _is_json(f) and f.basename.startswith("meta")]
        if fmt == "jsonl" and not logs:
            logs = metas
        if len(logs) == 1:
            if fmt == "jsonl":
                return fmt, logs[0], None
            keys = _first_json_keys(logs[0])
            if fmt == "auto":
                if {"reviewerID", "asin"} <= keys:
                    fmt = "amazon-2018"
                elif {"user_id", "parent_asin"} <= keys:
                    fmt = "amazon-2023"
                elif set(columns) <= keys:
                    return "jsonl", logs[0], None
                else:
                    raise DataError(
                        f"{logs[0].name}: line 1: unknown JSONL fields {sorted(keys)[:6]} "
                        "(Amazon 2018 has reviewerID/asin, 2023 user_id/parent_asin, generic JSON lines "
                        f"shards.user_col/item_col = {'/'.join(columns)}); set shards.format"
                    )
            return fmt, logs[0], metas[0] if len(metas) == 1 else None
    if fmt in ("auto", "s3rec", "sasrec"):
        texts = [
            f
            for f in files
            if _strip_gz(f.basename).endswith(".txt") and not f.basename.upper().startswith("README")
        ]
        if len(texts) == 1 and (kind := fmt if fmt != "auto" else _sequence_kind(texts[0])):
            return kind, texts[0], None
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
        "(ML-1M/10M), ratings.csv (ml-latest), one Amazon or generic *.jsonl, one *.parquet, one *.csv or "
        "one *.txt of user sequences (s3rec: user item item …) or pairs (sasrec: user item); "
        "set shards.format to choose"
    )


# --------------------------------------------------------------------------- academic sequence files

SEQUENCE_PEEK_LINES = 2000


def _sequence_kind(f: InputFile) -> str | None:
    """``s3rec`` or ``sasrec`` from the first lines of a whitespace-separated ``.txt`` file: a line with
    more than two fields is a user's sequence (s3rec); two fields on every line with a user on several
    lines are pairs (sasrec); None when a field is not an integer id (as every id of the published files
    is) or no line has more than two fields and one has fewer (not such a file); a DataError when it
    could be either — shards.format must say."""
    lines = [ln.split() for ln in f.read_bytes().splitlines()[:SEQUENCE_PEEK_LINES] if ln.strip()]
    if not all(token.isdigit() for t in lines for token in t):
        # The published files hold integer ids only; any other whitespace text (prose, a CSV with spaces)
        # would otherwise read as sequences of words. Such files take shards.format=s3rec / sasrec.
        return None
    if any(len(t) > 2 for t in lines):
        return "s3rec"  # a shorter line is a bad line of it, named by the reader
    if not lines or any(len(t) < 2 for t in lines):
        return None
    users = [t[0] for t in lines if len(t) == 2]
    if lines and len(users) == len(lines) and len(set(users)) < len(users):
        return "sasrec"
    raise DataError(
        f"{f.name}: cannot tell user sequences (s3rec: user item item …) from user-item pairs (sasrec: "
        "user item) from its first lines; set shards.format=s3rec or sasrec"
    )


def _read_sequences(log: InputFile, fmt: str, opts: _ReadOptions) -> tuple:
    """``s3rec``: every line ``user item item …`` (one user; the items in time order); ``sasrec``: every
    line ``user item`` (the file in time order). The time is the order: the position in the user's line
    (s3rec) or the line number (sasrec), stored as integer "seconds" so the leave-one-out split keeps
    the file's order exactly. Ratings are 1. A line with too few fields (or, sasrec, too many) is a
    DataError naming it, or skipped and counted with shards.skip_bad_lines."""
    try:
        text = log.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{log.name}: not UTF-8 text ({one_line(e)})") from None
    users, items, times, lines = [], [], [], []
    bad = 0
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        ok = len(fields) >= 2 if fmt == "s3rec" else len(fields) == 2
        if not ok:
            if not opts.skip_bad:
                want = "a user and at least one item" if fmt == "s3rec" else "exactly 2 fields (user item)"
                raise DataError(f"{log.name}: line {number}: {len(fields)} field(s), {fmt} needs {want} "
                                "(shards.skip_bad_lines=true skips such lines)")  # fmt: skip
            bad += 1
            continue
        n = len(fields) - 1
        users.append(np.full(n, fields[0], dtype=object))
        items.append(np.array(fields[1:], dtype=object))
        times.append(np.arange(n, dtype=np.int64) if fmt == "s3rec" else np.array([number], dtype=np.int64))
        lines.append(np.full(n, number, dtype=np.int64))
    if not users:
        raise DataError(f"{log.name}: no interactions found")
    frame = pd.DataFrame(
        {
            "user": pd.Series(np.concatenate(users), dtype=object),
            "item": pd.Series(np.concatenate(items), dtype=object),
            "rating": np.ones(sum(len(u) for u in users)),
            "timestamp": np.concatenate(times),
            "line": np.concatenate(lines),
        }
    )
    where = "position in the line" if fmt == "s3rec" else "line number"
    info = {"time_format": f"{fmt}: order only ({where})", "time_unit": None, "time_unit_from": None}
    table = _Table(frame, len(frame) + bad, {"bad_line": bad, "missing_value": 0}, info, "s")
    return table, {}, {}, 0


# --------------------------------------------------------------------------- delimited text


def _decode_error_line(raw: bytes, encoding: str) -> str:
    """'line N: <why>' of the first byte that does not decode."""
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return f"line {line}: not {encoding.upper()} text ({e.reason} at byte {e.start})"
    return f"not {encoding.upper()} text"


def _read_table(
    f: InputFile, *, sep: str, names: list[str] | None, encoding: str = "utf-8", skip_bad: bool = False
) -> tuple[pd.DataFrame, int]:
    """All columns as strings plus a ``_line`` column (1-based line in the file); bad lines counted.

    pandas' C parser reports lines with too many fields; with ``skip_bad_lines`` off the first one is
    an error. Blank lines are dropped silently (a line of empty fields is a row missing its values).
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
        except UnicodeDecodeError:
            raise DataError(f"{f.name}: {_decode_error_line(raw, encoding)}") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
            raise DataError(f"{f.name}: cannot parse ({one_line(e)})") from None
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
    empty = np.array((df[data_cols] == "").all(axis=1), dtype=bool)
    if empty.any():  # a blank line, or a line of separators only (a row missing every value)
        # Blank: nothing but the line end. Not str.strip(): a TSV line of tabs only is whitespace to it,
        # yet it is a row of empty fields (the columnar reader reads it so).
        text = raw.split(b"\n")
        blank = [not text[n - 1].rstrip(b"\r") if n <= len(text) else True for n in df["_line"][empty]]
        empty[np.flatnonzero(empty)[~np.asarray(blank, dtype=bool)]] = False
    return df[~empty].reset_index(drop=True), len(bad)


def _require_columns(df: pd.DataFrame, f: InputFile, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        found = [c for c in df.columns if c != "_line"]
        raise DataError(f"{f.name}: line 1: missing column {missing[0]!r} (found: {', '.join(found)})")


# --------------------------------------------------------------------------- values


def _text(values: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Stripped strings and a mask of missing values (null, NaN or empty)."""
    missing = values.isna().to_numpy()
    s = values.fillna("") if missing.any() else values
    if s.dtype == object:
        s = s.astype(str)
    s = s.str.strip()
    return s, missing | (s == "").to_numpy()


def _arrow(text: pd.Series, ok: np.ndarray) -> pa.Array:
    """The ``ok`` values as an Arrow string array (vectorised parsing)."""
    arr = pa.array(text)
    return pc.filter(arr, pa.array(ok)) if not ok.all() else arr


def _json_text(v: Any) -> str | None:
    """A JSON value as the text a CSV cell would hold (floats are already their text)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v, ensure_ascii=False, sort_keys=True)


_INT = r"^-?[0-9]+$"  # an integer (Arrow's cast alone would also take hex)
_DECIMAL = r"^(?P<sign>[+-]?)(?P<whole>[0-9]*)(?:\.(?P<frac>[0-9]*))?$"
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INT64_MAX = str(np.iinfo(np.int64).max)  # 19 digits


@dataclass
class _Times:
    values: np.ndarray  # int64 in `unit` (0 where bad or missing)
    unit: str
    bad: np.ndarray  # bool: a value that does not parse
    info: dict[str, Any]  # time_format, time_unit (of the input's numbers), time_unit_from
    why: str = ""  # why a bad value is bad
    missing: np.ndarray | None = None  # bool, when parsed from a typed column (Parquet timestamp)


def _unit_from_magnitude(max_abs: float) -> str:
    return "s" if max_abs < 1e11 else "ms" if max_abs < 1e14 else "us" if max_abs < 1e17 else "ns"


def _np(arr: pa.Array, dtype: Any) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


def _epoch_times(text: pd.Series, ok: np.ndarray, unit: str | None, unit_from: str) -> _Times:
    """Epoch numbers written as text, exactly: integers as they are, decimals as integers of a finer unit
    (the fraction's digits, up to ns). ``unit`` None: from the magnitude (see shards.time_unit)."""
    n = len(text)
    values, bad = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    idx = np.flatnonzero(ok)
    arr = _arrow(text, ok)
    try:  # MovieLens, Amazon: integers
        if pc.all(pc.match_substring_regex(arr, _INT)).as_py() is False:
            raise ValueError("not all integers")
        ints = _np(pc.cast(arr, pa.int64()), np.int64)
    except (ValueError, pa.ArrowInvalid):  # ArrowInvalid: out of the int64 range
        pass
    else:
        if unit is None:
            unit, unit_from = _unit_from_magnitude(float(np.abs(ints).max()) if len(ints) else 0), "magnitude"
        values[idx] = ints
        return _Times(
            values, unit, bad, {"time_format": "epoch", "time_unit": unit, "time_unit_from": unit_from}
        )
    # Exponent notation ("1.7e9") is rewritten as a plain decimal first, exactly; else not a number.
    plain = _np(pc.match_substring_regex(arr, _DECIMAL), bool)
    number = plain.copy()
    if not plain.all():
        texts = _np(arr, object)
        expo = [i for i in np.flatnonzero(~plain) if _NUMBER.fullmatch(texts[i])]
        texts[expo] = [format(decimal.Decimal(texts[i]), "f") for i in expo]
        number[expo] = True
        texts[~number] = "0"  # not a number: parsed as 0, marked bad below
        arr = pa.array(texts, pa.string())
    parts = pc.extract_regex(arr, _DECIMAL)
    sign = _np(parts.field("sign"), object)
    raw_whole, raw_frac = parts.field("whole"), pc.fill_null(parts.field("frac"), "")
    number &= _np(pc.utf8_length(raw_whole), np.int64) + _np(pc.utf8_length(raw_frac), np.int64) > 0
    whole, frac = pc.utf8_ltrim(raw_whole, "0"), pc.utf8_rtrim(raw_frac, "0")
    whole_len, frac_len = _np(pc.utf8_length(whole), np.int64), _np(pc.utf8_length(frac), np.int64)
    # More digits than int64's 19, or 19 above its maximum: out of range.
    number &= (whole_len < 19) | (whole_len == 19) & _np(pc.less_equal(whole, _INT64_MAX), bool)
    whole_int = np.zeros(len(arr), dtype=np.int64)
    if number.any():
        digits_only = pc.if_else(pa.array(number & (whole_len > 0)), whole, pa.scalar("0"))
        whole_int = _np(pc.cast(digits_only, pa.int64()), np.int64)
    if unit is None:
        max_abs = float(np.abs(whole_int[number]).max()) if number.any() else 0.0
        unit, unit_from = _unit_from_magnitude(max_abs), "magnitude"
    digits = int(frac_len[number].max()) if number.any() else 0
    exp = min(9, _EXP[unit] + -(-digits // 3) * 3)  # digits after the second, a multiple of 3
    k = exp - _EXP[unit]  # fraction digits kept (finer than a nanosecond is cut)
    scale = 10**k
    number &= np.abs(whole_int) <= (np.iinfo(np.int64).max - scale) // scale
    frac_int = np.zeros(len(arr), dtype=np.int64)
    if k and number.any():
        padded = pc.utf8_slice_codeunits(pc.utf8_rpad(frac, k, "0"), 0, k)
        frac_int = _np(pc.cast(pc.if_else(pa.array(number), padded, pa.scalar("0")), pa.int64()), np.int64)
    result = np.where(sign == "-", -1, 1) * (whole_int * scale + frac_int)
    values[idx[number]] = result[number]
    bad[idx[~number]] = True
    info = {
        "time_format": "epoch" if digits == 0 else "epoch decimal",
        "time_unit": unit,
        "time_unit_from": unit_from,
    }
    why = "not an epoch number in the int64 range; the first timestamp is a number, so each must be"
    return _Times(values, TIME_UNITS[exp // 3], bad, info, why)


def _iso_times(text: pd.Series, ok: np.ndarray) -> _Times:
    """ISO 8601 strings: offsets applied, no offset = UTC, integers of the parsed resolution."""
    n = len(text)
    values, bad = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    idx = np.flatnonzero(ok)
    parsed = pd.to_datetime(text[ok], utc=True, format="ISO8601", errors="coerce")
    unit = parsed.dt.unit
    failed = parsed.isna().to_numpy()
    ints = np.asarray(parsed.dt.tz_convert(None)).view(np.int64)
    values[idx[~failed]] = ints[~failed]
    bad[idx[failed]] = True
    info = {"time_format": "iso8601", "time_unit": None, "time_unit_from": None}
    why = "not an ISO 8601 time; the first timestamp is not a number, so each must be ISO 8601"
    return _Times(values, unit, bad, info, why)


def _parse_times(text: pd.Series, ok: np.ndarray, unit: str | None, unit_from: str) -> _Times:
    """Epoch numbers or ISO 8601 strings, as the first value is; a value of the other kind is bad."""
    first = text[ok].iloc[0] if ok.any() else None
    if first is None or _NUMBER.fullmatch(first):
        return _epoch_times(text, ok, unit, unit_from)
    return _iso_times(text, ok)


def coarsest_unit(values: np.ndarray, unit: str) -> tuple[np.ndarray, str]:
    """The same times in the coarsest of s/ms/us/ns that holds each one exactly (never coarser than s)."""
    while unit != "s" and len(values) and not (values % 1000).any():
        values, unit = values // 1000, TIME_UNITS[TIME_UNITS.index(unit) - 1]
    return values, unit


def _ratings(text: pd.Series, ok: np.ndarray) -> np.ndarray:
    """Numbers (NaN where missing or not a number)."""
    out = np.full(len(text), np.nan)
    try:
        out[ok] = _np(pc.cast(_arrow(text, ok), pa.float64()), np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # some value is not a number: find which
        out[ok] = pd.to_numeric(text[ok], errors="coerce").to_numpy(np.float64)
    return out


@dataclass
class _ReadOptions:
    skip_bad: bool
    time_unit: str | None  # None: from the magnitude
    time_unit_from: str


def read_options(cfg: ShardsConfig, fmt: str) -> _ReadOptions:
    if cfg.time_unit != "auto":
        return _ReadOptions(cfg.skip_bad_lines, cfg.time_unit, "shards.time_unit")
    known = FORMAT_TIME_UNIT.get(fmt)
    return _ReadOptions(cfg.skip_bad_lines, known, "format" if known else "magnitude")


@dataclass
class _Table:
    """A reader's rows with user/item/rating/timestamp validated, before duplicates."""

    frame: pd.DataFrame
    rows_read: int
    removed: dict[str, int]
    time: dict[str, Any]
    unit: str


def _validated(
    df: pd.DataFrame,
    f: InputFile,
    cols: dict[str, str | None],
    opts: _ReadOptions,
    *,
    bad_lines: int = 0,
    where: str = "line",
    times: _Times | None = None,
) -> _Table:
    """Map source columns to user/item/rating/timestamp, checking every value.

    A missing value (empty, null, absent) or a value that does not parse is a DataError naming the
    first such line and field, or with ``skip_bad_lines`` a counted skip: ``missing_value`` when a
    value is missing, else ``bad_line`` (which also counts the ``bad_lines`` the reader skipped).
    ``times``: the timestamp column already parsed (a Parquet timestamp column)."""
    n = len(df)
    user, user_missing = _text(df[cols["user"]])
    item, item_missing = _text(df[cols["item"]])
    checks: list[tuple[str, np.ndarray, np.ndarray, str]] = [  # field, missing, bad, why bad
        (cols["user"], user_missing, np.zeros(n, dtype=bool), ""),
        (cols["item"], item_missing, np.zeros(n, dtype=bool), ""),
    ]
    rating = np.ones(n, dtype=np.float64)
    if cols.get("rating"):
        rating_text, rating_missing = _text(df[cols["rating"]])
        rating = _ratings(rating_text, ~rating_missing)
        checks.append(
            (cols["rating"], rating_missing, ~rating_missing & ~np.isfinite(rating), "not a number")
        )
    if times is None:
        time_text, time_missing = _text(df[cols["time"]])
        times = _parse_times(time_text, ~time_missing, opts.time_unit, opts.time_unit_from)
    else:
        time_missing = times.missing if times.missing is not None else np.zeros(n, dtype=bool)
    checks.append((cols["time"], time_missing, times.bad, times.why))
    missing = np.logical_or.reduce([c[1] for c in checks])
    bad = np.logical_or.reduce([c[2] for c in checks]) & ~missing
    if (missing | bad).any() and not opts.skip_bad:
        i = int(np.argmax(missing | bad))
        col, _, _, why = next(c for c in checks if c[1][i] or c[2][i])
        line = df["_line"].iat[i]
        hint = "shards.skip_bad_lines=true skips such lines"
        if missing[i]:
            raise DataError(f"{f.name}: {where} {line}: field {col!r}: missing value ({hint})")
        raise DataError(
            f"{f.name}: {where} {line}: field {col!r}: bad value {df[col].iat[i]!r} ({why}; {hint})"
        )
    keep = ~(missing | bad)
    frame = pd.DataFrame(
        {
            "user": user[keep].reset_index(drop=True),
            "item": item[keep].reset_index(drop=True),
            "rating": rating[keep],
            "timestamp": times.values[keep],
            "line": df["_line"].to_numpy(np.int64)[keep],
        }
    )
    removed = {"bad_line": int(bad.sum()) + bad_lines, "missing_value": int(missing.sum())}
    return _Table(frame, n + bad_lines, removed, times.info, times.unit)


# --------------------------------------------------------------------------- readers


def _json_table(f: InputFile, fields: list[str], skip_bad: bool) -> tuple[pd.DataFrame, int]:
    """The requested fields of every JSON line as text (None when absent or null) + ``_line``;
    (frame, bad lines skipped)."""
    objects, bad = _json_objects(f, skip_bad)
    rows = [(n, *(_json_text(obj.get(k)) for k in fields)) for n, obj in objects]
    return pd.DataFrame(rows, columns=["_line", *fields], dtype=object), len(bad)


def _read_amazon(log: InputFile, meta: InputFile | None, fmt: str, opts: _ReadOptions) -> tuple:
    user, item, rating, time, meta_item = (
        ("reviewerID", "asin", "overall", "unixReviewTime", "asin")
        if fmt == "amazon-2018"
        else ("user_id", "parent_asin", "rating", "timestamp", "parent_asin")
    )
    df, bad = _json_table(log, [user, item, rating, time], opts.skip_bad)
    cols = {"user": user, "item": item, "rating": rating, "time": time}
    table = _validated(df, log, cols, opts, bad_lines=bad)
    titles: dict[str, str] = {}
    item_meta: dict[str, dict[str, Any]] = {}
    meta_skipped = 0
    if meta is not None:
        objects, meta_bad = _json_objects(meta, opts.skip_bad)
        for n, obj in objects:
            asin = _json_text(obj.get(meta_item))
            if not asin:
                if opts.skip_bad:
                    meta_bad.append(n)
                    continue
                raise DataError(f"{meta.name}: line {n}: field {meta_item!r}: missing value")
            if title := obj.get("title"):
                titles[asin] = str(title)
            if category := obj.get("main_category"):
                item_meta[asin] = {"category": category}
        meta_skipped = len(meta_bad)
    return table, titles, item_meta, meta_skipped


def _read_movielens(log: InputFile, meta: InputFile | None, fmt: str, opts: _ReadOptions) -> tuple:
    cols = {"user": "user", "item": "item", "rating": "rating", "time": "timestamp"}
    if fmt == "ml-latest":
        df, skipped = _read_table(log, sep=",", names=None, skip_bad=opts.skip_bad)
        cols = {"user": "userId", "item": "movieId", "rating": "rating", "time": "timestamp"}
        _require_columns(df, log, list(cols.values()))
    else:
        sep, enc = ("\t", "latin-1") if fmt == "ml-100k" else ("::", "latin-1")
        df, skipped = _read_table(
            log, sep=sep, names=["user", "item", "rating", "timestamp"], encoding=enc, skip_bad=opts.skip_bad
        )
    table = _validated(df, log, cols, opts, bad_lines=skipped)
    return (table, *movielens_meta(meta, fmt, opts))


def movielens_meta(meta: InputFile | None, fmt: str, opts: _ReadOptions) -> tuple:
    """(titles, item metadata, metadata lines skipped) of a MovieLens item file (u.item, movies.dat,
    movies.csv), or empty ones without it."""
    titles: dict[str, str] = {}
    item_meta: dict[str, dict[str, Any]] = {}
    meta_skipped = 0
    if meta is not None:
        if fmt == "ml-100k":
            m, meta_skipped = _read_table(
                meta,
                sep="|",
                names=["item", "title", "date", "video", "url", *ML100K_GENRES],
                encoding="latin-1",
                skip_bad=opts.skip_bad,
            )
            genres = m[list(ML100K_GENRES)].to_numpy() == "1"
            m["genres"] = ["|".join(np.array(ML100K_GENRES)[row]) for row in genres]
        elif fmt == "ml-1m":
            m, meta_skipped = _read_table(
                meta, sep="::", names=["item", "title", "genres"], encoding="latin-1", skip_bad=opts.skip_bad
            )
        else:
            m, meta_skipped = _read_table(meta, sep=",", names=None, skip_bad=opts.skip_bad)
            _require_columns(m, meta, ["movieId", "title", "genres"])
            m = m.rename(columns={"movieId": "item"})
        for item_id, title, genres in zip(m["item"].str.strip(), m["title"], m["genres"]):
            titles[item_id] = title
            item_meta[item_id] = {"genres": genres}
    return titles, item_meta, meta_skipped


def _parquet_frame(log: InputFile, wanted: list[str], time_col: str) -> tuple[pd.DataFrame, _Times | None]:
    """The wanted columns of a Parquet file as text (None for null/NaN) + ``_line`` (the row, 1-based);
    a timestamp column comes back parsed (integers of its unit, UTC; no time zone = UTC)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(log.read_bytes()))
        names = pf.schema_arrow.names
        df = pd.DataFrame({c: [] for c in names})  # only for the column check
        _require_columns(df, log, wanted)
        table = pf.read(columns=wanted)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise DataError(f"{log.name}: not a readable Parquet file ({one_line(e)})") from None
    out: dict[str, Any] = {"_line": np.arange(1, table.num_rows + 1)}
    times = None
    for name in wanted:
        col = table.column(name)
        kind = col.type
        if name == time_col and pa.types.is_timestamp(kind):
            missing = col.is_null().to_numpy(zero_copy_only=False)
            ints = pc.fill_null(pc.cast(col, pa.int64()), 0).to_numpy(zero_copy_only=False)
            tz = f", tz={kind.tz}" if kind.tz else ""
            info = {
                "time_format": f"parquet timestamp[{kind.unit}{tz}]" + ("" if kind.tz else " (read as UTC)"),
                "time_unit": kind.unit,
                "time_unit_from": "parquet type",
            }
            no_bad = np.zeros(table.num_rows, dtype=bool)
            times = _Times(ints.astype(np.int64), kind.unit, no_bad, info, missing=missing)
            out[name] = np.zeros(table.num_rows, dtype=object)
            continue
        if pa.types.is_floating(kind):  # NaN is how pandas writes a missing number
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, kind), col)
        try:
            # Arrow writes integral floats without ".0" (an id 10 read through a float column is "10")
            # and other floats as the shortest text that reads back as the same double.
            text = pc.cast(col, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(
                f"{log.name}: column {name!r}: type {kind} cannot be read ({one_line(e)})"
            ) from None
        out[name] = np.asarray(text.to_pylist(), dtype=object)
    return pd.DataFrame(out), times


def _read_generic(log: InputFile, fmt: str, cfg: ShardsConfig, opts: _ReadOptions) -> tuple:
    cols = {"user": cfg.user_col, "item": cfg.item_col, "rating": cfg.rating_col, "time": cfg.time_col}
    wanted = list(dict.fromkeys(c for c in (*cols.values(), cfg.title_col) if c))
    skipped, times, where = 0, None, "line"
    if fmt == "parquet":
        df, times = _parquet_frame(log, wanted, cfg.time_col)
        where = "row"
    elif fmt == "jsonl":
        df, skipped = _json_table(log, wanted, opts.skip_bad)
    else:
        sep = "\t" if _strip_gz(log.basename).endswith(".tsv") else ","
        df, skipped = _read_table(log, sep=sep, names=None, skip_bad=opts.skip_bad)
        _require_columns(df, log, wanted)
    table = _validated(df, log, cols, opts, bad_lines=skipped, where=where, times=times)
    titles = {}
    if cfg.title_col:
        items, _ = _text(df[cfg.item_col])
        names, missing = _text(df[cfg.title_col])
        titles = {item: title for item, title, m in zip(items, names, missing) if not m}
    return table, titles, {}, 0


def _drop_duplicates(table: _Table, log: InputFile, mode: str, where: str) -> tuple[pd.DataFrame, int]:
    """Rows repeating an earlier row's (user, item, timestamp): (frame, how many) — dropped (the first
    occurrence kept), kept, or a DataError naming the first one."""
    frame = table.frame
    dup = frame.duplicated(["user", "item", "timestamp"], keep="first").to_numpy()
    count = int(dup.sum())
    if count and mode == "error":
        i = int(np.argmax(dup))
        row = frame.iloc[i]
        same = (frame["user"] == row["user"]) & (frame["item"] == row["item"])
        first = frame["line"][same & (frame["timestamp"] == row["timestamp"])].iat[0]
        raise DataError(
            f"{log.name}: {where} {row['line']}: duplicate of {where} {first} (user {row['user']!r}, item "
            f"{row['item']!r}, same timestamp); {count} duplicate rows in all "
            "(shards.duplicates=drop drops them, keep keeps them)"
        )
    if count and mode == "drop":
        frame = frame[~dup]
    return frame, count


def resolve_input(path: str | os.PathLike, cfg: ShardsConfig) -> tuple[str, InputFile, InputFile | None]:
    """(format, interactions file, item metadata file or None) of an input as ``cfg`` says
    (``shards.format``, ``shards.meta``, the generic ``user_col``/``item_col``); DataError when none fits."""
    fmt, meta = cfg.format, cfg.meta
    files = list_files(path)
    columns = (cfg.user_col, cfg.item_col)
    if Path(path).is_file() and Path(path).suffix != ".zip":
        # A single log file: its metadata file (movies.csv, u.item, meta_*.jsonl) sits beside it.
        siblings = [f for f in list_files(Path(path).parent) if f.path != files[0].path]
        fmt, log, meta_file = detect_format(files, fmt, columns)
        if meta_file is None and fmt not in ("csv", "parquet", "jsonl", "s3rec", "sasrec"):
            names = {"ml-100k": ("u.item",), "ml-1m": ("movies.dat",), "ml-latest": ("movies.csv",)}
            if fmt.startswith("amazon"):
                meta_file = next((f for f in siblings if _is_json(f) and f.basename.startswith("meta")), None)
            else:
                meta_file = _by_name(siblings, *names[fmt])
    else:
        fmt, log, meta_file = detect_format(files, fmt, columns)
    if meta is not None:
        meta_file = list_files(meta)[0]
    return fmt, log, meta_file


def source_notices(used: list[InputFile]) -> list[str]:
    """One line per input file read in a way to know about (a ``.gz`` name on plain text)."""
    return [
        f"{f.name}: not gzip-compressed (no gzip header), read as plain text"
        for f in used
        if f.gzip_mislabelled
    ]


def read_interactions(path: str | os.PathLike, cfg: ShardsConfig) -> Interactions:
    """Read an interaction log (directory, single file or ``.zip``) as ``cfg`` says: ``shards.format``
    (auto-detected from file names), ``shards.meta``, the generic column mapping ``shards.*_col``,
    ``shards.time_unit``, ``shards.duplicates`` and ``shards.skip_bad_lines``. Raises DataError naming
    the file (and line) of the first bad input."""
    fmt, log, meta_file = resolve_input(path, cfg)
    opts = read_options(cfg, fmt)
    readers: dict[str, Callable[[], tuple]] = {
        "amazon": lambda: _read_amazon(log, meta_file, fmt, opts),
        "ml": lambda: _read_movielens(log, meta_file, fmt, opts),
        "generic": lambda: _read_generic(log, fmt, cfg, opts),
        "sequence": lambda: _read_sequences(log, fmt, opts),
    }
    kind = (
        "amazon" if fmt.startswith("amazon") else "ml" if fmt.startswith("ml")
        else "sequence" if fmt in ("s3rec", "sasrec") else "generic"
    )  # fmt: skip
    table, titles, item_meta, meta_skipped = readers[kind]()
    where = "row" if fmt == "parquet" else "line"
    frame, duplicates = _drop_duplicates(table, log, cfg.duplicates, where)
    if frame.empty:
        raise DataError(f"{log.name}: no interactions found")
    ts, unit = coarsest_unit(frame["timestamp"].to_numpy(np.int64), table.unit)
    frame = frame.assign(timestamp=ts).reset_index(drop=True)
    used = [log] + ([meta_file] if meta_file else [])
    notices = source_notices(used)
    removed = {**table.removed, "duplicate": duplicates if cfg.duplicates == "drop" else 0}
    return Interactions(
        frame,
        titles,
        item_meta,
        fmt,
        [f.name for f in used],
        skipped_lines=table.removed["bad_line"] + table.removed["missing_value"] + meta_skipped,
        rows_read=table.rows_read,
        removed=removed,
        time=table.time,
        timestamp_unit=unit,
        notices=notices,
    )
