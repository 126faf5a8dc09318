"""The ``local`` build engine of ``recgpt shards build``: columnar and streaming, no per-row Python.

Why DuckDB (with Arrow and numpy): the two steps that grow with the log — reading it and sorting every
interaction by (user, time, file order) — run in DuckDB, whose sorts, joins and group-bys are
out-of-core: past ``shards.engine_memory_gb`` they spill to a temporary directory instead of growing
the process, and it reads Parquet column by column without loading the file. Its results stream out as
Arrow record batches (zero-copy into numpy). Everything after the sort is integer arithmetic on those
sorted columns (numpy: duplicates, rating threshold, k-core with ``bincount``, the window plan) and
string assembly on Arrow arrays (``pyarrow.compute``: numbers to text, lists joined, records
concatenated), a chunk of records at a time. Python runs per tar member (256 records), per chunk and
per distinct rating level, never per interaction. Polars could do the columnar part too; DuckDB was
chosen for its documented bounded-memory (spilling) sort and join, and because Arrow, which the project
already uses, is its exchange format.

The engine writes exactly what the reference path (``shards.engine=python``: pandas, one Python dict
per record) writes — the same items, records, bytes and fingerprint — which ``tests/test_columnar.py``
checks on the bundled sample, a synthetic log and every input format.

Input (one dispatch, :func:`prepare`): generic Parquet logs whose id columns are integers or strings and
whose time column holds epoch integers are read by DuckDB directly (the path that scales); generic
CSV/TSV logs and ml-latest's ratings.csv without quote characters or blank lines, with epoch-integer
times and plain decimal ratings, are parsed by Arrow's streaming CSV reader into a DuckDB table. Every
other input — MovieLens 100K/1M/10M, Amazon and generic JSON lines, the sequence files, gzip, quoted
CSV, Parquet with float ids or timestamp-typed or text times, any value with surrounding spaces or that
does not parse — is read by the reference readers of :mod:`data_shards.ingest` (their error messages,
counts and line numbers) and handed to the same columnar pipeline as an Arrow table. A missing value is
named (or counted) by the columnar readers themselves, in the reference's words.

Memory: DuckDB's limit (``shards.engine_memory_gb``), plus 26 bytes per interaction for the sorted
columns (user and item codes int32, time int64, rating level uint16, file order int64 until duplicates
are resolved) and their filtered copy, plus one chunk of records (a few MB). Measured peak RSS: 0.6 GiB
at 1M interactions, 3.7 GiB at 50M (docs/BENCHMARKS.md, ``benchmarks/build_scale.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from configs import DataError, ShardsConfig, one_line
from configs.schema import MIN_USER_INTERACTIONS, TIME_UNITS
from data_shards.ingest import (
    FORMAT_TIME_UNIT,
    InputFile,
    movielens_meta,
    read_interactions,
    read_options,
    resolve_input,
    source_notices,
)

# Records assembled per chunk (train: in the shuffled order; eval: users in uid order, capped by rows).
CHUNK_RECORDS = 16384
CHUNK_ROWS = 1 << 22  # interactions behind one chunk of eval records (their seen lists)
FETCH_ROWS = 1 << 20  # rows per Arrow batch streamed out of DuckDB
# Characters Python's str.strip() removes (str.isspace): an id starting or ending with one is read by
# the reference reader, which strips it exactly.
_PY_SPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
_SPACE_CLASS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in _PY_SPACE) + "]"
_JSON_ESCAPED = '[\\x00-\\x1f"\\\\]'  # what json.dumps escapes with ensure_ascii=False
_DIGITS = "^[0-9]{1,18}$"  # split.natural_order: ids that sort as numbers


# --------------------------------------------------------------------------- the source table


@dataclass
class Source:
    """The interaction log as a DuckDB relation ``raw`` (user, item, rating DOUBLE, ts BIGINT, line
    BIGINT: file order) plus what the manifest says about reading it."""

    format: str
    files: list[str]
    where: str  # "row" (Parquet) or "line": how messages name a row
    log_name: str
    rows_read: int
    removed: dict[str, int]  # bad_line, missing_value, duplicate (when the reader resolved them)
    time: dict[str, Any]  # time_format, time_unit, time_unit_from
    unit: str  # unit of ts
    duplicates_resolved: bool  # the reference reader already dropped (or refused) duplicates
    coarsened: bool  # ts already in the coarsest exact unit
    titles: dict[str, str] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    skipped_lines: int = 0


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _is_id_type(t: pa.DataType) -> bool:
    """Ids DuckDB reads as the reference does: integers (uint64 aside) and strings."""
    return (
        (pa.types.is_integer(t) and t != pa.uint64()) or pa.types.is_string(t) or pa.types.is_large_string(t)
    )


@dataclass(frozen=True)
class CheckPlan:
    """How the rows of one log are read and checked, as SQL over a relation that holds the log's own
    columns (and a file-order column): the same text runs in the local engine's DuckDB view and, one
    block at a time, in the Ray engine's tasks (:func:`check_sql`)."""

    columns: tuple[str, ...]  # the log's columns the plan reads
    select: str  # "<expr> AS user, <expr> AS item, <expr> AS rating, <expr> AS ts"
    missing: dict[str, str]  # field name -> SQL "the value is missing", in the reference's order of checks
    odd: str  # SQL: a present value only the reference reader handles exactly


def parquet_plan(schema: pa.Schema, cfg: ShardsConfig) -> CheckPlan | None:
    """The check plan of a generic Parquet log with this schema, or None when the reference reader must
    read it (a title column, a named column absent or named twice, float or uint64 ids, times that are not
    integers, ratings that are not numbers)."""
    if cfg.title_col:
        return None
    cols = {"user": cfg.user_col, "item": cfg.item_col, "rating": cfg.rating_col, "time": cfg.time_col}
    named = [c for c in cols.values() if c]
    if any(c not in schema.names for c in named) or len(set(named)) < len(named):
        return None
    kind = {k: schema.field(c).type for k, c in cols.items() if c}
    if not (_is_id_type(kind["user"]) and _is_id_type(kind["item"])):
        return None
    if not (pa.types.is_integer(kind["time"]) and kind["time"] != pa.uint64()):
        return None
    rating_type = kind.get("rating")
    if rating_type is not None and not (
        pa.types.is_integer(rating_type) or rating_type in (pa.float32(), pa.float64())
    ):
        return None
    user, item, time = _ident(cols["user"]), _ident(cols["item"]), _ident(cols["time"])
    # Per field, in the reference's order of checks: is the value missing (null, NaN, empty text)?
    missing = {cols["user"]: f"{user} IS NULL", cols["item"]: f"{item} IS NULL"}
    spaced = []
    for key, col in (("user", user), ("item", item)):
        if not pa.types.is_integer(kind[key]):
            missing[cols[key]] += f" OR {col} = ''"
            spaced.append(f"regexp_matches({col}, '^{_SPACE_CLASS}|{_SPACE_CLASS}$')")
    if rating_type is None:
        rating, nonfinite = "1.0::DOUBLE", "false"
    else:
        r = _ident(cols["rating"])
        missing[cols["rating"]] = f"{r} IS NULL"
        if pa.types.is_floating(rating_type):
            missing[cols["rating"]] += f" OR isnan({r})"
            nonfinite = f"isinf({r})"
            # A float32 stays float32 here: the reference reads it as its shortest text, then as float64
            # (0.1f -> 0.1), which rating_levels does to the distinct values only.
            rating = r
        else:
            rating, nonfinite = f"{r}::DOUBLE", "false"
    missing[cols["time"]] = f"{time} IS NULL"
    odd = f"NOT ({' OR '.join(missing.values())}) AND (({nonfinite}) OR ({' OR '.join(spaced) or 'false'}))"
    return CheckPlan(
        columns=tuple(named),
        select=f"{user} AS user, {item} AS item, {rating} AS rating, {time}::BIGINT AS ts",
        missing=missing,
        odd=odd,
    )


def check_sql(plan: CheckPlan, line: str, relation: str) -> str:
    """SELECT over ``relation`` of (line, user, item, rating, ts, miss, odd): ``miss`` is the index in
    ``plan.missing`` of the first missing field of the row (-1: none), ``odd`` whether a present value
    needs the reference reader. ``line`` is the SQL of the row's file order (1-based)."""
    cases = " ".join(f"WHEN {cond} THEN {k}" for k, cond in enumerate(plan.missing.values()))
    return (
        f"SELECT {line} AS line, {plan.select}, CASE {cases} ELSE -1 END::TINYINT AS miss, "
        f"({plan.odd}) AS odd FROM {relation}"
    )


@dataclass
class CheckStats:
    """What the checks found over every row: the figures a :class:`Source` is decided from."""

    rows: int
    missing: int  # rows missing a value
    first_missing_line: int | None
    first_missing_field: str | None  # the column name of that row's first missing value
    odd: int
    ts_min: int | None  # over every row with a time, missing other values or not
    ts_max: int | None


def _parquet_source(
    con: Any, log: InputFile, meta_file: InputFile | None, cfg: ShardsConfig
) -> Source | None:
    """DuckDB reads a generic Parquet log itself, or None when the reference reader must (its column
    types, a zip member, a title column, ids with surrounding spaces, a non-finite rating)."""
    import pyarrow.parquet as pq

    if log.member is not None or log.basename.endswith(".gz"):
        return None
    try:
        plan = parquet_plan(pq.read_schema(log.path), cfg)
    except Exception:  # damaged: the reference reader names the problem
        return None
    if plan is None:
        return None
    relation = f"read_parquet({_literal(log.path)}, file_row_number = true)"
    return _checked_source(con, log, meta_file, cfg, "parquet", "row", plan, "file_row_number + 1", relation)


def _checked_source(
    con: Any,
    log: InputFile,
    meta_file: InputFile | None,
    cfg: ShardsConfig,
    fmt: str,
    where: str,
    plan: CheckPlan,
    line: str,
    relation: str,
    meta: Callable[[], tuple[dict, dict, int]] = lambda: ({}, {}, 0),
) -> Source | None:
    """The view ``raw`` (line, user, item, rating, ts) over ``relation`` without rows missing a value,
    checked by :func:`check_sql` and decided by :func:`checked_source`; None when the reference reader
    must read the log."""
    con.execute(f"CREATE TEMP VIEW src AS {check_sql(plan, line, relation)}")
    n, n_missing, first_missing, n_odd, t_min, t_max = con.sql(
        "SELECT count(*), count(*) FILTER (WHERE miss >= 0), min(line) FILTER (WHERE miss >= 0), "
        "count(*) FILTER (WHERE odd), min(ts), max(ts) FROM src"
    ).fetchall()[0]
    field_name = None
    if n_missing:
        (k,) = con.sql(f"SELECT miss FROM src WHERE line = {int(first_missing)}").fetchall()[0]
        field_name = list(plan.missing)[k]
    stats = CheckStats(int(n), int(n_missing), first_missing, field_name, int(n_odd), t_min, t_max)
    source = checked_source(log, meta_file, cfg, fmt, where, stats, meta)
    if source is not None:
        con.execute("CREATE TEMP VIEW raw AS SELECT line, user, item, rating, ts FROM src WHERE miss < 0")
    return source


def checked_source(
    log: InputFile,
    meta_file: InputFile | None,
    cfg: ShardsConfig,
    fmt: str,
    where: str,
    stats: CheckStats,
    meta: Callable[[], tuple[dict, dict, int]] = lambda: ({}, {}, 0),
) -> Source | None:
    """The :class:`Source` of a log whose rows the columnar checks read (both engines decide here), or
    None when some row is odd or there is none (the reference reader then reads it, with its own
    message for an empty log). A missing value is the reference's one-line DataError naming the first
    such row, unless shards.skip_bad_lines counts it. The time unit comes from shards.time_unit, the
    format, or the magnitude of every time present."""
    if stats.odd or not stats.rows:
        return None
    if stats.missing and not cfg.skip_bad_lines:
        raise DataError(
            f"{log.name}: {where} {stats.first_missing_line}: field {stats.first_missing_field!r}: missing "
            "value (shards.skip_bad_lines=true skips such lines)"
        )
    if cfg.time_unit != "auto":
        unit, unit_from = cfg.time_unit, "shards.time_unit"
    elif FORMAT_TIME_UNIT.get(fmt):
        unit, unit_from = FORMAT_TIME_UNIT[fmt], "format"
    else:  # the magnitude of every time present, as the reference reader does
        max_abs = float(max(abs(stats.ts_min or 0), abs(stats.ts_max or 0)))
        unit = "s" if max_abs < 1e11 else "ms" if max_abs < 1e14 else "us" if max_abs < 1e17 else "ns"
        unit_from = "magnitude"
    used = [log] + ([meta_file] if meta_file else [])
    titles, item_meta, meta_skipped = meta()  # after the log's checks, as the reference reads them
    return Source(
        format=fmt,
        files=[f.name for f in used],
        where=where,
        log_name=log.name,
        rows_read=stats.rows,
        removed={"bad_line": 0, "missing_value": stats.missing},
        time={"time_format": "epoch", "time_unit": unit, "time_unit_from": unit_from},
        unit=unit,
        duplicates_resolved=False,
        coarsened=False,
        titles=titles,
        meta=item_meta,
        notices=source_notices(used),
        skipped_lines=stats.missing + meta_skipped,
    )


CSV_SCAN_BYTES = 1 << 24  # bytes read at a time while a CSV file is checked


def _plain_csv(log: InputFile, spill: str) -> tuple[str, int, bytes] | None:
    """(a local path of the file, its lines, its first line) when the file has no quote character, no
    blank line and no byte-order mark — then splitting on the separator and newlines is all there is to
    parse, and Arrow's CSV reader cannot read it otherwise than pandas does; None otherwise. A zip
    member is copied out (beside DuckDB's spill files)."""
    import zipfile

    try:
        if log.member is None:
            path, stream = log.path, open(log.path, "rb")
        else:
            path = os.path.join(spill, "log" + os.path.splitext(log.member)[1])
            stream = zipfile.ZipFile(log.path).open(log.member)
    except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError):
        return None
    lines, first, last = 0, b"", b""
    copy = open(path, "wb") if log.member is not None else None
    try:
        while chunk := stream.read(CSV_SCAN_BYTES):
            if not first:
                first = chunk.split(b"\n", 1)[0]
                if chunk.startswith(b"\xef\xbb\xbf"):
                    return None
            # A quote, or a blank line (pandas drops it, Arrow reads a row of empty values): the reference.
            joined = last + chunk
            if b'"' in chunk or b"\n\n" in joined or b"\n\r\n" in joined:
                return None
            lines += chunk.count(b"\n")
            last = chunk[-2:]
            if copy is not None:
                copy.write(chunk)
    except (OSError, EOFError, zipfile.BadZipFile, RuntimeError):
        return None
    finally:
        stream.close()
        if copy is not None:
            copy.close()
    if last[-1:] != b"\n":
        lines += 1
    return path, lines, first.removesuffix(b"\r")


def _csv_source(
    con: Any, log: InputFile, meta_file: InputFile | None, fmt: str, cfg: ShardsConfig, spill: str
) -> Source | None:
    """A generic CSV/TSV or ml-latest ratings.csv read by Arrow's CSV reader into DuckDB, or None when
    the reference reader must read it: gzip, a quote character anywhere, a header it would rename
    (empty or repeated names), a line that is not one row (blank, a field count off), ids or values with
    surrounding spaces, ratings other than plain decimals, times other than epoch integers."""
    import pyarrow.csv as pcsv

    if log.basename.endswith(".gz") or (fmt == "csv" and cfg.title_col):
        return None
    plain = _plain_csv(log, spill)
    if plain is None:
        return None
    path, lines, first = plain
    sep = "\t" if fmt == "csv" and log.basename.endswith(".tsv") else ","
    try:
        header = first.decode("utf-8").split(sep)
    except UnicodeDecodeError:
        return None
    if len(set(header)) < len(header) or not all(header):
        return None
    if fmt == "ml-latest":
        cols = {"user": "userId", "item": "movieId", "rating": "rating", "time": "timestamp"}
    else:
        cols = {"user": cfg.user_col, "item": cfg.item_col, "rating": cfg.rating_col, "time": cfg.time_col}
    named = [c for c in cols.values() if c]
    if any(c not in header for c in named) or len(set(named)) < len(named):
        return None
    try:
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=header, skip_rows=1, block_size=CSV_SCAN_BYTES),
            parse_options=pcsv.ParseOptions(delimiter=sep, quote_char=False, ignore_empty_lines=False),
            convert_options=pcsv.ConvertOptions(
                include_columns=named, column_types={c: pa.string() for c in named}, strings_can_be_null=False
            ),
        )
    except (pa.ArrowException, OSError):
        return None
    names = {c: f"c{k}" for k, c in enumerate(named)}

    def batches() -> Iterator[pa.RecordBatch]:
        line = 2  # the header is line 1
        for batch in reader:
            arrays = [pa.array(np.arange(line, line + batch.num_rows, dtype=np.int64))]
            yield pa.RecordBatch.from_arrays(
                arrays + [batch.column(c) for c in named], ["line", *names.values()]
            )
            line += batch.num_rows

    schema = pa.schema([("line", pa.int64())] + [(names[c], pa.string()) for c in named])
    con.execute("DROP TABLE IF EXISTS csv_rows")
    con.register("csv_batches", pa.RecordBatchReader.from_batches(schema, batches()))
    try:  # a table: DuckDB keeps (and spills) the text once for the passes below
        con.execute("CREATE TEMP TABLE csv_rows AS SELECT * FROM csv_batches")
    finally:
        con.unregister("csv_batches")
    (rows,) = con.sql("SELECT count(*) FROM csv_rows").fetchall()[0]
    if rows != lines - 1:  # a blank line or a field count Arrow read otherwise: the reference decides
        return None
    user, item, time = (_ident(names[cols[k]]) for k in ("user", "item", "time"))
    missing = {cols["user"]: f"{user} = ''", cols["item"]: f"{item} = ''"}
    spaced = [f"regexp_matches({_ident(c)}, '^{_SPACE_CLASS}|{_SPACE_CLASS}$')" for c in names.values()]
    bad = [
        f"({time} <> '' AND (NOT regexp_full_match({time}, '-?[0-9]+') OR TRY_CAST({time} AS BIGINT) IS NULL))"
    ]
    rating = "1.0::DOUBLE"
    if cols["rating"]:
        r = _ident(names[cols["rating"]])
        missing[cols["rating"]] = f"{r} = ''"
        bad.append(f"({r} <> '' AND NOT regexp_full_match({r}, '[0-9]+(\\.[0-9]+)?'))")
        rating = f"TRY_CAST({r} AS DOUBLE)"
    missing[cols["time"]] = f"{time} = ''"
    meta: Callable[[], tuple[dict, dict, int]] = lambda: ({}, {}, 0)  # noqa: E731
    if fmt == "ml-latest":
        meta = lambda: movielens_meta(meta_file, fmt, read_options(cfg, fmt))  # noqa: E731
    plan = CheckPlan(
        columns=tuple(names.values()),
        select=f"{user} AS user, {item} AS item, {rating} AS rating, TRY_CAST({time} AS BIGINT) AS ts",
        missing=missing,
        odd=" OR ".join(spaced + bad),
    )
    return _checked_source(con, log, meta_file, cfg, fmt, "line", plan, "line", "csv_rows", meta)


def _reference_source(con: Any, input_path: str | os.PathLike, cfg: ShardsConfig) -> Source:
    """Any input through the reference readers (exact errors and counts), handed over as Arrow."""
    logs = read_interactions(input_path, cfg)
    frame = logs.frame
    table = pa.table(
        {
            "line": np.arange(len(frame), dtype=np.int64),  # the frame's order is the file order
            "user": pa.array(frame["user"].to_numpy(object), pa.string()),
            "item": pa.array(frame["item"].to_numpy(object), pa.string()),
            "rating": frame["rating"].to_numpy(np.float64),
            "ts": frame["timestamp"].to_numpy(np.int64),
        }
    )
    con.register("raw", table)
    return Source(
        format=logs.format,
        files=logs.files,
        where="row" if logs.format == "parquet" else "line",
        log_name=logs.files[0] if logs.files else str(input_path),
        rows_read=logs.rows_read,
        removed=dict(logs.removed),
        time=dict(logs.time),
        unit=logs.timestamp_unit,
        duplicates_resolved=True,
        coarsened=True,
        titles=logs.titles,
        meta=logs.meta,
        notices=logs.notices,
        skipped_lines=logs.skipped_lines,
    )


# --------------------------------------------------------------------------- ids in natural order


def natural_permutation(ids: pa.Array) -> np.ndarray:
    """int64 permutation putting distinct ``ids`` in :func:`data_shards.split.natural_order`: as numbers
    when every id is a non-negative integer of at most 18 digits, else as strings (code point order, which
    is UTF-8 byte order); digit strings equal as numbers ("007", "7") keep their string order."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    if pa.types.is_integer(ids.type):
        values = ids.to_numpy(zero_copy_only=False)
        if values.min() >= 0 and values.max() < 10**18:
            return np.argsort(values, kind="stable").astype(np.int64)
        return pc.sort_indices(pc.cast(ids, pa.string())).to_numpy().astype(np.int64)
    by_text = pc.sort_indices(ids).to_numpy().astype(np.int64)
    if pc.all(pc.match_substring_regex(ids, _DIGITS)).as_py():
        numbers = pc.cast(ids.take(pa.array(by_text)), pa.int64()).to_numpy()
        return by_text[np.argsort(numbers, kind="stable")]
    return by_text


def id_text(ids: pa.Array) -> pa.Array:
    """Ids as the text the records spell them with (integers in decimal)."""
    return ids if pa.types.is_string(ids.type) else pc.cast(ids, pa.string())


def json_strings(text: pa.Array) -> pa.Array:
    """Each string as ``json.dumps(s, ensure_ascii=False)`` writes it; the rare strings needing an escape
    are encoded by ``json`` itself, the rest are only quoted."""
    text = pc.cast(text, pa.string())
    quoted = pc.binary_join_element_wise('"', text, '"', "")
    needs = pc.match_substring_regex(text, _JSON_ESCAPED)
    if not pc.any(needs).as_py():
        return quoted
    where = np.flatnonzero(needs.to_numpy(zero_copy_only=False))
    escaped = pa.array([json.dumps(s, ensure_ascii=False) for s in text.take(pa.array(where)).to_pylist()])
    return pc.replace_with_mask(quoted, needs, escaped)


# --------------------------------------------------------------------------- the sorted columns


@dataclass
class Sorted:
    """Every row of ``raw`` sorted by (user, time, file order), as codes into the distinct ids."""

    user: np.ndarray  # int32 code into user_ids
    item: np.ndarray  # int32 code into item_ids
    ts: np.ndarray  # int64
    rating: np.ndarray  # uint16 (or int64) code into levels
    line: np.ndarray  # int64 file order
    user_ids: pa.Array  # distinct users, natural order
    item_ids: pa.Array
    levels: np.ndarray  # float64 distinct ratings, ascending


def natural_ids(ids: pa.Array) -> pa.Array:
    """Distinct ids (integers, or text of any Arrow string type) in natural order, text as ``string``."""
    if not pa.types.is_integer(ids.type):  # large_string or string_view, as DuckDB hands it out
        ids = pc.cast(ids, pa.string())
    return ids.take(pa.array(natural_permutation(ids)))


def rating_levels(stored: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct stored ratings ascending, as numpy in their stored type; the same as float64 the way
    the reference reads them). A float32 goes through its shortest text (0.1f -> 0.1) as the reference
    does; the conversion keeps the order, so a code into either array is the same."""
    stored = stored.take(pc.sort_indices(stored))
    if pa.types.is_floating(stored.type) and stored.type != pa.float64():
        levels = pc.cast(pc.cast(stored, pa.string()), pa.float64()).to_numpy()
    else:
        levels = pc.cast(stored, pa.float64()).to_numpy()
    return stored.to_numpy(), levels


def _distinct(con: Any, col: str) -> pa.Array:
    ids = con.sql(f"SELECT DISTINCT {col} AS id FROM raw").to_arrow_table().column("id").combine_chunks()
    return natural_ids(ids)


def sort_rows(con: Any) -> Sorted:
    """Code users and items in natural order and stream every row out of DuckDB sorted by (user code,
    time, file order) — DuckDB's external sort, so only the result arrays are held here."""
    user_ids, item_ids = _distinct(con, "user"), _distinct(con, "item")
    stored, levels = rating_levels(
        con.sql("SELECT DISTINCT rating FROM raw").to_arrow_table().column(0).combine_chunks()
    )
    con.register("user_codes", pa.table({"id": user_ids, "code": np.arange(len(user_ids), dtype=np.int32)}))
    con.register("item_codes", pa.table({"id": item_ids, "code": np.arange(len(item_ids), dtype=np.int32)}))
    (n,) = con.sql("SELECT count(*) FROM raw").fetchall()[0]
    out = Sorted(
        user=np.empty(n, np.int32),
        item=np.empty(n, np.int32),
        ts=np.empty(n, np.int64),
        rating=np.empty(n, np.uint16 if len(levels) < 1 << 16 else np.int64),
        line=np.empty(n, np.int64),
        user_ids=user_ids,
        item_ids=item_ids,
        levels=levels,
    )
    reader = con.sql(
        "SELECT u.code AS u, i.code AS i, r.ts, r.rating, r.line FROM raw r "
        "JOIN user_codes u ON r.user = u.id JOIN item_codes i ON r.item = i.id "
        "ORDER BY u.code, r.ts, r.line"
    ).to_arrow_reader(FETCH_ROWS)
    at = 0
    for batch in reader:
        k = batch.num_rows
        s = slice(at, at + k)
        out.user[s] = batch.column("u").to_numpy()
        out.item[s] = batch.column("i").to_numpy()
        out.ts[s] = batch.column("ts").to_numpy()
        out.rating[s] = np.searchsorted(stored, batch.column("rating").to_numpy())
        out.line[s] = batch.column("line").to_numpy()
        at += k
    assert at == n, (at, n)
    con.unregister("user_codes")
    con.unregister("item_codes")
    return out


def repeats(rows: Sorted, alive: np.ndarray) -> np.ndarray:
    """bool per row: an alive row repeating an earlier alive row's (user, item, time) in file order.

    Rows are sorted by (user, time, file order), so repeats lie inside runs of equal (user, time) — ties,
    a small share of a log; only those rows are sorted again, by item."""
    every = bool(alive.all())  # the usual case: no gathered copies of the columns
    idx = None if every else np.flatnonzero(alive)
    u, t = (rows.user, rows.ts) if idx is None else (rows.user[idx], rows.ts[idx])
    tie = (u[1:] == u[:-1]) & (t[1:] == t[:-1])
    del u, t
    dup = np.zeros(len(rows.user), dtype=bool)
    if not tie.any():
        return dup
    in_run = np.zeros(len(tie) + 1, dtype=bool)
    in_run[1:] |= tie
    in_run[:-1] |= tie
    cand = np.flatnonzero(in_run)  # alive rows tied with a neighbour (indices among the alive rows)
    run = np.cumsum(~tie)[np.maximum(cand - 1, 0)] * (cand > 0)  # run id: ties seen before each row
    pos = cand if idx is None else idx[cand]  # row numbers
    items = rows.item[pos]
    order = np.lexsort((items, run))  # stable: file order within equal (run, item)
    same = (run[order][1:] == run[order][:-1]) & (items[order][1:] == items[order][:-1])
    dup[pos[order][1:][same]] = True
    return dup


# --------------------------------------------------------------------------- filters

# Per-row filter states (int8), in the order the filters apply; the k-core comes last and is global.
ALIVE, DUPLICATE, BELOW_THRESHOLD, TOO_SHORT = 0, 1, 2, 3


@dataclass
class Kept:
    """The rows that make records: per user in (time, file order), dense ids in natural order. The Ray
    engine holds a slice of the users in one: local user 0 is uid ``first_uid``."""

    uid: np.ndarray  # int32 per row: local user index
    iid: np.ndarray  # int32 per row
    ts: np.ndarray  # int64 per row
    rating: np.ndarray  # code into levels
    offsets: np.ndarray  # int64 [users + 1]
    users: pa.Array  # local user -> id text
    items: pa.Array  # iid -> id text
    item_counts: np.ndarray  # int64 [items]
    levels: np.ndarray  # float64
    first_uid: int = 0


def per_user(user: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int64 per row: how many rows of the row's user have ``mask``; ``user`` sorted (runs of equal codes)."""
    if not len(user):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], user[1:] != user[:-1]]))
    counts = np.add.reduceat(mask.astype(np.int64), starts)
    return np.repeat(counts, np.diff(np.append(starts, len(user))))


def filter_state(
    rows: Sorted, levels: np.ndarray, cfg: ShardsConfig, dedup: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The filters that need only each user's own rows, as :func:`data_shards.split.apply_filters` and the
    reference reader apply them: (state int8 per row: ALIVE, DUPLICATE (``dedup`` and not
    shards.duplicates=keep: a repeat of an earlier row's user, item and time), BELOW_THRESHOLD
    (shards.rating_threshold), TOO_SHORT (fewer than MIN_USER_INTERACTIONS events left); weight bool per
    row: whether the row counts as an event — shards.duplicates=keep counts a repeat as none).

    ``rows`` (user, item, ts, rating codes into ``levels``) are sorted by (user, time, file order) and hold
    every row of each of their users: the whole log (local engine) or one partition of users (Ray)."""
    n = len(rows.user)
    state = np.zeros(n, dtype=np.int8)
    alive = np.ones(n, dtype=bool)
    if dedup and cfg.duplicates != "keep":
        dup = repeats(rows, alive)
        state[dup] = DUPLICATE
        alive &= ~dup
    if cfg.rating_threshold is not None:
        low = alive & ~(levels[rows.rating] >= cfg.rating_threshold)
        state[low] = BELOW_THRESHOLD
        alive &= ~low
    # Every count is of distinct events: a row repeating one (shards.duplicates=keep) weighs 0.
    weight = alive & ~repeats(rows, alive) if cfg.duplicates == "keep" else alive.copy()
    short = alive & (per_user(rows.user, weight) < MIN_USER_INTERACTIONS)
    state[short] = TOO_SHORT
    weight &= ~short
    return state, weight


def coarse_power(ts: np.ndarray) -> int:
    """How many times (0-3) 1000 divides every time in ``ts`` (int64, non-empty)."""
    power = 0
    while power < 3 and not (ts % 1000 ** (power + 1)).any():
        power += 1
    return power


def coarsen(source: Source, power: int) -> int:
    """Set ``source.unit`` to the coarsest of s/ms/us/ns holding every time exactly (``power``: what
    :func:`coarse_power` found over the rows left after duplicates); how many times to divide by 1000."""
    if source.coarsened:  # the reference reader did it
        return 0
    at = TIME_UNITS.index(source.unit)
    steps = min(power, at)
    source.unit = TIME_UNITS[at - steps]
    return steps


def k_core(
    counts: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    n_users: int,
    n_items: int,
    cfg: ShardsConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """The k-core (shards.min_user_interactions / min_item_interactions) as (user ok, item ok): bool per
    code. ``counts(users_ok, items_ok)`` gives the weight (events) per user and per item code of the rows
    still alive: state ALIVE, user and item ok. Each round drops every user and item under its minimum,
    until a round drops none — the rounds of the reference's loop; a row is kept iff its user and item
    are. Every user or item with an alive row has a weight >= 1 (a repeat's first row is alive with it),
    so "under the minimum with a weight" is "has rows to drop"."""
    users_ok = np.ones(n_users, dtype=bool)
    items_ok = np.ones(n_items, dtype=bool)
    while True:
        user_w, item_w = counts(users_ok, items_ok)
        low_u = (user_w > 0) & (user_w < cfg.min_user_interactions)
        low_i = (item_w > 0) & (item_w < cfg.min_item_interactions)
        if not (low_u.any() or low_i.any()):
            return users_ok, items_ok
        users_ok &= ~low_u
        items_ok &= ~low_i


def duplicate_message(source: Source, line: int, first: int, user: str, item: str, total: int) -> str:
    """The reference's line for shards.duplicates=error: the repeat with the smallest file position."""
    where = source.where
    return (
        f"{source.log_name}: {where} {line}: duplicate of {where} {first} (user {user!r}, item {item!r}, "
        f"same timestamp); {total} duplicate rows in all (shards.duplicates=drop drops them, keep keeps them)"
    )


def _duplicate_error(rows: Sorted, dup: np.ndarray, source: Source) -> DataError:
    first_dup = np.flatnonzero(dup)
    j = int(first_dup[np.argmin(rows.line[first_dup])])
    same = (rows.user == rows.user[j]) & (rows.item == rows.item[j]) & (rows.ts == rows.ts[j])
    user = id_text(rows.user_ids.take(pa.array([rows.user[j]])))[0].as_py()
    item = id_text(rows.item_ids.take(pa.array([rows.item[j]])))[0].as_py()
    first = int(rows.line[same].min())
    return DataError(duplicate_message(source, int(rows.line[j]), first, user, item, int(dup.sum())))


def filter_report(
    source: Source,
    cfg: ShardsConfig,
    before: dict[str, int],
    by_state: dict[int, int],
    k_core_rows: int,
    kept: dict[str, int],
    duplicates_kept: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the manifest's ``filters``, its ``rows``) from what the filters did: ``before`` = interactions,
    users and items left after duplicates; ``by_state`` = rows per :func:`filter_state` state;
    ``k_core_rows`` = rows the k-core dropped; ``kept`` = interactions, users and items left. DataError
    when nothing is left; AssertionError when the counts do not reconcile."""
    if not kept["interactions"]:
        raise DataError(
            f"no interactions left after filtering (shards.min_user_interactions={cfg.min_user_interactions}, "
            f"shards.min_item_interactions={cfg.min_item_interactions}, "
            f"shards.rating_threshold={cfg.rating_threshold}) of {before['interactions']} read"
        )
    removed = {"bad_line": 0, "missing_value": 0, "duplicate": 0, **source.removed}
    if not source.duplicates_resolved:  # else the reference reader counted them
        removed["duplicate"] = by_state.get(DUPLICATE, 0)
    removed["rating_threshold"] = by_state.get(BELOW_THRESHOLD, 0)
    removed["too_short"] = by_state.get(TOO_SHORT, 0)
    removed["k_core"] = k_core_rows
    stats = {
        "min_user_interactions": cfg.min_user_interactions,
        "min_item_interactions": cfg.min_item_interactions,
        "rating_threshold": cfg.rating_threshold,
        "removed_interactions": before["interactions"] - kept["interactions"],
        "removed_users": before["users"] - kept["users"],
        "removed_items": before["items"] - kept["items"],
    }
    reasons = ("bad_line", "missing_value", "duplicate", "rating_threshold", "too_short", "k_core")
    counts_rows = {
        "read": source.rows_read,
        "kept": kept["interactions"],
        "removed": {reason: int(removed.get(reason, 0)) for reason in reasons},
        "duplicates_kept": duplicates_kept,
    }
    if counts_rows["read"] != counts_rows["kept"] + sum(counts_rows["removed"].values()):
        raise AssertionError(f"row counts do not reconcile: {counts_rows}")
    return stats, counts_rows


def apply_filters(
    rows: Sorted, source: Source, cfg: ShardsConfig
) -> tuple[Kept, dict[str, Any], dict[str, Any]]:
    """Duplicates, ``shards.rating_threshold``, too_short and the k-core exactly as
    :func:`data_shards.split.apply_filters` and the reference reader apply them; (kept rows, filter
    stats, row counts)."""
    state, weight = filter_state(rows, rows.levels, cfg, dedup=not source.duplicates_resolved)
    dup = state == DUPLICATE
    if cfg.duplicates == "error" and dup.any():
        raise _duplicate_error(rows, dup, source)
    rows.line = np.zeros(0, dtype=np.int64)  # file order only named a duplicate's line: free it
    post = ~dup
    if not post.any():
        raise DataError(f"{source.log_name}: no interactions found")
    steps = coarsen(source, coarse_power(rows.ts[post]))
    if steps:
        rows.ts //= 1000**steps
    n_users, n_items = len(rows.user_ids), len(rows.item_ids)
    before = {
        "interactions": int(np.count_nonzero(post)),
        "users": int(np.count_nonzero(np.bincount(rows.user[post], minlength=n_users))),
        "items": int(np.count_nonzero(np.bincount(rows.item[post], minlength=n_items))),
    }
    del post, dup
    alive0 = state == ALIVE

    def counts(users_ok: np.ndarray, items_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        counted = weight & alive0 & users_ok[rows.user] & items_ok[rows.item]
        user = rows.user if counted.all() else rows.user[counted]
        item = rows.item if counted.all() else rows.item[counted]
        return np.bincount(user, minlength=n_users), np.bincount(item, minlength=n_items)

    users_ok, items_ok = k_core(counts, n_users, n_items, cfg)
    alive = alive0 & users_ok[rows.user] & items_ok[rows.item]
    by_state = dict(zip(*(x.tolist() for x in np.unique(state, return_counts=True))))
    n_kept = int(np.count_nonzero(alive))
    # Under shards.duplicates=keep a kept row repeating an earlier kept row is exactly a kept row of
    # weight 0: its first row has the same user and item, so the k-core kept both or neither.
    duplicates_kept = int(np.count_nonzero(alive & ~weight)) if cfg.duplicates == "keep" else 0
    kept = _dense(rows, alive) if n_kept else None
    stats, counts_rows = filter_report(
        source, cfg, before, by_state, int(np.count_nonzero(alive0)) - n_kept,
        {"interactions": n_kept, "users": len(kept.users) if kept else 0, "items": len(kept.items) if kept else 0},
        duplicates_kept,
    )  # fmt: skip
    assert kept is not None  # filter_report raised when nothing is left
    return kept, stats, counts_rows


def renumber(counts: np.ndarray, ids: pa.Array) -> tuple[np.ndarray, pa.Array, bool]:
    """Dense indices for the codes with a count > 0: (int32 new index per old code, -1 for the others; the
    surviving ids in natural order; whether that order differs from the old one). It does when the
    filters removed every id that made the ids sort as text (they then sort as numbers)."""
    present = np.flatnonzero(counts)
    survivors = ids.take(pa.array(present))
    perm = natural_permutation(survivors)
    new = np.full(len(ids), -1, dtype=np.int32)
    new[present[perm]] = np.arange(len(present), dtype=np.int32)
    return new, survivors.take(pa.array(perm)), bool((perm != np.arange(len(perm))).any())


def _dense(rows: Sorted, alive: np.ndarray) -> Kept:
    idx = np.flatnonzero(alive)
    user_new, users, moved = renumber(
        np.bincount(rows.user[idx], minlength=len(rows.user_ids)), rows.user_ids
    )
    item_new, items, _ = renumber(np.bincount(rows.item[idx], minlength=len(rows.item_ids)), rows.item_ids)
    uid = user_new[rows.user[idx]]
    if moved:  # users now sort otherwise: move their blocks (each keeps its (time, file order))
        idx = idx[np.argsort(uid, kind="stable")]
        uid = user_new[rows.user[idx]]
    iid = item_new[rows.item[idx]]
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(uid, minlength=len(users)), out=offsets[1:])
    return Kept(
        uid=uid,
        iid=iid,
        ts=rows.ts[idx],
        rating=rows.rating[idx],
        offsets=offsets,
        users=id_text(users),
        items=id_text(items),
        item_counts=np.bincount(iid, minlength=len(items)).astype(np.int64),
        levels=rows.levels,
    )


# --------------------------------------------------------------------------- windows


def window_counts(
    lengths: np.ndarray, max_history: int, prefix_records: bool = False, stride: int | None = None
) -> np.ndarray:
    """int64 per user: how many training windows :func:`window_plan` gives a user with ``lengths``
    training items."""
    n = np.asarray(lengths, dtype=np.int64)
    if prefix_records:
        return np.maximum(n - 1, 0)
    s = max_history if stride is None else stride
    # Window k (0 = newest) ends at n - k*s; it exists while it ends at >= 2 and the window after it
    # (k - 1) did not start at 0.
    reach = np.where(n >= 2, (n - 2) // s + 1, 0)
    after = 1 + np.where(n >= max_history + 2, (n - max_history - 2) // s + 1, 0)
    return np.minimum(reach, after)


def train_order(total: int) -> np.ndarray:
    """The reference's seeded order of the training records (``split.train_records``): output record k is
    window ``order[k]``, windows numbered by user, each user's oldest first. int64 [total]."""
    return np.random.default_rng(0).permutation(total)


def window_plan(
    lengths: np.ndarray, max_history: int, prefix_records: bool = False, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`data_shards.split.train_windows` of every user at once: (user, lo, hi, first_new_target)
    int64 arrays, users in order and each user's windows oldest first. ``lengths``: training items per
    user (the user's interactions minus the valid and test targets)."""
    n = np.asarray(lengths, dtype=np.int64)
    count = window_counts(n, max_history, prefix_records, stride)
    s = max_history if stride is None else stride
    total = int(count.sum())
    user = np.repeat(np.arange(len(n), dtype=np.int64), count)
    first = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(count, out=first[1:])
    j = np.arange(total, dtype=np.int64) - first[user]  # window index within the user, oldest first
    if prefix_records:
        hi = j + 2
        lo = np.maximum(0, hi - 1 - max_history)
    else:
        hi = n[user] - (count[user] - 1 - j) * s
        lo = np.maximum(0, hi - max_history - 1)
    covered = np.ones(total, dtype=np.int64)
    covered[1:] = np.where(j[1:] > 0, hi[:-1], 1)  # the previous window of the same user reached here
    return user, lo, hi, np.maximum(1, covered - lo)


# --------------------------------------------------------------------------- records as JSON text


class RecordTexts:
    """Per-row and per-user text pieces of the records, made once."""

    def __init__(self, kept: Kept) -> None:
        self.kept = kept
        self.user_json = json_strings(kept.users)
        # json.dumps writes a float as repr(); one string per distinct rating.
        self.levels = pa.array([json.dumps(float(x)) for x in kept.levels], pa.string())

    def lists(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[pa.Array, pa.Array, pa.Array]:
        """items, ratings and timestamps of rows [start, start + length) of each record, comma-joined."""
        off = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=off[1:])
        idx = np.repeat(starts - off[:-1], lengths) + np.arange(off[-1], dtype=np.int64)
        offsets = pa.array(off.astype(np.int32))
        k = self.kept
        return (
            _joined(offsets, pc.cast(pa.array(k.iid[idx]), pa.string())),
            _joined(offsets, self.levels.take(pa.array(k.rating[idx].astype(np.int64)))),
            _joined(offsets, pc.cast(pa.array(k.ts[idx]), pa.string())),
        )

    def head(self, user: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
        """``{"user":…,"uid":…,"items":[…],"ratings":[…],"timestamps":[…]`` of each record; ``user``: local
        user indices (uid = ``kept.first_uid`` + user)."""
        items, ratings, times = self.lists(starts, lengths)
        uid = pa.array(user + self.kept.first_uid)
        return pc.binary_join_element_wise(
            '{"user":', self.user_json.take(pa.array(user)), ',"uid":', pc.cast(uid, pa.string()),
            ',"items":[', items, '],"ratings":[', ratings, '],"timestamps":[', times, "]", "",
        )  # fmt: skip


def _joined(offsets: pa.Array, values: pa.Array) -> pa.Array:
    return pc.binary_join(pa.ListArray.from_arrays(offsets, values), ",")


def window_texts(
    kept: Kept, texts: RecordTexts, user: np.ndarray, lo: np.ndarray, hi: np.ndarray, first_new: np.ndarray
) -> pa.Array:
    """Training records of windows [lo, hi) of local users ``user`` (int64 arrays, one entry per record:
    :func:`window_plan`'s columns), each text ending with a comma."""
    head = texts.head(user, kept.offsets[user] + lo, hi - lo)
    return pc.binary_join_element_wise(
        head, ',"first_new_target":', pc.cast(pa.array(first_new), pa.string()), "},", ""
    )


def train_chunks(kept: Kept, texts: RecordTexts, cfg: ShardsConfig) -> Iterator[pa.Array]:
    """Training records (each text ending with a comma) in the reference's seeded order, a chunk at a
    time: the window plan of every user, permuted by :func:`train_order`."""
    lengths = np.diff(kept.offsets) - 2
    user, lo, hi, first_new = window_plan(lengths, cfg.max_history, cfg.prefix_records, cfg.window_stride)
    order = train_order(len(user))
    for a in range(0, len(order), CHUNK_RECORDS):
        pick = order[a : a + CHUNK_RECORDS]
        yield window_texts(kept, texts, user[pick], lo[pick], hi[pick], first_new[pick])


def eval_chunks(
    kept: Kept, texts: RecordTexts, max_history: int
) -> Iterator[tuple[int, pa.Array, pa.Array, pa.Array]]:
    """(first local user, valid records, test records, histories.jsonl lines) of consecutive users, one
    of each per user; a record text ends with a comma, a history line with a newline. The test record is the history's window and seen set
    (``split.user_histories``), so a history line is the test record plus ``untrained``."""
    # Seen sets are sorted as user * n_items + item keys: any n_items above every item index works (a
    # Ray partition's Kept holds its users' rows, not the catalogue).
    offsets, n_users = kept.offsets, len(kept.users)
    n_items = int(kept.iid.max()) + 1 if len(kept.iid) else 1
    u0 = 0
    while u0 < n_users:
        by_rows = int(np.searchsorted(offsets, offsets[u0] + CHUNK_ROWS, side="right")) - 1
        u1 = min(n_users, u0 + CHUNK_RECORDS, max(u0 + 1, by_rows))
        uid = np.arange(u0, u1, dtype=np.int64)
        n = offsets[u0 + 1 : u1 + 1] - offsets[u0:u1]
        r0, r1 = int(offsets[u0]), int(offsets[u1])
        local = np.repeat(np.arange(u1 - u0, dtype=np.int64), n)
        pos = np.arange(r1 - r0, dtype=np.int64) - (offsets[u0:u1] - r0)[local]
        iid = kept.iid[r0:r1].astype(np.int64)
        out = []
        for back in (2, 1):  # valid, test: the target is the back-th last interaction
            target = n - back
            lo = np.maximum(0, target - max_history)
            head = texts.head(uid, offsets[u0:u1] + lo, target + 1 - lo)
            before = pos < target[local]
            keys = np.sort(local[before] * n_items + iid[before])  # a sort: np.unique hashes, slower here
            keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
            seen_off = np.zeros(u1 - u0 + 1, dtype=np.int64)
            np.cumsum(np.bincount(keys // n_items, minlength=u1 - u0), out=seen_off[1:])
            seen = _joined(
                pa.array(seen_off.astype(np.int32)), pc.cast(pa.array(keys % n_items), pa.string())
            )
            out.append(pc.binary_join_element_wise(head, ',"seen":[', seen, "]", ""))
        valid, test = out
        yield (
            u0,
            pc.binary_join_element_wise(valid, "},", ""),
            pc.binary_join_element_wise(test, "},", ""),
            pc.binary_join_element_wise(test, ',"untrained":2}\n', ""),
        )
        u0 = u1


# In a stream of (split, texts) for build.write_texts: the key of histories.jsonl lines.
HISTORY_LINES = "histories"


def text_bytes(texts: pa.Array) -> tuple[memoryview, np.ndarray]:
    """(the data buffer, int64 offsets [n + 1]) of a string or large_string array: its strings back to
    back."""
    width = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], dtype=width)[texts.offset : texts.offset + len(texts) + 1]
    return memoryview(texts.buffers()[2]), offsets.astype(np.int64)


def items_lines(
    items: pa.Array, item_counts: np.ndarray, titles: dict[str, str], meta: dict[str, dict[str, Any]]
) -> bytes:
    """``items.jsonl``: one JSON object per dense item (index, item_id, title, count, meta); ``items``:
    the ids' text by dense index, ``item_counts``: int64 interactions per item."""
    if titles or meta:  # metadata formats (MovieLens, Amazon): one dict per item, as the reference
        lines = [
            json.dumps(
                {"index": i, "item_id": item_id, "title": titles.get(item_id, ""),
                 "count": int(item_counts[i]), "meta": meta.get(item_id) or {}},
                separators=(",", ":"), ensure_ascii=False,
            ).encode() + b"\n"
            for i, item_id in enumerate(items.to_pylist())
        ]  # fmt: skip
        return b"".join(lines)
    n = len(items)
    text = pc.binary_join_element_wise(
        '{"index":', pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string()), ',"item_id":',
        json_strings(items), ',"title":"","count":', pc.cast(pa.array(item_counts), pa.string()),
        ',"meta":{}}\n', "",
    )  # fmt: skip
    data, off = text_bytes(text)
    return bytes(data[off[0] : off[-1]])


# --------------------------------------------------------------------------- the engine


@dataclass
class Prepared:
    """What the local engine knows before writing: the kept rows and the manifest's counts."""

    source: Source
    kept: Kept
    filters: dict[str, Any]
    rows: dict[str, Any]


class Engine:
    """One DuckDB connection with the configured threads, memory limit and spill directory."""

    def __init__(self, cfg: ShardsConfig) -> None:
        import duckdb

        self.spill = tempfile.mkdtemp(prefix="recgpt-duckdb-")
        config: dict[str, Any] = {
            "memory_limit": f"{int(cfg.engine_memory_gb * 1024)}MB",
            "temp_directory": self.spill,
            "preserve_insertion_order": False,  # every order that matters is an ORDER BY
        }
        if cfg.engine_threads:
            config["threads"] = cfg.engine_threads
        try:
            self.con = duckdb.connect(":memory:", config=config)
            # Parquet statistics leave NaN out of a column's min/max, from which DuckDB's statistics
            # propagation concludes isnan(x) is false for every row (2.0.1): a NaN rating would be kept.
            self.con.execute("SET disabled_optimizers = 'statistics_propagation'")
            self.con.execute("SET enable_progress_bar = false")  # a long sort would draw one on a terminal
        except BaseException:  # no spill directory left behind
            shutil.rmtree(self.spill, ignore_errors=True)
            raise

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.spill, ignore_errors=True)


def read_source(engine: Engine, input_path: str | os.PathLike, cfg: ShardsConfig) -> Source:
    """Read the log into the DuckDB view or table ``raw`` (line, user, item, rating, ts) of ``engine``:
    one dispatch, the columnar readers or else the reference reader. Raises duckdb.Error when DuckDB
    runs out of memory or spill space, DataError for the input's own problems."""
    import duckdb

    fmt, log, meta_file = resolve_input(input_path, cfg)
    source = None
    try:
        if fmt == "parquet":
            source = _parquet_source(engine.con, log, meta_file, cfg)
        elif fmt in ("csv", "ml-latest"):
            source = _csv_source(engine.con, log, meta_file, fmt, cfg, engine.spill)
    except duckdb.Error:  # a file DuckDB cannot read: the reference reader names the problem
        source = None
    if source is None:
        engine.con.execute("DROP VIEW IF EXISTS src")
        engine.con.execute("DROP TABLE IF EXISTS csv_rows")
        source = _reference_source(engine.con, input_path, cfg)
    return source


def _engine_failed(input_path: str | os.PathLike, e: BaseException) -> DataError:
    return DataError(
        f"{input_path}: the local build engine failed ({one_line(e)}); shards.engine_memory_gb, "
        "shards.engine_threads and the free space of the temporary directory bound it"
    )


def prepare(input_path: str | os.PathLike, cfg: ShardsConfig) -> Prepared:
    """Read, deduplicate, filter and sort the log (the module docstring); DataError as the reference."""
    import duckdb

    engine = Engine(cfg)
    try:
        source = read_source(engine, input_path, cfg)
        rows = sort_rows(engine.con)
    except duckdb.Error as e:  # out of memory or of spill space: one line, exit 2
        raise _engine_failed(input_path, e) from None
    finally:
        engine.close()
    kept, filters, counts = apply_filters(rows, source, cfg)
    return Prepared(source, kept, filters, counts)


def read_raw(input_path: str | os.PathLike, cfg: ShardsConfig) -> tuple[Source, pa.Table]:
    """The log as this engine's readers read it, checked but neither sorted nor filtered: (its Source;
    a table of line int64 (file order), user, item (integer or string), rating (float64 or float32), ts
    int64). The Ray engine starts from it for the inputs its workers do not read themselves; the table is
    in memory (the reference reader's inputs are anyway)."""
    import duckdb

    engine = Engine(cfg)
    try:
        source = read_source(engine, input_path, cfg)
        table = engine.con.sql("SELECT line, user, item, rating, ts FROM raw").to_arrow_table()
    except duckdb.Error as e:
        raise _engine_failed(input_path, e) from None
    finally:
        engine.close()
    return source, table
