"""The columnar build cut into blocks and partitions of users: what each task of the Ray engine runs
(``shards.engine=ray``, driven by ``launcher/ray_shards.py``), and the driver's decisions between its
passes. Plain numpy / pyarrow / DuckDB; Ray is never imported here (the layer contract).

Every step is the local engine's own code (:mod:`data_shards.columnar`) applied to a piece of the log,
or a sum of per-piece figures that the local engine computes over the whole:

1. **read** (a task per Parquet row group, :func:`read_block`): the log's columns through
   :mod:`data_shards.storage`, the file order from the row group's position, checked by
   :func:`columnar.check_sql` — the SQL the local engine's DuckDB view runs — in an in-process DuckDB.
2. **codes** (driver, :func:`make_codes`): the distinct users, items and ratings (Ray Data group-bys) in
   natural order (:func:`columnar.natural_ids`, :func:`columnar.rating_levels`); users are cut into
   contiguous code ranges of about equal rows, the partitions.
3. **per user** (:func:`encode_block`, then a group-by on the partition and :func:`filter_partition`):
   every row of a partition's users sorted by (user, time, file order) — the local engine's order — and
   :func:`columnar.filter_state` (duplicates, rating threshold, too short) on them.
4. **counts** (:func:`partial_counts` per block, summed by the driver in :func:`merge_counts`): events
   per user and item, the rounds of :func:`columnar.k_core`, the time unit, the row accounting
   (:func:`columnar.filter_report`).
5. **records** (:func:`final_block`, a group-by on new partitions of dense user ids, then
   :func:`partition_records`): :func:`columnar.window_texts` and :func:`columnar.eval_chunks` on the
   partition's users, each text keyed by its place in the output (training records by the inverse of
   :func:`columnar.train_order`, the others by user); a sort on (split, place) and the driver's
   :func:`data_shards.build.write_texts` make the same shards as the local engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from configs import DataError, ShardsConfig, one_line
from data_shards import columnar, storage
from data_shards.columnar import ALIVE, DUPLICATE, CheckPlan, CheckStats, Kept, Sorted

# Text rows of partition_records: split code -> what build.write_texts calls it.
TEXT_SPLITS = ("train", "valid", "test", columnar.HISTORY_LINES)
LINE = "__recgpt_line"  # the file-order column added beside the log's own columns while they are checked
MISS_FIELDS = 16  # miss_key = line * MISS_FIELDS + index of the first missing field
# Partitions of users: at most ~2M rows each (the memory of one task), and two per CPU when the log is
# large enough for them to be worth a task (~50K rows).
PART_MAX_ROWS = 2_000_000
PART_MIN_ROWS = 50_000

# partial_counts: the kinds of figures, each keyed by a code and summed over blocks.
USER, ITEM, RATING, POST_USER, POST_ITEM, STATE, COARSE, FIRST_DUPLICATE, KEPT_REPEATS = range(9)


def partition_count(rows: int, cpus: int) -> int:
    """How many partitions of users ``rows`` interactions are cut into on ``cpus`` CPUs."""
    return max(1, -(-rows // PART_MAX_ROWS), min(2 * max(1, cpus), -(-rows // PART_MIN_ROWS)))


# --------------------------------------------------------------------------- 1. read


def row_groups(url: str) -> tuple[pa.Schema, list[dict[str, Any]]]:
    """(the Arrow schema of the Parquet log at ``url``, one dict per row group: ``path``, ``row_group``,
    ``first_line``: the 1-based file position of its first row, ``rows``). Reads only the footer, through
    :mod:`data_shards.storage` (a path or any fsspec URL). DataError naming ``url`` when it is not a
    readable Parquet file."""
    import pyarrow.parquet as pq

    try:
        with storage.open_read(url) as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{url}: not a readable Parquet file ({one_line(e)})") from None
    groups, line = [], 1
    for k in range(meta.num_row_groups):
        rows = meta.row_group(k).num_rows
        groups.append({"path": str(url), "row_group": k, "first_line": line, "rows": rows})
        line += rows
    return meta.schema.to_arrow_schema(), groups


def check_block(table: pa.Table, plan: CheckPlan, first_line: int) -> pa.Table:
    """Check one block of a log's rows with the local engine's SQL (:func:`columnar.check_sql`).

    ``table``: the log's columns ``plan.columns`` of consecutive rows, the first at file position
    ``first_line``. Returns line int64, user and item (integer, or string), rating (float64, or float32
    as stored), ts int64 (null when missing), miss_key int64 (line * MISS_FIELDS + index in
    ``plan.missing`` of the row's first missing field; null when none is) and odd int8 (1: a value only
    the reference reader parses exactly). user, item and rating are null on a row missing any value, so
    that the distinct values counted over the blocks are those of the rows kept, as in the local
    engine's ``raw``."""
    import duckdb

    if LINE in table.column_names:
        raise DataError(f"the log has a column named {LINE!r}, which the Ray engine reserves")
    n = table.num_rows
    block = table.append_column(LINE, pa.array(np.arange(first_line, first_line + n, dtype=np.int64)))
    # One thread: the task holds one CPU of Ray's; DuckDB would otherwise start one per core.
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        con.execute("SET disabled_optimizers = 'statistics_propagation'")  # as columnar.Engine
        con.register("block", block)
        checked = columnar.check_sql(plan, '"' + LINE + '"', "block")
        out = con.sql(
            "SELECT line, CASE WHEN miss < 0 THEN user END AS user, CASE WHEN miss < 0 THEN item END AS item, "
            f"CASE WHEN miss < 0 THEN rating END AS rating, ts, CASE WHEN miss >= 0 THEN line * {MISS_FIELDS} "
            f"+ miss END AS miss_key, odd::TINYINT AS odd FROM ({checked})"
        ).to_arrow_table()
    finally:
        con.close()
    return plain_ids(out)


def plain_ids(table: pa.Table) -> pa.Table:
    """user and item as ``string`` when they are text (DuckDB may hand out string_view/large_string):
    one type everywhere, so ids compare and look up the same in every block."""
    for name in ("user", "item"):
        col = table[name]
        if not pa.types.is_integer(col.type) and col.type != pa.string():
            table = table.set_column(table.schema.get_field_index(name), name, pc.cast(col, pa.string()))
    return table


def read_block(batch: pa.Table, plan: CheckPlan) -> pa.Table:
    """Read and check the row groups listed in ``batch`` (rows of :func:`row_groups`), in order: one
    table as :func:`check_block` returns."""
    import pyarrow.parquet as pq

    out = []
    for group in batch.to_pylist():
        try:
            with storage.open_read(group["path"]) as f:
                table = pq.ParquetFile(f).read_row_group(group["row_group"], columns=list(plan.columns))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{group['path']}: row group {group['row_group']}: {one_line(e)}") from None
        out.append(check_block(table, plan, group["first_line"]))
    return pa.concat_tables(out)


def check_stats(figures: dict[str, Any], plan: CheckPlan) -> CheckStats:
    """The :class:`CheckStats` of a log from aggregates over its checked blocks: ``figures`` = rows,
    missing (rows), first_miss_key (the smallest miss_key), odd (rows), ts_min, ts_max (None where no
    row had one)."""
    key = figures["first_miss_key"]
    return CheckStats(
        rows=int(figures["rows"]),
        missing=int(figures["missing"] or 0),
        first_missing_line=None if key is None else int(key) // MISS_FIELDS,
        first_missing_field=None if key is None else list(plan.missing)[int(key) % MISS_FIELDS],
        odd=int(figures["odd"] or 0),
        ts_min=figures["ts_min"],
        ts_max=figures["ts_max"],
    )


def present_rows(table: pa.Table) -> pa.Table:
    """The rows of a checked block with every value present: line, user, item, rating, ts."""
    if "miss_key" in table.column_names:
        table = table.filter(pc.is_null(table["miss_key"]))
    return table.select(["line", "user", "item", "rating", "ts"])


# --------------------------------------------------------------------------- 2. codes


def partition_bounds(rows_per_key: np.ndarray, parts: int) -> np.ndarray:
    """int64 cut points of keys 0..n-1 (codes, in order) into at most ``parts`` contiguous ranges of
    about equal rows (``rows_per_key``: int64 per key); a key's partition is
    ``np.searchsorted(bounds, key, side="right")``."""
    total = np.cumsum(rows_per_key, dtype=np.int64)
    if parts <= 1 or not len(total):
        return np.zeros(0, dtype=np.int64)
    targets = total[-1] * np.arange(1, parts, dtype=np.float64) / parts
    cuts = np.searchsorted(total, targets, side="left") + 1
    return np.unique(cuts[(cuts > 0) & (cuts < len(total))]).astype(np.int64)


@dataclass
class Codes:
    """Dense codes of the distinct values, as the local engine's sort assigns them."""

    users: pa.Array  # distinct user ids, natural order: code = index
    items: pa.Array
    stored: np.ndarray  # distinct ratings as stored, ascending
    levels: np.ndarray  # the same as float64, as the reference reads them
    bounds: np.ndarray  # partition_bounds of the user codes


def make_codes(users: pa.Array, items: pa.Array, ratings: pa.Array, parts: int) -> Codes:
    """:class:`Codes` of the distinct users, items and ratings (in their column's type), the users cut
    into ``parts`` ranges of equal numbers of users (their rows are not known yet; the records pass
    balances by rows)."""
    users = columnar.natural_ids(users)
    stored, levels = columnar.rating_levels(ratings)
    return Codes(
        users=users,
        items=columnar.natural_ids(items),
        stored=stored,
        levels=levels,
        bounds=partition_bounds(np.ones(len(users), dtype=np.int64), parts),
    )


def _index(values: pa.ChunkedArray | pa.Array, value_set: pa.Array) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not pa.types.is_integer(values.type) and values.type != pa.string():
        values = pc.cast(values, pa.string())
    elif values.type != value_set.type:
        values = pc.cast(values, value_set.type)
    return pc.index_in(values, value_set=value_set).to_numpy(zero_copy_only=False).astype(np.int32)


def encode_block(table: pa.Table, codes: Codes) -> pa.Table:
    """The present rows of a block as codes: part int32 (its user's partition), u, i, r int32 (codes into
    ``codes``' users, items, stored ratings), ts int64, line int64."""
    table = present_rows(table)
    u = _index(table["user"], codes.users)
    rating = table["rating"].to_numpy()
    return pa.table(
        {
            "part": np.searchsorted(codes.bounds, u, side="right").astype(np.int32),
            "u": u,
            "i": _index(table["item"], codes.items),
            "r": np.searchsorted(codes.stored, rating).astype(np.int32),
            "ts": table["ts"].to_numpy().astype(np.int64),
            "line": table["line"].to_numpy().astype(np.int64),
        }
    )


# --------------------------------------------------------------------------- 3. per user


def _sorted(table: pa.Table, user: str, levels: np.ndarray) -> tuple[Sorted, np.ndarray]:
    """(the rows of ``table`` sorted by (``user``, ts, line) as a :class:`Sorted`, the sort order)."""
    cols = {c: table[c].to_numpy() for c in (user, "i", "ts", "r", "line")}
    order = np.lexsort((cols["line"], cols["ts"], cols[user]))
    none = pa.array([], pa.string())
    rows = Sorted(
        user=cols[user][order], item=cols["i"][order], ts=cols["ts"][order], rating=cols["r"][order],
        line=cols["line"][order], user_ids=none, item_ids=none, levels=levels,
    )  # fmt: skip
    return rows, order


def filter_partition(table: pa.Table, levels: np.ndarray, cfg: ShardsConfig, dedup: bool) -> pa.Table:
    """Every row of one partition's users (:func:`encode_block`'s columns) sorted by (user, time, file
    order), with :func:`columnar.filter_state`'s ``state`` int8 and ``weight`` bool: u, i, r, ts, line,
    state, weight."""
    rows, _ = _sorted(table, "u", levels)
    state, weight = columnar.filter_state(rows, levels, cfg, dedup)
    return pa.table(
        {"u": rows.user, "i": rows.item, "r": rows.rating, "ts": rows.ts, "line": rows.line,
         "state": state, "weight": weight}
    )  # fmt: skip


# --------------------------------------------------------------------------- 4. counts


def _keyed(kind: int, codes: np.ndarray, n: np.ndarray, w: np.ndarray | None = None) -> pa.Table:
    return pa.table(
        {
            "kind": np.full(len(codes), kind, dtype=np.int8),
            "code": codes.astype(np.int64),
            "n": n.astype(np.int64),
            "w": np.zeros(len(codes), np.int64) if w is None else w.astype(np.int64),
        }
    )


def _per_code(kind: int, codes: np.ndarray, weight: np.ndarray | None = None) -> pa.Table:
    values, inverse, n = np.unique(codes, return_inverse=True, return_counts=True)
    w = None if weight is None else np.bincount(inverse, weights=weight, minlength=len(values))
    return _keyed(kind, values, n, w)


def partial_counts(
    table: pa.Table, users_ok: np.ndarray | None, items_ok: np.ndarray | None, first: bool
) -> pa.Table:
    """Figures of one block of :func:`filter_partition`'s rows, each a (kind, code) key with counts n and
    w that :func:`merge_counts` sums over blocks: rows alive (state ALIVE, user and item ok; None = all
    ok) per USER and ITEM code (n rows, w events), per RATING code, KEPT_REPEATS (alive rows of weight
    0). With ``first``
    also: POST_USER / POST_ITEM (rows left after duplicates), STATE (rows per state), COARSE (code:
    :func:`columnar.coarse_power` of the block's rows after duplicates) and FIRST_DUPLICATE (code: the
    smallest file position of a duplicate) — these two are taken as minima, not sums."""
    u, i = table["u"].to_numpy(), table["i"].to_numpy()
    state, weight = table["state"].to_numpy(), table["weight"].to_numpy(zero_copy_only=False)
    alive = state == ALIVE
    if users_ok is not None:
        alive &= users_ok[u]
    if items_ok is not None:
        alive &= items_ok[i]
    w = weight[alive]
    out = [
        _per_code(USER, u[alive], w),
        _per_code(ITEM, i[alive], w),
        _per_code(RATING, table["r"].to_numpy()[alive]),
        _keyed(KEPT_REPEATS, np.zeros(1), np.array([np.count_nonzero(~w)])),
    ]
    if first:
        post = state != DUPLICATE
        out += [_per_code(POST_USER, u[post]), _per_code(POST_ITEM, i[post]), _per_code(STATE, state)]
        if post.any():
            power = columnar.coarse_power(table["ts"].to_numpy()[post])
            out.append(_keyed(COARSE, np.array([power]), np.ones(1)))
        if not post.all():
            line = table["line"].to_numpy()[~post].min()
            out.append(_keyed(FIRST_DUPLICATE, np.array([line]), np.ones(1)))
    return pa.concat_tables(out)


@dataclass
class Counts:
    """The figures of :func:`partial_counts` summed over every block, dense by code."""

    user_n: np.ndarray  # int64 [users]: alive rows
    user_w: np.ndarray  # int64 [users]: alive events
    item_n: np.ndarray
    item_w: np.ndarray
    rating_n: np.ndarray  # int64 [levels]
    kept_repeats: int
    post_users: int = 0  # users with a row left after duplicates (first pass only)
    post_items: int = 0
    by_state: dict[int, int] | None = None
    coarse_power: int | None = None  # None: no row left after duplicates
    first_duplicate: int | None = None  # file position


def merge_counts(batches: Iterator[pa.Table], n_users: int, n_items: int, n_levels: int) -> Counts:
    """:class:`Counts` from :func:`partial_counts`' (kind, code, n, w) rows of every block, summed (a key
    may come from many blocks)."""
    dense = {k: (np.zeros(size, np.int64), np.zeros(size, np.int64))
             for k, size in ((USER, n_users), (ITEM, n_items), (RATING, n_levels), (POST_USER, n_users),
                             (POST_ITEM, n_items))}  # fmt: skip
    by_state: dict[int, int] = {}
    minima: dict[int, int] = {}
    kept_repeats = 0
    for batch in batches:
        kind = batch["kind"].to_numpy()
        code, n, w = (batch[c].to_numpy() for c in ("code", "n", "w"))
        for k, (dn, dw) in dense.items():
            at = kind == k
            np.add.at(dn, code[at], n[at])
            np.add.at(dw, code[at], w[at])
        for c, m in zip(code[kind == STATE].tolist(), n[kind == STATE].tolist()):
            by_state[c] = by_state.get(c, 0) + m
        for k in (COARSE, FIRST_DUPLICATE):
            if (kind == k).any():
                low = int(code[kind == k].min())
                minima[k] = min(low, minima.get(k, low))
        kept_repeats += int(n[kind == KEPT_REPEATS].sum())
    return Counts(
        user_n=dense[USER][0], user_w=dense[USER][1], item_n=dense[ITEM][0], item_w=dense[ITEM][1],
        rating_n=dense[RATING][0], kept_repeats=kept_repeats,
        post_users=int(np.count_nonzero(dense[POST_USER][0])),
        post_items=int(np.count_nonzero(dense[POST_ITEM][0])),
        by_state=by_state, coarse_power=minima.get(COARSE), first_duplicate=minima.get(FIRST_DUPLICATE),
    )  # fmt: skip


def matching_rows(table: pa.Table, equal: dict[str, int]) -> pa.Table:
    """The rows of ``table`` whose columns equal ``equal``'s values (the rows behind an error message)."""
    mask = np.ones(table.num_rows, dtype=bool)
    for name, value in equal.items():
        mask &= table[name].to_numpy() == value
    return table.filter(pa.array(mask))


def filter_figures(
    source: columnar.Source, cfg: ShardsConfig, first: Counts, last: Counts
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's ``filters`` and ``rows`` (:func:`columnar.filter_report`) from the first counts
    pass (before the k-core) and the last (after it)."""
    by_state = first.by_state or {}
    post = sum(n for state, n in by_state.items() if state != DUPLICATE)
    kept = int(last.user_n.sum())
    return columnar.filter_report(
        source, cfg, {"interactions": post, "users": first.post_users, "items": first.post_items}, by_state,
        by_state.get(ALIVE, 0) - kept,
        {"interactions": kept, "users": int(np.count_nonzero(last.user_n)),
         "items": int(np.count_nonzero(last.item_n))},
        last.kept_repeats if cfg.duplicates == "keep" else 0,
    )  # fmt: skip


# --------------------------------------------------------------------------- 5. records


@dataclass
class RecordsPlan:
    """What every records task needs: the dense users and the place of every training window."""

    users: pa.Array  # id text per uid
    levels: np.ndarray  # float64
    window_first: np.ndarray  # int64 [users]: the number of each uid's oldest training window
    position: np.ndarray  # int64 [windows]: the output position of each window (inverse of train_order)
    max_history: int
    prefix_records: bool
    window_stride: int | None


def records_plan(lengths: np.ndarray, users: pa.Array, levels: np.ndarray, cfg: ShardsConfig) -> RecordsPlan:
    """The :class:`RecordsPlan` of dense users with ``lengths`` (int64 interactions per uid)."""
    count = columnar.window_counts(lengths - 2, cfg.max_history, cfg.prefix_records, cfg.window_stride)
    first = np.zeros(len(count), dtype=np.int64)
    np.cumsum(count[:-1], out=first[1:])
    order = columnar.train_order(int(count.sum()))
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order), dtype=np.int64)
    return RecordsPlan(
        users=columnar.id_text(users), levels=levels, window_first=first, position=position,
        max_history=cfg.max_history, prefix_records=cfg.prefix_records, window_stride=cfg.window_stride,
    )  # fmt: skip


def final_block(
    table: pa.Table, user_new: np.ndarray, item_new: np.ndarray, steps: int, bounds: np.ndarray
) -> pa.Table:
    """The kept rows of a block of :func:`filter_partition`'s rows: state ALIVE with a user and an item
    the k-core kept (``user_new`` / ``item_new``: int32 dense index per code, -1 when dropped). Returns
    part int32 (partition of the dense uid), uid, iid, r int32, ts int64 (divided by 1000 ``steps``
    times: the coarsest exact unit), line int64."""
    u, i = table["u"].to_numpy(), table["i"].to_numpy()
    uid, iid = user_new[u], item_new[i]
    keep = (table["state"].to_numpy() == ALIVE) & (uid >= 0) & (iid >= 0)
    uid = uid[keep]
    ts = table["ts"].to_numpy()[keep]
    return pa.table(
        {
            "part": np.searchsorted(bounds, uid, side="right").astype(np.int32),
            "uid": uid,
            "i": iid[keep],
            "r": table["r"].to_numpy()[keep],
            "ts": ts // 1000**steps if steps else ts,
            "line": table["line"].to_numpy()[keep],
        }
    )


def partition_records(table: pa.Table, plan: RecordsPlan) -> pa.Table:
    """Every record and history line of one partition's users (:func:`final_block`'s rows of a
    contiguous range of uids, all of each user's rows): split int8 (index into TEXT_SPLITS), pos int64
    (its place in that split's output: training records by ``plan.position``, the rest by uid), text
    (the local engine's bytes for it)."""
    rows, _ = _sorted(table, "uid", plan.levels)
    a = int(rows.user[0])
    local = (rows.user - a).astype(np.int32)
    n_users = int(local[-1]) + 1
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(local, minlength=n_users), out=offsets[1:])
    kept = Kept(
        uid=local, iid=rows.item, ts=rows.ts, rating=rows.rating, offsets=offsets,
        users=plan.users.slice(a, n_users), items=pa.array([], pa.string()),
        item_counts=np.zeros(0, np.int64), levels=plan.levels, first_uid=a,
    )  # fmt: skip
    texts = columnar.RecordTexts(kept)
    splits, places, out = [], [], []

    def emit(split: int, pos: np.ndarray, text: pa.Array) -> None:
        splits.append(np.full(len(pos), split, dtype=np.int8))
        places.append(pos)
        out.append(text)

    lengths = np.diff(offsets) - 2
    user, lo, hi, first_new = columnar.window_plan(
        lengths, plan.max_history, plan.prefix_records, plan.window_stride
    )
    local_first = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=n_users), out=local_first[1:])
    number = plan.window_first[a + user] + (np.arange(len(user), dtype=np.int64) - local_first[user])
    position = plan.position[number]
    for c in range(0, len(user), columnar.CHUNK_RECORDS):
        s = slice(c, c + columnar.CHUNK_RECORDS)
        emit(0, position[s], columnar.window_texts(kept, texts, user[s], lo[s], hi[s], first_new[s]))
    for u0, valid, test, history in columnar.eval_chunks(kept, texts, plan.max_history):
        uid = np.arange(a + u0, a + u0 + len(valid), dtype=np.int64)
        emit(1, uid, valid)
        emit(2, uid, test)
        emit(3, uid, history)
    return pa.table(
        {
            "split": np.concatenate(splits),
            "pos": np.concatenate(places),
            "text": pa.concat_arrays([pc.cast(t, pa.string()) for t in out]),
        }
    )


def split_texts(batch: pa.Table) -> Iterator[tuple[str, pa.Array]]:
    """(TEXT_SPLITS name, texts) of each run of one split in a batch sorted by (split, pos)."""
    split = batch["split"].to_numpy()
    text = batch["text"].combine_chunks() if isinstance(batch["text"], pa.ChunkedArray) else batch["text"]
    starts = np.flatnonzero(np.concatenate([[True], split[1:] != split[:-1]])) if len(split) else []
    ends = [*list(starts[1:]), len(split)]
    for a, b in zip(starts, ends):
        yield TEXT_SPLITS[int(split[a])], text.slice(int(a), int(b - a))
