"""The key-range strategy: a full copy of one large table by key ranges, every range reading one snapshot.

The work is split into four steps that separate processes (Airflow tasks) can run, coordinated
through two small tables in the warehouse's `_copy_engine` schema:

1. `plan_parallel_copy` splits the first primary-key column into ranges (plain JSON data). An
   incremental table that already has a watermark needs no ranges: its plan is empty and the
   finish step runs the normal sync.
2. `hold_snapshot` takes the target's run lock, brings the target in line with the source,
   creates the staging table (a copy of the target when it can be swapped in, see `_swap`;
   otherwise an unlogged table), opens a `REPEATABLE READ READ ONLY` source transaction,
   exports its snapshot (`pg_export_snapshot()`) and records the id. It keeps that transaction
   open, which is what keeps the snapshot importable, until the finish step has committed, a step
   gave up (`abandon_parallel_copy`) or its timeout passes.
3. `copy_range` imports the snapshot (`SET TRANSACTION SNAPSHOT`) and COPYs its range into the
   staging table; deleting its range first and recording itself done in the same transaction
   makes a retry idempotent.
4. `finish_ranges` (behind `finish_parallel_copy`) imports the snapshot too, and in one warehouse
   transaction swaps the staging table in for the target (or replaces the target's rows in place),
   validates inside the snapshot, writes the sync state and the `sync_runs` audit row, and marks the
   run finished, which releases the holder.

`attempt_ranges` (what `sync_table` runs for `parallel: N`) takes the same four steps in threads of
one process.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ._config import TableConfig
from ._connect import connect, raise_classified
from ._copy import stream
from ._errors import CopyEngineError, SnapshotReleasedError, SwapRefusedError, TerminalError, TransientError
from ._keys import key_changes
from ._report import RangeDifference, SyncReport, ValidationResult
from ._run import (
    TableRun,
    column_list,
    finish_report,
    import_snapshot,
    mismatch_error,
    open_snapshot,
    record_failure,
    wait_for,
)
from ._schema import TargetPlan, relation_oid
from ._state import (
    PARALLEL_RANGES,
    PARALLEL_RUNS,
    STATE_SCHEMA,
    ensure_state_tables,
    read_watermark,
    save_run,
    write_state,
)
from ._swap import LIKE_TARGET, swap_blockers, swap_in
from ._validate import RowSet, boundaries

logger = logging.getLogger(__name__)

_KEEP_RUNS = "7 days"
_KEY_FOR = "a parallel copy (parallel: N)"


@dataclass(frozen=True)
class KeyRange:
    """Rows with `lower <= key < upper` on the first primary-key column; None is unbounded."""

    lower: str | None
    upper: str | None

    def condition(self, key: str, key_type: str) -> tuple[list[sql.Composable], dict[str, object]]:
        conditions: list[sql.Composable] = []
        params: dict[str, object] = {}
        if self.lower is not None:
            conditions.append(sql.SQL("{} >= %(lower)s::{}").format(sql.Identifier(key), sql.SQL(key_type)))
            params["lower"] = self.lower
        if self.upper is not None:
            conditions.append(sql.SQL("{} < %(upper)s::{}").format(sql.Identifier(key), sql.SQL(key_type)))
            params["upper"] = self.upper
        return conditions, params

    def label(self, key: str) -> str:
        lower = "…" if self.lower is None else self.lower
        upper = "…" if self.upper is None else self.upper
        return f"{key} [{lower}, {upper})"


def split_ranges(bounds: list[str]) -> list[KeyRange]:
    edges: list[str | None] = [None, *bounds, None]
    return [KeyRange(edges[index], edges[index + 1]) for index in range(len(edges) - 1)]


@dataclass(frozen=True)
class ParallelPlan:
    """One planned parallel copy: its run key and key ranges. `to_dict()` is plain JSON (for XCom)."""

    run_key: str
    table: str
    target: str
    key_column: str | None
    key_type: str | None
    ranges: tuple[KeyRange, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_key": self.run_key,
            "table": self.table,
            "target": self.target,
            "key_column": self.key_column,
            "key_type": self.key_type,
            "ranges": [[part.lower, part.upper] for part in self.ranges],
            # One entry per range, for an orchestrator to map over.
            "parts": [{"index": index, "label": f"{index + 1}/{len(self.ranges)} {part.label(self.key_column or '')}"}
                      for index, part in enumerate(self.ranges)],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParallelPlan:
        return cls(run_key=str(data["run_key"]), table=str(data["table"]), target=str(data["target"]),
                   key_column=data.get("key_column"), key_type=data.get("key_type"),
                   ranges=tuple(KeyRange(lower, upper) for lower, upper in data.get("ranges") or []))


def as_plan(plan: ParallelPlan | Mapping[str, Any]) -> ParallelPlan:
    return plan if isinstance(plan, ParallelPlan) else ParallelPlan.from_dict(plan)


def _stage_relation(table: TableConfig) -> str:
    schema, relation = table.target_schema_table
    return f"stage_{schema}_{relation}"[:63]


def _stage_name(table: TableConfig) -> sql.Identifier:
    return sql.Identifier(STATE_SCHEMA, _stage_relation(table))



def _needs_full_copy(run: TableRun) -> bool:
    """Full mode always; incremental only for the first load (no watermark, empty or missing target),
    the case in which the normal sync also takes its full-load path."""
    table, tgt = run.table, run.tgt
    if table.mode == "full":
        return True
    if table.select is not None or table.primary_key is not None:
        return False  # the normal sync's first load needs the source table's own key, too
    schema, relation = table.target_schema_table
    with tgt.transaction():
        if read_watermark(tgt, run.names.target_text) is not None:
            return False
        if relation_oid(tgt, schema, relation) is None:
            return True
        row = tgt.execute(sql.SQL("select not exists (select from {})").format(run.names.target))
        empty = row.fetchone()
    return bool(empty and empty[0])


def plan_parallel_copy(source_dsn: str, target_dsn: str, table: TableConfig, parts: int | None = None
                       ) -> dict[str, Any]:
    """Plan a parallel copy of `table` into `parts` key ranges (default: its `parallel` setting).

    Returns the plan as plain JSON data (`ParallelPlan.to_dict()`); `ranges` is empty when the
    table needs no full copy (an incremental table past its first load): the finish step then runs
    the normal sync.
    """
    count = parts or table.parallel
    run = TableRun(source_dsn, target_dsn, table)
    target = run.names.target_text
    try:
        with run.connected():
            tgt = run.tgt
            ensure_state_tables(tgt)
            with tgt.transaction():
                tgt.execute(sql.SQL("delete from {} where planned_at < now() - %s::interval").format(PARALLEL_RUNS),
                            (_KEEP_RUNS,))
            run_key = uuid.uuid4().hex
            if not _needs_full_copy(run):
                logger.info("%s: incremental past its first load; no key ranges", table.name)
                return ParallelPlan(run_key, table.name, target, None, None, ()).to_dict()
            shape = run.describe(key_for=_KEY_FOR)
            key = shape.column(shape.primary_key[0])
            assert key is not None
            open_snapshot(run.src)
            keys = RowSet(sql.SQL("({})").format(run.names.source_rows([key.name])))
            bounds = boundaries(run.src, keys, key.name, key.type_sql, count)
            run.src.rollback()
            plan = ParallelPlan(run_key, table.name, target, key.name, key.type_sql, tuple(split_ranges(bounds)))
            with tgt.transaction():
                tgt.execute(sql.SQL("insert into {} (run_key, table_name, target_table, parts) "
                                    "values (%s, %s, %s, %s)").format(PARALLEL_RUNS),
                            (run_key, table.name, target, len(plan.ranges)))
            logger.info("%s: planned parallel run %s with %d key range(s)", table.name, run_key, len(plan.ranges))
            return plan.to_dict()
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing="planning the parallel copy")


def _run_row(tgt: psycopg.Connection, run_key: str, *, lock: bool = False) -> dict[str, Any]:
    query = sql.SQL("select state, snapshot, columns, binary_copy, schema_changes, reason, planned_at, parts "
                    "from {} where run_key = %s{}").format(PARALLEL_RUNS,
                                                           sql.SQL(" for update") if lock else sql.SQL(""))
    row = tgt.execute(query, (run_key,)).fetchone()
    if row is None:
        return {"state": "missing"}
    keys = ("state", "snapshot", "columns", "binary_copy", "schema_changes", "reason", "planned_at", "parts")
    return dict(zip(keys, row, strict=True))


def _released(table: TableConfig, plan: ParallelPlan, run: Mapping[str, Any]) -> SnapshotReleasedError:
    state = run["state"]
    if state == "finished":
        why = "it has already finished and committed"
    elif state == "missing":
        why = "its plan is not in _copy_engine.parallel_runs"
    elif state == "held":
        why = "the transaction holding its snapshot has ended (the hold_snapshot process died)"
    else:
        why = f"its snapshot is no longer held ({run.get('reason') or state})"
    return SnapshotReleasedError(
        f"parallel run {plan.run_key} cannot continue: {why}. Every key range must read the one snapshot "
        "of its plan, so restart the copy from a new plan (in Airflow: clear the table's task group "
        "from its plan task)", table=table.name)


def _set_state(tgt: psycopg.Connection, run_key: str, state: str, reason: str | None, *,
               only_from: tuple[str, ...]) -> bool:
    with tgt.transaction():
        cursor = tgt.execute(
            sql.SQL("update {} set state = %s, reason = coalesce(%s, reason), ended_at = now() "
                    "where run_key = %s and state = any(%s)").format(PARALLEL_RUNS),
            (state, reason, run_key, list(only_from)))
        return cursor.rowcount > 0


def abandon_parallel_copy(target_dsn: str, table: TableConfig, plan: ParallelPlan | Mapping[str, Any],
                          reason: str) -> None:
    """Give up a planned or held run (a step failed for good): the holder closes its snapshot."""
    run = as_plan(plan)
    if not run.ranges:
        return
    try:
        with connect(target_dsn, role="target", table=table.name) as tgt:
            if _set_state(tgt, run.run_key, "abandoned", reason[:500], only_from=("planned", "held")):
                logger.warning("%s: abandoned parallel run %s: %s", table.name, run.run_key, reason)
    except (psycopg.Error, CopyEngineError) as error:
        logger.warning("%s: could not mark parallel run %s abandoned: %s", table.name, run.run_key,
                       (str(error).splitlines() or [""])[0])


def hold_snapshot(source_dsn: str, target_dsn: str, table: TableConfig, plan: ParallelPlan | Mapping[str, Any],
                  *, timeout_s: float = 7200.0, poll_s: float = 0.5) -> str:
    """Export the run's source snapshot and hold it until the run finishes, is abandoned or times out.

    Also takes the target's run lock for that time (so no other run touches the table or its
    staging table), prepares the target and creates the staging table. Returns the final state:
    `finished`, `abandoned`, or `none` for a plan without ranges; raises on timeout.
    """
    ranges = as_plan(plan)
    if not ranges.ranges:
        return "none"
    run = TableRun(source_dsn, target_dsn, table)
    exported = False
    try:
        with run.connected(source_application="copy_engine:snapshot"):
            tgt, src = run.tgt, run.src
            ensure_state_tables(tgt)
            with tgt.transaction():
                current = _run_row(tgt, ranges.run_key)
            if current["state"] != "planned":
                if current["state"] == "held":
                    _set_state(tgt, ranges.run_key, "closed", "its snapshot holder was restarted",
                               only_from=("held",))
                raise _released(table, ranges, current)
            with run.locked():
                try:
                    run.describe(key_for=_KEY_FOR)
                    run.create_types()
                    with tgt.transaction():
                        target_plan = run.prepare_target(need_key=True)
                        _create_stage(run)
                    open_snapshot(src)
                    # The transaction is idle between its statements for as long as the copy takes.
                    src.execute("select set_config('idle_in_transaction_session_timeout', '0', true)")
                    row = src.execute("select pg_export_snapshot()").fetchone()
                    assert row is not None
                    with tgt.transaction():
                        held = tgt.execute(
                            sql.SQL("update {} set state = 'held', snapshot = %s, columns = %s, binary_copy = %s, "
                                    "schema_changes = %s, held_at = now() where run_key = %s and state = 'planned'")
                            .format(PARALLEL_RUNS),
                            (str(row[0]), Jsonb(target_plan.columns), target_plan.binary,
                             Jsonb(run.report.schema_changes), ranges.run_key))
                    if held.rowcount == 0:
                        with tgt.transaction():
                            raise _released(table, ranges, _run_row(tgt, ranges.run_key))
                    exported = True
                    logger.info("%s: holding snapshot %s for parallel run %s (%d range(s))", table.name, row[0],
                                ranges.run_key, len(ranges.ranges))
                    return _wait_until_done(run, ranges, timeout_s=timeout_s, poll_s=poll_s)
                finally:
                    if exported and not tgt.closed:
                        try:
                            _set_state(tgt, ranges.run_key, "closed", "the snapshot holder ended",
                                       only_from=("held",))
                        except psycopg.Error:
                            logger.debug("could not close run %s; its snapshot is gone with the session",
                                         ranges.run_key)
                    if not src.closed:
                        src.rollback()
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing="holding the parallel copy's snapshot")


def _create_stage(run: TableRun) -> None:
    """A copy of the target to swap in when nothing keeps the target from being swapped (the rows are
    then written once), otherwise an unlogged staging table whose rows the finish writes in place."""
    tgt, stage = run.tgt, _stage_name(run.table)
    tgt.execute(sql.SQL("drop table if exists {}").format(stage))
    blockers = swap_blockers(tgt, relation_oid(tgt, *run.table.target_schema_table) or 0)
    if not blockers:
        tgt.execute(sql.SQL("create table {} (like {} {})").format(stage, run.names.target, LIKE_TARGET))
        return
    logger.info("%s: the ranges will be written into the target in place, not swapped in: %s", run.table.name,
                "; ".join(blockers))
    tgt.execute(sql.SQL("create unlogged table {} as select {} from {} with no data").format(
        stage, column_list(run.plan.columns), run.names.target))


def _wait_until_done(run: TableRun, plan: ParallelPlan, *, timeout_s: float, poll_s: float) -> str:
    tgt = run.tgt
    last_check = time.monotonic()

    def ended() -> str | None:
        nonlocal last_check
        with tgt.transaction():
            state = _run_row(tgt, plan.run_key)["state"]
        if state in ("finished", "abandoned", "closed", "missing"):
            return str(state)
        if time.monotonic() - last_check > 5:
            run.src.execute("select 1")  # notices a dropped source connection while waiting
            last_check = time.monotonic()
        return None

    state = wait_for(ended, timeout_s=timeout_s, poll_s=poll_s)
    if state is None:
        reason = f"the snapshot holder timed out after {timeout_s:.0f}s"
        if _set_state(tgt, plan.run_key, "closed", reason, only_from=("held",)):
            raise TerminalError(
                f"parallel run {plan.run_key}: not finished within {timeout_s:.0f}s, so its snapshot was "
                "released; restart the copy from a new plan, with a longer timeout or more worker slots",
                table=run.table.name)
        state = ended() or "closed"  # it ended as the time ran out
    logger.info("%s: parallel run %s %s; releasing its snapshot", run.table.name, plan.run_key, state)
    return state


def _import_snapshot(run: TableRun, plan: ParallelPlan, state: Mapping[str, Any]) -> None:
    try:
        import_snapshot(run.src, str(state["snapshot"]))
    except (psycopg.errors.UndefinedObject, psycopg.errors.InvalidParameterValue,
            psycopg.errors.ObjectNotInPrerequisiteState) as error:
        # The exporting transaction has ended: "snapshot ... does not exist" / "invalid snapshot identifier".
        run.src.rollback()
        raise _released(run.table, plan, {**state, "state": "held"}) from error


def _wait_for_snapshot(run: TableRun, plan: ParallelPlan, *, wait_s: float, poll_s: float) -> dict[str, Any]:
    def exported() -> dict[str, Any] | None:
        with run.tgt.transaction():
            state = _run_row(run.tgt, plan.run_key)
        if state["state"] == "held":
            return state
        if state["state"] != "planned":
            raise _released(run.table, plan, state)
        return None

    state = wait_for(exported, timeout_s=wait_s, poll_s=poll_s)
    if state is None:
        raise TransientError(
            f"parallel run {plan.run_key}: its snapshot was not exported within {wait_s:.0f}s; check that "
            "the hold_snapshot step is running (it needs a worker slot while the ranges run)",
            table=run.table.name)
    return state


def copy_range(source_dsn: str, target_dsn: str, table: TableConfig, plan: ParallelPlan | Mapping[str, Any],
               index: int, *, wait_s: float = 600.0, poll_s: float = 0.5) -> dict[str, int]:
    """COPY key range `index` of the plan, inside the held snapshot, into the staging table.

    Waits up to `wait_s` for the snapshot to be exported. A retry replaces the range's rows.
    Returns `{"index", "rows", "bytes"}`.
    """
    ranges = as_plan(plan)
    if not 0 <= index < len(ranges.ranges):
        raise TerminalError(f"parallel run {ranges.run_key} has {len(ranges.ranges)} range(s), not range {index}",
                            table=table.name)
    assert ranges.key_column is not None and ranges.key_type is not None
    key_range = ranges.ranges[index]
    run = TableRun(source_dsn, target_dsn, table)
    try:
        with run.connected():
            tgt = run.tgt
            state = _wait_for_snapshot(run, ranges, wait_s=wait_s, poll_s=poll_s)
            columns = list(state["columns"])
            _import_snapshot(run, ranges, state)
            conditions, params = key_range.condition(ranges.key_column, ranges.key_type)
            stage = _stage_name(table)
            with tgt.transaction():
                current = _run_row(tgt, ranges.run_key, lock=False)
                if current["state"] != "held":
                    raise _released(table, ranges, current)
                where = sql.SQL(" and ").join(conditions) if conditions else sql.SQL("true")
                tgt.execute(sql.SQL("delete from {} where {}").format(stage, where), params)
                rows, size = stream(run.src, run.names.copy_source(columns, *conditions), params, tgt, stage,
                                    columns, binary=bool(state["binary_copy"]),
                                    progress=f"{table.name} range {index + 1}")
                tgt.execute(
                    sql.SQL("insert into {} (run_key, range_index, rows, bytes) values (%s, %s, %s, %s) "
                            "on conflict (run_key, range_index) do update set rows = excluded.rows, "
                            "bytes = excluded.bytes, done_at = now()").format(PARALLEL_RANGES),
                    (ranges.run_key, index, rows, size))
            run.src.rollback()
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing=f"copying key range {index + 1}")
    logger.info("%s: range %d/%d (%s) copied %d row(s)", table.name, index + 1, len(ranges.ranges),
                key_range.label(ranges.key_column), rows)
    return {"index": index, "rows": rows, "bytes": size}


def _finish_into(run: TableRun, plan: ParallelPlan, *, audit: bool) -> None:
    """The finish step, filling `run.report`; with `audit`, the `sync_runs` row is final when it commits."""
    table, report = run.table, run.report
    with run.connected():
        tgt = run.tgt
        with tgt.transaction():
            state = _run_row(tgt, plan.run_key)
            done = tgt.execute(sql.SQL("select count(*), coalesce(sum(rows), 0), coalesce(sum(bytes), 0) "
                                       "from {} where run_key = %s").format(PARALLEL_RANGES),
                               (plan.run_key,)).fetchone()
        if state["state"] != "held":
            raise _released(table, plan, state)
        run.describe(key_for=_KEY_FOR)
        _import_snapshot(run, plan, state)
        assert done is not None
        if int(done[0]) != len(plan.ranges):
            raise TransientError(f"parallel run {plan.run_key}: only {done[0]} of {len(plan.ranges)} key range(s) "
                                 "are copied; run the missing ranges first", table=table.name)
        if audit:
            report.started_at = state["planned_at"]
        report.workers = len(plan.ranges)
        report.rows_read, report.bytes = int(done[1]), int(done[2])
        report.schema_changes = list(state["schema_changes"] or [])
        report.copy_format = "binary" if state["binary_copy"] else "text"
        run.plan = TargetPlan(list(state["columns"]), [], bool(state["binary_copy"]))
        with run.data_transaction():
            if _run_row(tgt, plan.run_key, lock=True)["state"] != "held":
                raise _released(table, plan, _run_row(tgt, plan.run_key))
            run.set_lock_timeout()
            if not _swap_loaded_table(run, plan):
                _insert_loaded_rows(run)
            if table.mode == "incremental":
                assert table.cursor_column is not None
                row = tgt.execute(sql.SQL("select max({})::text from {}").format(
                    sql.Identifier(table.cursor_column), run.names.target)).fetchone()
                report.watermark_after = row[0] if row else None
            write_state(tgt, report, table.cursor_column)
            if run.validate:
                # Inside the snapshot the ranges read, before the commit: the audit row can say the result.
                report.validation = run.validate_in_snapshot()
            if audit:
                _complete(report)
                save_run(tgt, report)
            else:
                run.record_committed()  # sync_table brings the row up to date after the commit
            tgt.execute(sql.SQL("update {} set state = 'finished', ended_at = now(), report = %s "
                                "where run_key = %s").format(PARALLEL_RUNS),
                        (Jsonb(json.loads(json.dumps(report.to_dict()))), plan.run_key))
        run.src.rollback()
    logger.info("%s: parallel run %s committed %d row(s) into %s", table.name, plan.run_key, report.rows_inserted,
                run.names.target_text)


def _swap_loaded_table(run: TableRun, plan: ParallelPlan) -> bool:
    """Swap the staging table in for the target when it was created for that (as a copy of the target
    that nothing keeps from being swapped); False when the rows must be written in place instead."""
    tgt, table, report = run.tgt, run.table, run.report
    stage = _stage_name(table)
    row = tgt.execute("select relpersistence = 'p' from pg_class where oid = %s::regclass",
                      (stage.as_string(tgt),)).fetchone()
    if not (row and row[0]):
        return False
    key = f"copy_engine_{plan.run_key[:16]}_key"
    # The key and the planner's statistics are built before the target is locked: readers keep
    # reading the old rows meanwhile. (A table replaced in place keeps its statistics; a new one
    # has none until autovacuum, and dbt reads it right after the sync.)
    run.add_primary_key(stage, key)
    tgt.execute(sql.SQL("analyze {}").format(stage))
    schema, relation = table.target_schema_table
    before = run.rows_before(key_changes)
    try:
        with tgt.transaction():
            swap_in(tgt, loaded=(STATE_SCHEMA, _stage_relation(table)), loaded_key=key, schema=schema,
                    relation=relation, table=table.name)
    except SwapRefusedError as refused:
        logger.warning("%s: cannot swap the loaded rows in (%s); writing them into the target in place",
                       table.name, refused)
        return False
    run.report_replacement(report.rows_read, before)
    return True


def _insert_loaded_rows(run: TableRun) -> None:
    """Replace the target's rows with the staging table's, in place."""
    stage, columns = _stage_name(run.table), column_list(run.plan.columns)

    def load() -> int:
        inserted = run.tgt.execute(sql.SQL("insert into {} ({}) select {} from {}").format(
            run.names.target, columns, columns, stage))
        return max(inserted.rowcount, 0)

    run.replace_rows(load, key_changes)
    run.tgt.execute(sql.SQL("drop table {}").format(stage))


def _complete(report: SyncReport) -> None:
    if report.validation.match is False:
        report.status = "failed"
        report.error = str(mismatch_error(report))
        report.error_type = "ValidationMismatchError"
    else:
        report.status = "success"
    finish_report(report)


def finish_ranges(source_dsn: str, target_dsn: str, table: TableConfig, plan: ParallelPlan, *,
                  validate: bool | None = None) -> SyncReport:
    """The finish step of a plan with ranges, with its failure bookkeeping (see `finish_parallel_copy`)."""
    committed = _committed_report(target_dsn, table, plan)
    if committed is not None:
        return committed
    run = TableRun(source_dsn, target_dsn, table, validate=validate)
    report = run.report
    report.attempts = 1
    try:
        try:
            _finish_into(run, plan, audit=True)
        except psycopg.Error as error:
            raise_classified(error, table=table.name, doing="finishing the parallel copy")
    except CopyEngineError as error:
        record_failure(target_dsn, report, error)
        raise
    logger.info("%s", report.summary())
    if report.validation.match is False:
        raise mismatch_error(report)
    return report


def _committed_report(target_dsn: str, table: TableConfig, plan: ParallelPlan) -> SyncReport | None:
    """The report of a run whose finish step already committed successfully (a retried finish task)."""
    try:
        with connect(target_dsn, role="target", table=table.name) as tgt:
            ensure_state_tables(tgt)
            row = tgt.execute(sql.SQL("select report from {} where run_key = %s and state = 'finished'")
                              .format(PARALLEL_RUNS), (plan.run_key,)).fetchone()
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing="finishing the parallel copy")
    if row is None or row[0] is None or row[0].get("status") != "success":
        return None
    logger.info("%s: parallel run %s has already committed; returning its report", table.name, plan.run_key)
    return _report_from_dict(row[0])


def _report_from_dict(data: Mapping[str, Any]) -> SyncReport:
    fields = dict(data)
    validation = dict(fields.pop("validation") or {})
    differences = [RangeDifference(**item) for item in validation.pop("differing_ranges", [])]
    started, finished = fields.pop("started_at"), fields.pop("finished_at")
    return SyncReport(**fields, validation=ValidationResult(**validation, differing_ranges=differences),
                      started_at=dt.datetime.fromisoformat(started),
                      finished_at=dt.datetime.fromisoformat(finished) if finished else None)


def attempt_ranges(run: TableRun) -> bool:
    """One attempt of `sync_table` for `parallel: N`: the four steps, the ranges in threads.

    False, having written nothing, when the table needs no full copy (an incremental table past
    its first load): the caller then runs the one-stream sync.
    """
    table = run.table
    plan = ParallelPlan.from_dict(plan_parallel_copy(run.source_dsn, run.target_dsn, table, run.report.workers))
    if not plan.ranges:
        return False
    logger.info("%s: copying %d key range(s) with %d worker(s)", table.name, len(plan.ranges), run.report.workers)
    with ThreadPoolExecutor(max_workers=1 + run.report.workers) as pool:
        holder = pool.submit(hold_snapshot, run.source_dsn, run.target_dsn, table, plan, poll_s=0.05)
        try:
            _await_snapshot(run, plan, holder)
            ranges = [pool.submit(copy_range, run.source_dsn, run.target_dsn, table, plan, index, wait_s=0,
                                  poll_s=0.05)
                      for index in range(len(plan.ranges))]
            for future in ranges:
                future.result()
            _finish_into(run, plan, audit=False)
        except BaseException as error:
            abandon_parallel_copy(run.target_dsn, table, plan, f"{type(error).__name__} in the copy")
            raise
        holder.result()
    return True


def _await_snapshot(run: TableRun, plan: ParallelPlan, holder: Future[str]) -> None:
    """Wait until the holder thread has exported the snapshot, or raise the error it failed with."""
    with connect(run.target_dsn, role="target", table=run.table.name) as tgt:
        def exported() -> bool | None:
            with tgt.transaction():
                state = _run_row(tgt, plan.run_key)
            if state["state"] == "held":
                return True
            if holder.done():
                holder.result()
                raise _released(run.table, plan, state)
            return None

        wait_for(exported, timeout_s=math.inf, poll_s=0.02)
