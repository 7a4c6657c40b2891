"""The one-stream strategy: COPY from one source snapshot into the target in one transaction.

Full mode truncates the target and COPYs straight into it inside one transaction (with the
primary key dropped during the load and rebuilt after, which is about twice as fast as
maintaining it row by row). The table itself is never dropped or renamed, so views on it keep
working, and readers wait on the lock and then see the old rows or the new ones.

Incremental mode COPYs the changed rows into a temporary staging table and upserts them with
`insert ... on conflict do update ... where <row changed>`, so unchanged rows are not rewritten.
The watermark is written in the same transaction as the rows. With delete detection, the keys the
target holds and the source snapshot lacks are deleted (or marked) in that transaction too.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ._config import TableConfig
from ._connect import connect
from ._copy import stream
from ._errors import CopyEngineError
from ._run import TableRun, column_list, import_snapshot, open_snapshot
from ._schema import SOFT_DELETE_COLUMN, Shape
from ._state import ensure_state_tables, read_watermark, write_state
from ._validate import RowSet, boundaries, bucket_expression, key_checksum, range_sums

logger = logging.getLogger(__name__)

_STAGE = "_copy_engine_stage"
_KEYS = "_copy_engine_keys"
_GONE = "_copy_engine_gone"
_DELETE_RANGES = 256
_KEYS_PER_DELETE_RANGE = 250


def attempt_stream(run: TableRun) -> None:
    """One attempt of a one-stream sync, filling `run.report`; the audit row commits with the data."""
    table, report = run.table, run.report
    incremental = table.mode == "incremental"
    with run.connected():
        ensure_state_tables(run.tgt)
        with run.locked():
            run.describe(key_for="mode incremental" if incremental else None)
            run.create_types()
            open_snapshot(run.src)
            with run.data_transaction():
                run.prepare_target(need_key=incremental)
                if incremental:
                    report.watermark_before = read_watermark(run.tgt, run.names.target_text)
                    _load_incremental(run)
                else:
                    run.load_full()
                write_state(run.tgt, report, table.cursor_column)
                run.record_committed()
            logger.info("%s: committed %d row(s) into %s", table.name, report.rows_read, run.names.target_text)
            if run.validate:
                report.validation = run.validate_in_snapshot()
            run.src.rollback()


# --- incremental --------------------------------------------------------------------------------



def _cursor_filter(shape: Shape, table: TableConfig, watermark: str | None) -> tuple[list[sql.Composable],
                                                                                     dict[str, object]]:
    if watermark is None:
        return [], {}
    assert table.cursor_column is not None
    cursor = shape.column(table.cursor_column)
    assert cursor is not None
    type_sql = sql.SQL(cursor.type_sql)
    if table.lookback:
        is_time = cursor.type_sql.startswith(("date", "timestamp"))
        step = sql.SQL("%(lookback)s::interval") if is_time else sql.SQL("%(lookback)s::{}").format(type_sql)
        bound = sql.SQL("(%(watermark)s::{} - {})").format(type_sql, step)
        params: dict[str, object] = {"watermark": watermark, "lookback": table.lookback}
    else:
        bound = sql.SQL("%(watermark)s::{}").format(type_sql)
        params = {"watermark": watermark}
    return [sql.SQL("{} > {}").format(sql.Identifier(cursor.name), bound)], params


def _load_incremental(run: TableRun) -> None:
    table, report, tgt = run.table, run.report, run.tgt
    assert table.cursor_column is not None
    target = run.names.target
    cursor = sql.Identifier(table.cursor_column)
    empty = tgt.execute(sql.SQL("select not exists (select from {})").format(target)).fetchone()
    key_is_unique = table.select is None and table.primary_key is None  # the source table's own key
    if report.watermark_before is None and empty and empty[0] and key_is_unique:
        # The first load into an empty table: a full load gives the same rows at COPY speed.
        run.load_full()
        row = tgt.execute(sql.SQL("select max({})::text from {}").format(cursor, target)).fetchone()
        report.watermark_after = row[0] if row else None
        return
    pool = ThreadPoolExecutor(max_workers=1)
    finished = False
    try:
        beside: Future[_KeySums] | None = None
        if table.delete_detection != "none" and not run.plan.changes:
            # Deleted keys are the target's keys missing from the source, before the upsert as after
            # it (the upsert only writes keys of this snapshot), so the per-range key sums of both
            # sides run on their own connections while the changed rows are copied and upserted.
            row = run.src.execute("select pg_export_snapshot()").fetchone()  # not in a savepoint: it refuses
            assert row is not None
            beside = pool.submit(_key_sums_beside, run, str(row[0]))
        _copy_changes(run)
        if table.delete_detection != "none":
            sums = None
            if beside is not None:
                try:
                    sums = beside.result()
                except (psycopg.Error, CopyEngineError) as error:
                    # A locked target, or a pooler that cannot share the snapshot: the sync's own
                    # transaction sums the keys instead (and fails there if the server is gone).
                    logger.warning("%s: summing the keys beside the sync failed (%s); summing them in the "
                                   "sync's transaction", table.name, (str(error).splitlines() or [""])[0])
            report.rows_deleted = _detect_deletes(run, sums)
        finished = True
    finally:
        # A failed run does not wait for the sums beside it: their thread closes its connections
        # when its queries end.
        pool.shutdown(wait=finished)


def _copy_changes(run: TableRun) -> None:
    """COPY the rows past the watermark into a staging table and upsert them into the target."""
    table, names, shape, plan, report, tgt = run.table, run.names, run.shape, run.plan, run.report, run.tgt
    assert table.cursor_column is not None
    target = names.target
    cursor = sql.Identifier(table.cursor_column)
    stage = sql.Identifier(_STAGE)
    tgt.execute(sql.SQL("create temporary table {} on commit drop as select {} from {} with no data").format(
        stage, column_list(plan.columns), target))
    conditions, params = _cursor_filter(shape, table, report.watermark_before)
    rows, size = stream(run.src, names.copy_source(plan.columns, *conditions), params, tgt, stage, plan.columns,
                         binary=plan.binary, progress=table.name)
    report.rows_read, report.bytes = rows, size
    cursor_type = sql.SQL(shape.column(table.cursor_column).type_sql)  # type: ignore[union-attr]
    row = tgt.execute(sql.SQL("select greatest(max({}), %s::{})::text from {}").format(cursor, cursor_type, stage),
                      (report.watermark_before,)).fetchone()
    report.watermark_after = row[0] if row else report.watermark_before
    run.set_lock_timeout()
    if rows:
        report.rows_inserted, report.rows_updated = _upsert(run, cursor)


def _upsert(run: TableRun, cursor: sql.Identifier) -> tuple[int, int]:
    names, plan = run.names, run.plan
    key = list(run.shape.primary_key)
    values = [c for c in plan.columns if c not in key]
    # Columns the source no longer has, and the soft-delete mark, are reset on every written row.
    reset = list(plan.extra_columns)
    setters = [sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in values]
    setters += [sql.SQL("{} = null").format(sql.Identifier(c)) for c in reset]
    # Text comparison: exact for every type (also -0 vs 0, 1.0 vs 1.00) and works for json and xml,
    # which have no equality operator.
    changed = [sql.SQL("(t.{0}::text is distinct from excluded.{0}::text)").format(sql.Identifier(c))
               for c in values]
    changed += [sql.SQL("t.{} is not null").format(sql.Identifier(c)) for c in reset]
    if setters:
        action: sql.Composable = sql.SQL("do update set {} where {}").format(
            sql.SQL(", ").join(setters), sql.SQL(" or ").join(changed) if changed else sql.SQL("false"))
    else:
        action = sql.SQL("do nothing")
    query = sql.SQL(
        """with written as (
               insert into {target} as t ({columns})
               select distinct on ({key}) {columns} from {stage}
               order by {key}, {cursor} desc nulls last
               on conflict ({key}) {action}
               returning (xmax = 0) as inserted
           )
           select count(*) filter (where inserted), count(*) filter (where not inserted) from written"""
    ).format(target=names.target, columns=column_list(plan.columns), key=column_list(key),
             stage=sql.Identifier(_STAGE), cursor=cursor, action=action)
    # The batch is sorted by key in memory (at the default 4MB a 1% batch of 2M rows sorted on disk).
    run.tgt.execute("select set_config('work_mem', '64MB', true)")
    row = run.tgt.execute(query).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@dataclass(frozen=True)
class _Spans:
    """Disjoint ranges `lower <= key < upper` of the first key column (None: unbounded), as text."""

    key: str
    key_type: str
    spans: list[tuple[str | None, str | None]]

    @classmethod
    def of_ranges(cls, key: str, key_type: str, bounds: list[str], numbers: list[int]) -> _Spans:
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
class _KeySums:
    """Per-range (count, key hash sum) of both sides, ranges split at `bounds` of the first key column."""

    bounds: list[str]
    source: dict[int | None, tuple[int, int]]
    target: dict[int | None, tuple[int, int]]


def _key_rows(run: TableRun) -> tuple[RowSet, RowSet]:
    key = run.shape.primary_key
    source_keys = RowSet(sql.SQL("({})").format(run.names.source_rows(key)))
    return source_keys, run.names.target_rows(key, live_only=run.table.delete_detection == "soft")


def _key_sums(src: psycopg.Connection, tgt: psycopg.Connection, run: TableRun) -> _KeySums:
    """Both sides sum a hash of their keys per key range, inside each database and at the same time."""
    names, shape = run.names, run.shape
    key = list(shape.primary_key)
    first = shape.column(key[0])
    assert first is not None
    source_keys, target_keys = _key_rows(run)
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
    return _KeySums(bounds, source_sums, target_sums)


def _key_sums_beside(run: TableRun, snapshot: str) -> _KeySums:
    """`_key_sums` on two more connections: the source on the sync's snapshot, the target as committed."""
    table = run.table
    with connect(run.source_dsn, role="source", table=table.name) as src, \
            connect(run.target_dsn, role="target", table=table.name) as tgt:
        import_snapshot(src, snapshot)
        # Never wait behind the sync's own transaction (it would wait for this one): give up and let
        # the sync sum the target itself.
        tgt.execute("select set_config('lock_timeout', '1s', false)")
        sums = _key_sums(src, tgt, run)
        src.rollback()
        tgt.rollback()
    return sums


def _detect_deletes(run: TableRun, sums: _KeySums | None = None) -> int:
    """Find target keys missing from the source snapshot and delete (or mark) those rows.

    Only the keys of ranges whose key sums differ are copied over (read through the key index) and
    anti-joined, so a table without deletes costs one pass over the keys on each side.
    """
    table, names, src, tgt = run.table, run.names, run.src, run.tgt
    key = list(run.shape.primary_key)
    first = run.shape.column(key[0])
    assert first is not None
    soft = table.delete_detection == "soft"
    source_keys, target_keys = _key_rows(run)
    if sums is None:
        sums = _key_sums(src, tgt, run)
    differing = [n for n in set(sums.target) | set(sums.source) if sums.target.get(n) != sums.source.get(n)]
    differing = [n for n in differing if n in sums.target]  # a range the target lacks has nothing to delete
    if not differing:
        return 0
    logger.info("%s: %d of %d key range(s) differ; comparing their keys", table.name, len(differing),
                len(sums.target))
    bounds = sums.bounds
    spans = _Spans.of_ranges(first.name, first.type_sql, bounds, [n for n in differing if n is not None])
    keys = sql.Identifier(_KEYS)
    tgt.execute(sql.SQL("create temporary table {} on commit drop as select {} from {} with no data").format(
        keys, column_list(key), names.target))
    source_in_spans, source_params = spans.rows(source_keys.query, key, "source")
    stream(src, source_in_spans, source_params, tgt, keys, key, binary=run.plan.binary)
    tgt.execute(sql.SQL("analyze {}").format(keys))
    tgt.execute("select set_config('work_mem', '256MB', true)")  # one in-memory hash for the anti-join
    target_in_spans, target_params = spans.rows(target_keys.query, key, "target")
    # The missing keys go into a table of their own first: the planner cannot estimate the span join
    # and would otherwise hash the whole target to delete a handful of rows.
    gone = sql.Identifier(_GONE)
    tgt.execute(sql.SQL(
        "create temporary table {gone} on commit drop as select * from ({candidates}) as _candidates "
        "where not exists (select from {keys} as k where {in_keys})").format(
        gone=gone, candidates=target_in_spans, keys=keys,
        in_keys=sql.SQL(" and ").join(sql.SQL("k.{0} = _candidates.{0}").format(sql.Identifier(c)) for c in key)),
        target_params)
    tgt.execute(sql.SQL("analyze {}").format(gone))
    match = sql.SQL(" and ").join(sql.SQL("t.{0} = _gone.{0}").format(sql.Identifier(c)) for c in key)
    if not soft:
        statement = sql.SQL("delete from {} as t using {} as _gone where {}").format(names.target, gone, match)
    else:
        statement = sql.SQL("update {} as t set {} = now() from {} as _gone where {} and t.{} is null").format(
            names.target, sql.Identifier(SOFT_DELETE_COLUMN), gone, match, sql.Identifier(SOFT_DELETE_COLUMN))
    cursor = tgt.execute(statement)
    return max(cursor.rowcount, 0)


# --- one attempt, retries, the public entry point ----------------------------------------------
