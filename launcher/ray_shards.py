"""``recgpt shards build --engine ray``: the columnar build as a Ray Data pipeline, past one machine.

Why Ray Data: Ray is already the project's cluster (Ray Train, Tune, ``ray job submit``), and Ray Data
does what the build needs across its nodes — parallel reads from shared storage, group-bys that bring
every row of a user together (a shuffle through Ray's object store, which spills to disk), a
distributed sort, and streaming the sorted result back to one process in order. No hand-written tasks.

What runs where (the per-block work is :mod:`data_shards.partitioned`, numpy/pyarrow/DuckDB, reusing
the local engine's own functions; this module only wires Ray Data to it):

* workers: read and check every Parquet row group (a local path or ``s3://…`` through
  :mod:`data_shards.storage`); code rows; group them by user partition, sort each partition by (user,
  time, file order) and run the per-user filters; count events per user and item of each block for
  each k-core round; assemble every record's JSON text; sort the texts by (split, place in the output);
* the driver: the distinct ids in natural order and the partition cut points; the sums of the blocks'
  counts and the k-core decisions (arrays of one entry per user and item — summed here as the blocks
  stream in: Ray Data's group-by aggregation was ~100x slower for this); the permutation of the
  training windows; writing the tar shards from the sorted stream (:func:`data_shards.build.write_texts`,
  the local engine's writer), then publishing them to ``--out`` (a directory or ``s3://…``) as every
  engine does.

Inputs the workers cannot read themselves — anything but a generic Parquet log the columnar checks
take: MovieLens, Amazon, CSV, JSON lines, the sequence files, a zip member, Parquet with values only the
reference reader parses exactly — are read on the driver by the local engine's readers (one log line
says so) and handed to the same pipeline; from a URL that is refused (DataError, exit 2). Periodic builds
(``shards.base``) run on the reference path, also with a log line. The output equals the local
engine's byte for byte (tests/test_ray_shards.py).

Ray Data settings (process-wide, for this command): progress bars and the per-execution log lines off,
blocks kept in order, and the pull-based sort shuffle — the default hash shuffle starts aggregator actors
whose start-up (~5 s per group-by on 2 CPUs) dwarfs a build of a few million rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from configs import DataError, RecgptError, ShardsConfig, sha256_bytes
from data_shards import columnar, partitioned, storage
from data_shards.build import Parts, build_shards, source_entry, write_texts
from data_shards.ingest import InputFile, resolve_input
from data_shards.manifest import ITEMS


def _log(msg: str) -> None:
    print(f"recgpt shards: {msg}", file=sys.stderr, flush=True)


def build(
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ShardsConfig,
    *,
    force: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """:func:`data_shards.build.build_shards` with the Ray engine: connects to RAY_ADDRESS, else starts
    a local Ray with ``shards.engine_threads`` CPUs (0 = every core) and stops it at the end; a Ray
    already started in this process is used as it is. Returns the manifest; DataError / ConfigError
    (one line) for bad input, as the local engine."""
    import ray

    from launcher.ray_launch import _connect

    _check_url(input_path, cfg)  # before connecting: no cluster needed to refuse it
    started = False
    if cfg.base:
        _log("shards.base: a periodic build runs on the reference path, not on Ray")
    elif not ray.is_initialized():
        _connect(cfg.engine_threads or None)
        started = True
    try:
        with _task_errors():
            return build_shards(input_path, out, cfg, force=force, command=command, engine=ray_parts)
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _task_errors() -> Iterator[None]:
    """A recgpt error raised inside a Ray task (wrapped by Ray in a RayTaskError, and by Ray Data)
    surfaces as the original one-line error."""
    try:
        yield
    except RecgptError:
        raise
    except Exception as e:
        cause = _recgpt_cause(e)
        if cause is None:
            raise
        raise type(cause)(str(cause)) from None


def _recgpt_cause(e: BaseException) -> RecgptError | None:
    from ray.exceptions import RayTaskError

    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        # RayTaskError subclasses the task's exception class but carries Ray's traceback text as its
        # message; the task's own exception is its .cause.
        if isinstance(x, RecgptError) and not isinstance(x, RayTaskError):
            return x
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def _data_context() -> None:
    """Ray Data settings of this process (see the module docstring for why)."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True  # the driver reads the sorted texts in order
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # "Dataset … execution finished in …" per execution at INFO; warnings and errors still show, but
    # the one saying that progress bars are off, as asked.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- reading


def _check_url(input_path: str | os.PathLike, cfg: ShardsConfig) -> None:
    """From a URL the workers read one Parquet file; anything else is refused (no silent download)."""
    name = str(input_path)
    if storage.is_url(name) and (
        cfg.format not in ("auto", "parquet") or not (cfg.format == "parquet" or name.endswith(".parquet"))
    ):
        raise DataError(
            f"{name}: shards.engine=ray reads a log from a URL only as one Parquet file (a .parquet name or "
            "shards.format=parquet); copy other formats to local disk"
        )


def _read(
    input_path: str | os.PathLike, cfg: ShardsConfig, cpus: int
) -> tuple[columnar.Source, Any, int, Any]:
    """(the log's Source; a Dataset of its present rows: line, user, item, rating, ts; their count; the
    distinct users, items and ratings as Arrow arrays)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    from ray.data.aggregate import Count, Max, Min, Sum, Unique

    name = str(input_path)
    remote = storage.is_url(name)
    if remote:
        _check_url(name, cfg)
        fmt, log, meta_file = "parquet", InputFile(name, name), None
    else:
        fmt, log, meta_file = resolve_input(input_path, cfg)
    why = f"{fmt} input"
    if fmt == "parquet" and log.member is None and not log.basename.endswith(".gz"):
        plan, groups = None, []
        try:
            schema, groups = partitioned.row_groups(log.path)
            plan = columnar.parquet_plan(schema, cfg)
            why = "column types only the reference reader reads"
            if not sum(g["rows"] for g in groups):  # (Ray Data's Unique fails on no rows at all)
                plan, why = None, "no rows"
        except DataError:  # damaged: the reference reader names the problem
            if remote:
                raise
            why = "not a Parquet file the workers can read"
        if plan is not None:
            checked = (
                ray.data.from_items(groups, override_num_blocks=len(groups))
                .map_batches(
                    partitioned.read_block, fn_kwargs={"plan": plan}, batch_size=1, batch_format="pyarrow"
                )
                .materialize()
            )
            # One pass: the checks' figures and the distinct values of the present rows (null elsewhere).
            figures = checked.aggregate(
                Count(alias_name="rows"),
                Count("miss_key", ignore_nulls=True, alias_name="missing"),
                Min("miss_key", alias_name="first_miss_key"),
                Sum("odd", alias_name="odd"),
                Min("ts", alias_name="ts_min"),
                Max("ts", alias_name="ts_max"),
                *(Unique(c, ignore_nulls=True, alias_name=c) for c in ("user", "item", "rating")),
            )
            stats = partitioned.check_stats(figures, plan)
            source = columnar.checked_source(log, meta_file, cfg, fmt, "row", stats)
            if source is not None:
                types = dict(zip(checked.schema().names, checked.schema().types))
                distinct = [pa.array(list(figures[c]), types[c]) for c in ("user", "item", "rating")]
                rows = checked.map_batches(partitioned.present_rows, batch_format="pyarrow", batch_size=None)
                n = stats.rows - stats.missing
                if checked.num_blocks() < partitioned.partition_count(n, cpus):
                    # A group-by shuffles into as many blocks as it gets: one per task.
                    rows = rows.repartition(partitioned.partition_count(n, cpus)).materialize()
                return source, rows, n, distinct
            why = "values only the reference reader parses exactly" if stats.odd else "no rows"
    if remote:
        raise DataError(f"{name}: shards.engine=ray cannot read this log from a URL ({why})")
    _log(
        f"{name}: read on this machine by the local engine's readers ({why}; the Ray workers read generic "
        "Parquet logs); filters and records run on Ray Data"
    )
    source, table = columnar.read_raw(input_path, cfg)
    table = partitioned.plain_ids(table)
    distinct = [pc.unique(table[c].combine_chunks()) for c in ("user", "item", "rating")]
    step = -(-table.num_rows // partitioned.partition_count(table.num_rows, cpus))
    slices = [table.slice(a, step) for a in range(0, table.num_rows, step)]
    return source, ray.data.from_arrow(slices), table.num_rows, distinct


# --------------------------------------------------------------------------- the engine


def ray_parts(input_path: str | os.PathLike, cfg: ShardsConfig) -> Parts:
    """The Ray engine for :func:`data_shards.build.build_shards` (``engine=``): the manifest's figures
    now, the records when ``write`` is called. Needs a connected Ray (:func:`build`)."""
    import ray

    _data_context()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    source, rows, n_rows, (users, items, ratings) = _read(input_path, cfg, cpus)
    parts = partitioned.partition_count(n_rows, cpus)
    codes = partitioned.make_codes(users, items, ratings, parts)
    n_users, n_items, n_levels = len(codes.users), len(codes.items), len(codes.levels)
    dedup = not source.duplicates_resolved
    filtered = (
        rows.map_batches(partitioned.encode_block, fn_kwargs={"codes": codes}, batch_format="pyarrow", batch_size=None)
        .groupby("part")
        .map_groups(
            partitioned.filter_partition, fn_kwargs={"levels": codes.levels, "cfg": cfg, "dedup": dedup},
            batch_format="pyarrow",
        )
        .materialize()
    )  # fmt: skip

    def count(
        users_ok: np.ndarray | None, items_ok: np.ndarray | None, first: bool = False
    ) -> partitioned.Counts:
        # Summed on the driver as the blocks stream in (np.add.at into one entry per user and item):
        # Ray Data's group-by aggregation took 100 s for the ~700K keys of 1M interactions on 2 CPUs,
        # this takes well under a second; the partials are one row per user and item of each block.
        batches = filtered.map_batches(
            partitioned.partial_counts, fn_kwargs={"users_ok": users_ok, "items_ok": items_ok, "first": first},
            batch_format="pyarrow", batch_size=None,
        ).iter_batches(batch_format="pyarrow", batch_size=None)  # fmt: skip
        return partitioned.merge_counts(batches, n_users, n_items, n_levels)

    first = count(None, None, first=True)
    if cfg.duplicates == "error" and first.first_duplicate is not None:
        raise _duplicate_error(filtered, first, source, codes)
    if not sum(n for state, n in (first.by_state or {}).items() if state != columnar.DUPLICATE):
        raise DataError(f"{source.log_name}: no interactions found")
    steps = columnar.coarsen(source, first.coarse_power or 0)
    last = first

    def k_core_counts(users_ok: np.ndarray, items_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nonlocal last
        # The first round counts what the first pass counted; each later one is a pass over the rows.
        last = first if users_ok.all() and items_ok.all() else count(users_ok.copy(), items_ok.copy())
        return last.user_w, last.item_w

    columnar.k_core(k_core_counts, n_users, n_items, cfg)
    filters, row_figures = partitioned.filter_figures(source, cfg, first, last)
    user_new, kept_users, _ = columnar.renumber(last.user_n, codes.users)
    item_new, kept_items, _ = columnar.renumber(last.item_n, codes.items)
    lengths = np.zeros(len(kept_users), dtype=np.int64)
    lengths[user_new[last.user_n > 0]] = last.user_n[last.user_n > 0]
    item_counts = np.zeros(len(kept_items), dtype=np.int64)
    item_counts[item_new[last.item_n > 0]] = last.item_n[last.item_n > 0]
    plan = partitioned.records_plan(lengths, kept_users, codes.levels, cfg)
    bounds = partitioned.partition_bounds(lengths, parts)

    def write(tmp: Path) -> tuple[str, str, dict[str, Any]]:
        items_bytes = columnar.items_lines(
            columnar.id_text(kept_items), item_counts, source.titles, source.meta
        )
        (tmp / ITEMS).write_bytes(items_bytes)
        texts = (
            filtered.map_batches(
                partitioned.final_block,
                fn_kwargs={"user_new": user_new, "item_new": item_new, "steps": steps, "bounds": bounds},
                batch_format="pyarrow", batch_size=None,
            )
            .groupby("part")
            .map_groups(partitioned.partition_records, fn_kwargs={"plan": plan}, batch_format="pyarrow")
            .sort(["split", "pos"])
        )  # fmt: skip
        pieces = (
            piece
            for batch in texts.iter_batches(batch_format="pyarrow", batch_size=None)
            for piece in partitioned.split_texts(batch)
        )
        histories_sha, splits = write_texts(tmp, cfg, pieces)
        return sha256_bytes(items_bytes), histories_sha, splits

    return Parts(
        source=source_entry(input_path, source),
        filters=filters,
        rows=row_figures,
        unit=source.unit,
        num_users=len(kept_users),
        num_items=len(kept_items),
        num_interactions=int(last.user_n.sum()),
        rating_levels=codes.levels[last.rating_n > 0].tolist(),
        write=write,
    )


def _duplicate_error(
    filtered: Any, first: partitioned.Counts, source: columnar.Source, codes: Any
) -> DataError:
    """shards.duplicates=error: the local engine's line for the duplicate with the smallest file position
    (two small passes, on the error path only)."""
    line = int(first.first_duplicate)  # type: ignore[arg-type]

    def matching(**equal: int) -> Any:
        return filtered.map_batches(
            partitioned.matching_rows, fn_kwargs={"equal": equal}, batch_format="pyarrow", batch_size=None
        )

    (row,) = matching(line=line).take_all()
    original = int(matching(u=int(row["u"]), i=int(row["i"]), ts=int(row["ts"])).min("line"))
    user = columnar.id_text(codes.users.take([int(row["u"])]))[0].as_py()
    item = columnar.id_text(codes.items.take([int(row["i"])]))[0].as_py()
    total = (first.by_state or {}).get(columnar.DUPLICATE, 0)
    return DataError(columnar.duplicate_message(source, line, original, user, item, total))
