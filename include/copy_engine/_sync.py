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

import psycopg
from psycopg import sql

from ._config import TableConfig
from ._copy import stream
from ._errors import CopyEngineError
from ._keys import KeySums, detect_deletes, key_changes, key_sums_beside
from ._run import TableRun, column_list, open_snapshot
from ._schema import Shape
from ._state import ensure_state_tables, read_watermark, write_state

logger = logging.getLogger(__name__)

_STAGE = "_copy_engine_stage"


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
                    run.load_full(key_changes)
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
        run.load_full(key_changes)
        row = tgt.execute(sql.SQL("select max({})::text from {}").format(cursor, target)).fetchone()
        report.watermark_after = row[0] if row else None
        return
    pool = ThreadPoolExecutor(max_workers=1)
    finished = False
    try:
        beside: Future[KeySums] | None = None
        if table.delete_detection != "none" and not run.plan.changes:
            # Deleted keys are the target's keys missing from the source, before the upsert as after
            # it (the upsert only writes keys of this snapshot), so the per-range key sums of both
            # sides run on their own connections while the changed rows are copied and upserted.
            row = run.src.execute("select pg_export_snapshot()").fetchone()  # not in a savepoint: it refuses
            assert row is not None
            beside = pool.submit(key_sums_beside, run, str(row[0]))
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
            report.rows_deleted = detect_deletes(run, sums)
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
    rows, size = stream(run.src, names.copy_source(plan.columns, *conditions, shape=shape), params, tgt, stage,
                        plan.columns, binary=plan.binary, progress=table.name)
    report.rows_read, report.bytes = rows, size
    cursor_type = sql.SQL(shape.column(table.cursor_column).type_sql)  # type: ignore[union-attr]
    row = tgt.execute(sql.SQL("select greatest(max({}), %s::{})::text from {}").format(cursor, cursor_type, stage),
                      (report.watermark_before,)).fetchone()
    report.watermark_after = row[0] if row else report.watermark_before
    run.set_lock_timeout()
    if rows:
        report.rows_inserted, report.rows_updated = _upsert(run, cursor)


def _upsert(run: TableRun, cursor: sql.Identifier) -> tuple[int, int]:
    """Upsert the staged rows, the latest of each key by the cursor column."""
    key = column_list(run.shape.primary_key)
    rows = sql.SQL("select distinct on ({key}) {columns} from {stage} order by {key}, {cursor} desc nulls last").format(
        key=key, columns=column_list(run.plan.columns), stage=sql.Identifier(_STAGE), cursor=cursor)
    # The batch is sorted by key in memory (at the default 4MB a 1% batch of 2M rows sorted on disk).
    run.tgt.execute("select set_config('work_mem', '64MB', true)")
    return run.upsert(rows)
