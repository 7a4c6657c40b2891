"""Primary keys compared by range: which keys the target holds and the source snapshot lacks, and back.

Both sides sum a hash of their keys per key range, inside each database and at the same time (one
pass over the keys on each side, through the key index where there is one); only the keys of the
ranges whose sums differ are copied to the target and compared one by one. Delete detection uses it
to find deleted keys, and a full copy to count the keys it adds and removes.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ._connect import connect
from ._copy import stream
from ._run import TableRun, column_list, import_snapshot
from ._schema import SOFT_DELETE_COLUMN
from ._validate import RowSet, boundaries, bucket_expression, key_checksum, range_sums

logger = logging.getLogger(__name__)

_KEYS = "_copy_engine_keys"
_GONE = "_copy_engine_gone"
_DELETE_RANGES = 256
_KEYS_PER_DELETE_RANGE = 250


@dataclass(frozen=True)
class Spans:
    """Disjoint ranges `lower <= key < upper` of the first key column (None: unbounded), as text."""

    key: str
    key_type: str
    spans: list[tuple[str | None, str | None]]

    @classmethod
    def of_ranges(cls, key: str, key_type: str, bounds: list[str], numbers: list[int]) -> Spans:
        """The ranges numbered as `bucket_expression` numbers them, adjacent ones merged."""
        spans: list[tuple[str | None, str | None]] = []
        for number in sorted(numbers):
            lower = bounds[number - 1] if 0 < number <= len(bounds) else None
            upper = bounds[number] if number < len(bounds) else None
            if spans and spans[-1][1] is not None and spans[-1][1] == lower:
                spans[-1] = (spans[-1][0], upper)
            else:
                spans.append((lower, upper))
        return cls(key, key_type, spans)

    def rows(self, rows: sql.Composable, columns: list[str], prefix: str) -> tuple[sql.Composable, dict[str, object]]:
        """`select <columns> from <rows>` limited to the spans.

        The bounded spans are joined from an array of bounds, so each is one index range scan (a
        long `or` of ranges is evaluated row by row over the whole table); the open-ended first and
        last spans are separate branches.
        """
        column = sql.SQL("_rows.{}").format(sql.Identifier(self.key))
        key_type = sql.SQL(self.key_type)
        select = sql.SQL("select {} from {} as _rows").format(column_list(columns, "_rows"), rows)
        bounded = [(lower, upper) for lower, upper in self.spans if lower is not None and upper is not None]
        params: dict[str, object] = {}
        branches: list[sql.Composable] = []
        if bounded:
            params[f"{prefix}_lowers"] = [lower for lower, _ in bounded]
            params[f"{prefix}_uppers"] = [upper for _, upper in bounded]
            branches.append(sql.SQL(
                "{select} join unnest({lowers}::text[]::{type}[], {uppers}::text[]::{type}[]) as _spans(lower, upper) "
                "on {column} >= _spans.lower and {column} < _spans.upper").format(
                select=select, lowers=sql.Placeholder(f"{prefix}_lowers"), uppers=sql.Placeholder(f"{prefix}_uppers"),
                type=key_type, column=column))
        for index, (lower, upper) in enumerate(self.spans):
            if lower is not None and upper is not None:
                continue
            parts: list[sql.Composable] = []
            if lower is not None:
                name = f"{prefix}_from_{index}"
                params[name] = lower
                parts.append(sql.SQL("{} >= {}::{}").format(column, sql.Placeholder(name), key_type))
            if upper is not None:
                name = f"{prefix}_below_{index}"
                params[name] = upper
                parts.append(sql.SQL("{} < {}::{}").format(column, sql.Placeholder(name), key_type))
            branches.append(sql.SQL("{} where {}").format(select, sql.SQL(" and ").join(parts)) if parts else select)
        if not branches:
            return sql.SQL("{} where false").format(select), params
        return sql.SQL(" union all ").join(branches), params


@dataclass(frozen=True)
class KeySums:
    """Per-range (count, key hash sum) of both sides, ranges split at `bounds` of the first key column."""

    bounds: list[str]
    source: dict[int | None, tuple[int, int]]
    target: dict[int | None, tuple[int, int]]


def key_rows(run: TableRun) -> tuple[RowSet, RowSet]:
    key = run.shape.primary_key
    source_keys = RowSet(sql.SQL("({})").format(run.names.source_rows(key)))
    return source_keys, run.names.target_rows(key, live_only=run.table.delete_detection == "soft")


def key_sums(src: psycopg.Connection, tgt: psycopg.Connection, run: TableRun) -> KeySums:
    """Both sides sum a hash of their keys per key range, inside each database and at the same time."""
    names, shape = run.names, run.shape
    key = list(shape.primary_key)
    first = shape.column(key[0])
    assert first is not None
    source_keys, target_keys = key_rows(run)
    # reltuples is -1 until the first analyze; the table's size in bytes / 100 stands in for it.
    estimate = tgt.execute("select (case when reltuples >= 0 then reltuples else pg_relation_size(oid) / 100 end)"
                           "::bigint from pg_class where oid = %s::regclass", (names.target.as_string(tgt),)).fetchone()
    # A few hundred keys per range, so scattered deletes pull over only the ranges they touch; more
    # ranges cost the aggregation little (measured: 8,000 instead of 2,000 ranges on 2M keys, no change).
    ranges = min(max(int(estimate[0]) // _KEYS_PER_DELETE_RANGE if estimate else 0, _DELETE_RANGES), 32768)
    bounds = boundaries(src, source_keys, first.name, first.type_sql, ranges)
    bucket = bucket_expression(first.name, first.type_sql, bounds)
    checksum = key_checksum(key, first.type_sql)
    with ThreadPoolExecutor(max_workers=1) as pool:
        target_future = pool.submit(range_sums, tgt, target_keys, checksum, bucket, bounds)
        source_sums = range_sums(src, source_keys, checksum, bucket, bounds)
        target_sums = target_future.result()
    return KeySums(bounds, source_sums, target_sums)


def key_sums_beside(run: TableRun, snapshot: str) -> KeySums:
    """`key_sums` on two more connections: the source on the sync's snapshot, the target as committed."""
    table = run.table
    with connect(run.source_dsn, role="source", table=table.name) as src, \
            connect(run.target_dsn, role="target", table=table.name) as tgt:
        import_snapshot(src, snapshot)
        # Never wait behind the sync's own transaction (it would wait for this one): give up and let
        # the sync sum the target itself.
        tgt.execute("select set_config('lock_timeout', '1s', false)")
        sums = key_sums(src, tgt, run)
        src.rollback()
        tgt.rollback()
    return sums


def _differing_keys(run: TableRun, sums: KeySums, *, ranges_the_target_has: bool) -> tuple[Spans, RowSet] | None:
    """Copy the source keys of the ranges whose sums differ into a temporary table on the target.

    Returns the spans and the table's keys; None when no range differs.
    """
    key = list(run.shape.primary_key)
    first = run.shape.column(key[0])
    assert first is not None
    differing = [n for n in set(sums.target) | set(sums.source) if sums.target.get(n) != sums.source.get(n)]
    if ranges_the_target_has:
        differing = [n for n in differing if n in sums.target]
    if not differing:
        return None
    logger.info("%s: %d of %d key range(s) differ; comparing their keys", run.table.name, len(differing),
                max(len(sums.target), len(sums.source)))
    spans = Spans.of_ranges(first.name, first.type_sql, sums.bounds, [n for n in differing if n is not None])
    keys = sql.Identifier(_KEYS)
    run.tgt.execute(sql.SQL("create temporary table {} on commit drop as select {} from {} with no data").format(
        keys, column_list(key), run.names.target))
    source_in_spans, source_params = spans.rows(key_rows(run)[0].query, key, "source")
    stream(run.src, source_in_spans, source_params, run.tgt, keys, key, binary=run.plan.binary)
    run.tgt.execute(sql.SQL("analyze {}").format(keys))
    run.tgt.execute("select set_config('work_mem', '256MB', true)")  # one in-memory hash for the anti-join
    return spans, RowSet(keys)


def _missing(key: list[str], alias: str, keys: sql.Composable) -> sql.Composable:
    """`not exists` a row of `keys` with the key of the row `alias`."""
    return sql.SQL("not exists (select from {} as _k where {})").format(keys, sql.SQL(" and ").join(
        sql.SQL("_k.{0} = {1}.{0}").format(sql.Identifier(c), sql.Identifier(alias)) for c in key))


def detect_deletes(run: TableRun, sums: KeySums | None = None) -> int:
    """Find target keys missing from the source snapshot and delete (or mark) those rows.

    Only the keys of ranges whose key sums differ are copied over (read through the key index) and
    anti-joined, so a table without deletes costs one pass over the keys on each side.
    """
    names, tgt = run.names, run.tgt
    key = list(run.shape.primary_key)
    found = _differing_keys(run, sums or key_sums(run.src, tgt, run), ranges_the_target_has=True)
    if found is None:
        return 0
    spans, keys = found
    target_in_spans, target_params = spans.rows(key_rows(run)[1].query, key, "target")
    # The missing keys go into a table of their own first: the planner cannot estimate the span join
    # and would otherwise hash the whole target to delete a handful of rows.
    gone = sql.Identifier(_GONE)
    tgt.execute(sql.SQL("create temporary table {} on commit drop as select * from ({}) as _candidates where {}")
                .format(gone, target_in_spans, _missing(key, "_candidates", keys.query)),
                target_params)
    tgt.execute(sql.SQL("analyze {}").format(gone))
    match = sql.SQL(" and ").join(sql.SQL("t.{0} = _gone.{0}").format(sql.Identifier(c)) for c in key)
    if run.table.delete_detection != "soft":
        statement = sql.SQL("delete from {} as t using {} as _gone where {}").format(names.target, gone, match)
    else:
        statement = sql.SQL("update {} as t set {} = now() from {} as _gone where {} and t.{} is null").format(
            names.target, sql.Identifier(SOFT_DELETE_COLUMN), gone, match, sql.Identifier(SOFT_DELETE_COLUMN))
    cursor = tgt.execute(statement)
    return max(cursor.rowcount, 0)


def _key_total(conn: psycopg.Connection, rows: RowSet, checksum: sql.Composable) -> tuple[int, int]:
    # Parameters (none) make psycopg turn the `%%` escaped in user SQL (a custom where) back into `%`.
    row = conn.execute(sql.SQL("select count(*), coalesce(sum({}), 0) from {} as _rows").format(
        checksum, rows.query), {}).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def key_changes(run: TableRun) -> tuple[int, int]:
    """Before the target's rows are replaced with the source snapshot's: (rows it holds, keys the source lacks).

    Both sides first sum a hash of all their keys (an aggregate PostgreSQL may run in parallel; a
    third of the cost of the per-range sums): equal totals mean the same keys, the common case of a
    table copied in full. Otherwise the ranges are compared as delete detection compares them.
    """
    key = list(run.shape.primary_key)
    first = run.shape.column(key[0])
    assert first is not None
    source_keys, target_keys = key_rows(run)
    if not (run.table.select or run.table.where):  # custom SQL may be slow: it is read no more than before
        checksum = key_checksum(key, first.type_sql)
        with ThreadPoolExecutor(max_workers=1) as pool:
            target_future = pool.submit(_key_total, run.tgt, target_keys, checksum)
            source_total = _key_total(run.src, source_keys, checksum)
            target_total = target_future.result()
        if source_total == target_total:
            return target_total[0], 0
    sums = key_sums(run.src, run.tgt, run)
    old_rows = sum(count for count, _ in sums.target.values())
    found = _differing_keys(run, sums, ranges_the_target_has=True)
    if found is None:
        return old_rows, 0
    spans, keys = found
    target_in_spans, target_params = spans.rows(target_keys.query, key, "target")
    removed = run.tgt.execute(sql.SQL("select count(*) from ({}) as _candidates where {}").format(
        target_in_spans, _missing(key, "_candidates", keys.query)), target_params).fetchone()
    run.tgt.execute(sql.SQL("drop table {}").format(keys.query))
    return old_rows, int(removed[0]) if removed else 0
