"""Full copy of one large table by key ranges, every range reading one exported snapshot.

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
4. `finish_parallel_copy` imports the snapshot too, and in one warehouse transaction swaps the
   staging table in for the target (or inserts its rows into the target in place), validates
   inside the snapshot, writes the sync state and the `sync_runs` audit row, and marks the run
   finished, which releases the holder.

`attempt_parallel` (what `sync_table` calls for `parallel: N`) runs the same four steps in
threads of one process.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ._config import TableConfig
from ._connect import connect, raise_classified
from ._errors import CopyEngineError, SourceError, TerminalError, TransientError, ValidationMismatchError
from ._report import RangeDifference, SyncReport, ValidationResult
from ._schema import Shape, TargetPlan, describe_source, ensure_types, prepare_target, relation_oid, user_types
from ._state import STATE_SCHEMA, ensure_state_tables, read_watermark, save_run, write_state
from ._swap import LIKE_TARGET, SwapRefusedError, swap_blockers, swap_in
from ._validate import RowSet, boundaries

if TYPE_CHECKING:
    from ._sync import _Names

logger = logging.getLogger(__name__)

_RUNS = sql.Identifier(STATE_SCHEMA, "parallel_runs")
_RANGES = sql.Identifier(STATE_SCHEMA, "parallel_ranges")
_SETUP_LOCK_KEY = "copy_engine:setup"
_KEEP_RUNS = "7 days"

_CREATE = [
    sql.SQL("create schema if not exists {}").format(sql.Identifier(STATE_SCHEMA)),
    sql.SQL(
        """create table if not exists {} (
            run_key text primary key,
            table_name text not null,
            target_table text not null,
            parts integer not null,
            state text not null default 'planned'
                check (state in ('planned', 'held', 'finished', 'abandoned', 'closed')),
            snapshot text,
            columns jsonb,
            binary_copy boolean,
            schema_changes jsonb not null default '[]',
            reason text,
            planned_at timestamptz not null default now(),
            held_at timestamptz,
            ended_at timestamptz,
            report jsonb
        )"""
    ).format(_RUNS),
    sql.SQL(
        """create table if not exists {} (
            run_key text not null references {} on delete cascade,
            range_index integer not null,
            rows bigint not null,
            bytes bigint not null,
            done_at timestamptz not null default now(),
            primary key (run_key, range_index)
        )"""
    ).format(_RANGES, _RUNS),
    sql.SQL("alter table {} add column if not exists report jsonb").format(_RUNS),
]


class SnapshotReleasedError(TerminalError):
    """A range or finish step of a parallel copy found its snapshot no longer held.

    The ranges must all read one snapshot, so the copy has to start again from a new plan.
    """


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


def _as_plan(plan: ParallelPlan | Mapping[str, Any]) -> ParallelPlan:
    return plan if isinstance(plan, ParallelPlan) else ParallelPlan.from_dict(plan)


def _stage_relation(table: TableConfig) -> str:
    schema, relation = table.target_schema_table
    return f"stage_{schema}_{relation}"[:63]


def _stage_name(table: TableConfig) -> sql.Identifier:
    return sql.Identifier(STATE_SCHEMA, _stage_relation(table))


def ensure_parallel_tables(conn: psycopg.Connection) -> None:
    """Create the engine's state tables and the parallel-run tables if missing (committed)."""
    ensure_state_tables(conn)
    with conn.transaction():
        exists = conn.execute(
            "select to_regclass('_copy_engine.parallel_ranges') is not null and exists (select from pg_attribute "
            "where attrelid = to_regclass('_copy_engine.parallel_runs') and attname = 'report')").fetchone()
        if exists and exists[0]:
            return
        conn.execute("select pg_advisory_xact_lock(hashtextextended(%s, 0))", (_SETUP_LOCK_KEY,))
        for statement in _CREATE:
            conn.execute(statement)


def _describe(src: psycopg.Connection, table: TableConfig) -> Shape:
    from ._sync import _Names

    names = _Names(table)
    schema_name, relation = table.source_schema_table
    shape = describe_source(src, table=table.name, schema_name=schema_name, relation=relation,
                            select=names.select_from_base(), where=names.where(), primary_key=table.primary_key)
    if not shape.primary_key:
        raise SourceError("a parallel copy splits by primary key and the source has none; set primary_key "
                          "or parallel: 1", table=table.name)
    return shape


def _needs_full_copy(tgt: psycopg.Connection, table: TableConfig) -> bool:
    """Full mode always; incremental only for the first load (no watermark, empty or missing target),
    the case in which the normal sync also takes its full-load path."""
    if table.mode == "full":
        return True
    if table.select is not None or table.primary_key is not None:
        return False  # the normal sync's first load needs the source table's own key, too
    schema, relation = table.target_schema_table
    target = ".".join(table.target_schema_table)
    with tgt.transaction():
        if read_watermark(tgt, target) is not None:
            return False
        if relation_oid(tgt, schema, relation) is None:
            return True
        row = tgt.execute(sql.SQL("select not exists (select from {})").format(sql.Identifier(schema, relation)))
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
    target = ".".join(table.target_schema_table)
    try:
        with connect(target_dsn, role="target", table=table.name) as tgt, \
                connect(source_dsn, role="source", table=table.name) as src:
            ensure_parallel_tables(tgt)
            with tgt.transaction():
                tgt.execute(sql.SQL("delete from {} where planned_at < now() - %s::interval").format(_RUNS),
                            (_KEEP_RUNS,))
            run_key = uuid.uuid4().hex
            if not _needs_full_copy(tgt, table):
                logger.info("%s: incremental past its first load; no key ranges", table.name)
                return ParallelPlan(run_key, table.name, target, None, None, ()).to_dict()
            from ._sync import _Names, _open_snapshot

            shape = _describe(src, table)
            key = shape.column(shape.primary_key[0])
            assert key is not None
            _open_snapshot(src)
            keys = RowSet(sql.SQL("({})").format(_Names(table).source_rows([key.name])))
            bounds = boundaries(src, keys, key.name, key.type_sql, count)
            src.rollback()
            plan = ParallelPlan(run_key, table.name, target, key.name, key.type_sql, tuple(split_ranges(bounds)))
            with tgt.transaction():
                tgt.execute(sql.SQL("insert into {} (run_key, table_name, target_table, parts) "
                                    "values (%s, %s, %s, %s)").format(_RUNS),
                            (run_key, table.name, target, len(plan.ranges)))
            logger.info("%s: planned parallel run %s with %d key range(s)", table.name, run_key, len(plan.ranges))
            return plan.to_dict()
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing="planning the parallel copy")


def _run_row(tgt: psycopg.Connection, run_key: str, *, lock: bool = False) -> dict[str, Any]:
    query = sql.SQL("select state, snapshot, columns, binary_copy, schema_changes, reason, planned_at, parts "
                    "from {} where run_key = %s{}").format(_RUNS, sql.SQL(" for update") if lock else sql.SQL(""))
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
                    "where run_key = %s and state = any(%s)").format(_RUNS),
            (state, reason, run_key, list(only_from)))
        return cursor.rowcount > 0


def abandon_parallel_copy(target_dsn: str, table: TableConfig, plan: ParallelPlan | Mapping[str, Any],
                          reason: str) -> None:
    """Give up a planned or held run (a step failed for good): the holder closes its snapshot."""
    run = _as_plan(plan)
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
    run = _as_plan(plan)
    if not run.ranges:
        return "none"
    from ._sync import _acquire_run_lock, _Names, _open_snapshot, _release_run_lock

    names = _Names(table)
    stage = _stage_name(table)
    exported = False
    try:
        with connect(target_dsn, role="target", table=table.name) as tgt, \
                connect(source_dsn, role="source", table=table.name,
                        application_name="copy_engine:snapshot") as src:
            ensure_parallel_tables(tgt)
            with tgt.transaction():
                current = _run_row(tgt, run.run_key)
            if current["state"] != "planned":
                if current["state"] == "held":
                    _set_state(tgt, run.run_key, "closed", "its snapshot holder was restarted",
                               only_from=("held",))
                raise _released(table, run, current)
            _acquire_run_lock(tgt, table, names.target_text)
            try:
                shape = _describe(src, table)
                with src.transaction(force_rollback=True):
                    types = user_types(src, shape.columns, table=table.name)
                target_schema, target_relation = table.target_schema_table
                with tgt.transaction():
                    changes = ensure_types(tgt, types, table=table.name)
                    target_plan = prepare_target(tgt, shape, table=table.name, schema_name=target_schema,
                                                 relation=target_relation,
                                                 soft_delete=table.delete_detection == "soft", need_key=True)
                    changes.extend(target_plan.changes)
                    tgt.execute(sql.SQL("drop table if exists {}").format(stage))
                    _create_stage(tgt, table, stage, names.target, target_plan.columns)
                _open_snapshot(src)
                # The transaction is idle between its statements for as long as the copy takes.
                src.execute("select set_config('idle_in_transaction_session_timeout', '0', true)")
                row = src.execute("select pg_export_snapshot()").fetchone()
                assert row is not None
                with tgt.transaction():
                    held = tgt.execute(
                        sql.SQL("update {} set state = 'held', snapshot = %s, columns = %s, binary_copy = %s, "
                                "schema_changes = %s, held_at = now() where run_key = %s and state = 'planned'")
                        .format(_RUNS),
                        (str(row[0]), Jsonb(target_plan.columns), target_plan.binary, Jsonb(changes), run.run_key))
                if held.rowcount == 0:
                    with tgt.transaction():
                        raise _released(table, run, _run_row(tgt, run.run_key))
                exported = True
                logger.info("%s: holding snapshot %s for parallel run %s (%d range(s))", table.name, row[0],
                            run.run_key, len(run.ranges))
                return _wait_until_done(src, tgt, table, run, timeout_s=timeout_s, poll_s=poll_s)
            finally:
                if exported and not tgt.closed:
                    try:
                        _set_state(tgt, run.run_key, "closed", "the snapshot holder ended", only_from=("held",))
                    except psycopg.Error:
                        logger.debug("could not close run %s; its snapshot is gone with the session", run.run_key)
                if not src.closed:
                    src.rollback()
                _release_run_lock(tgt, names.target_text)
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing="holding the parallel copy's snapshot")


def _create_stage(tgt: psycopg.Connection, table: TableConfig, stage: sql.Identifier, target: sql.Identifier,
                  columns: list[str]) -> None:
    """A copy of the target to swap in when nothing keeps the target from being swapped (the rows are
    then written once), otherwise an unlogged staging table whose rows the finish inserts in place."""
    from ._sync import _column_list

    blockers = swap_blockers(tgt, relation_oid(tgt, *table.target_schema_table) or 0)
    if not blockers:
        tgt.execute(sql.SQL("create table {} (like {} {})").format(stage, target, LIKE_TARGET))
        return
    logger.info("%s: the ranges will be written into the target in place, not swapped in: %s", table.name,
                "; ".join(blockers))
    tgt.execute(sql.SQL("create unlogged table {} as select {} from {} with no data").format(
        stage, _column_list(columns), target))


def _wait_until_done(src: psycopg.Connection, tgt: psycopg.Connection, table: TableConfig, run: ParallelPlan, *,
                     timeout_s: float, poll_s: float) -> str:
    started = time.monotonic()
    last_check = started
    while True:
        with tgt.transaction():
            state = _run_row(tgt, run.run_key)["state"]
        if state in ("finished", "abandoned", "closed", "missing"):
            logger.info("%s: parallel run %s %s; releasing its snapshot", table.name, run.run_key, state)
            return str(state)
        now = time.monotonic()
        if now - started > timeout_s:
            reason = f"the snapshot holder timed out after {timeout_s:.0f}s"
            if _set_state(tgt, run.run_key, "closed", reason, only_from=("held",)):
                raise TerminalError(
                    f"parallel run {run.run_key}: not finished within {timeout_s:.0f}s, so its snapshot was "
                    "released; restart the copy from a new plan, with a longer timeout or more worker slots",
                    table=table.name)
            continue
        if now - last_check > 5:
            src.execute("select 1")  # notices a dropped source connection while waiting
            last_check = now
        time.sleep(poll_s)


def _import_snapshot(src: psycopg.Connection, table: TableConfig, run: ParallelPlan,
                     state: Mapping[str, Any]) -> None:
    src.rollback()
    src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    src.read_only = True
    try:
        src.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(state["snapshot"])))
    except (psycopg.errors.UndefinedObject, psycopg.errors.InvalidParameterValue,
            psycopg.errors.ObjectNotInPrerequisiteState) as error:
        # The exporting transaction has ended: "snapshot ... does not exist" / "invalid snapshot identifier".
        src.rollback()
        raise _released(table, run, {**state, "state": "held"}) from error


def _wait_for_snapshot(tgt: psycopg.Connection, table: TableConfig, run: ParallelPlan, *, wait_s: float,
                       poll_s: float) -> dict[str, Any]:
    started = time.monotonic()
    while True:
        with tgt.transaction():
            state = _run_row(tgt, run.run_key)
        if state["state"] == "held":
            return state
        if state["state"] != "planned":
            raise _released(table, run, state)
        if time.monotonic() - started > wait_s:
            raise TransientError(
                f"parallel run {run.run_key}: its snapshot was not exported within {wait_s:.0f}s; check that "
                "the hold_snapshot step is running (it needs a worker slot while the ranges run)",
                table=table.name)
        time.sleep(poll_s)


def copy_range(source_dsn: str, target_dsn: str, table: TableConfig, plan: ParallelPlan | Mapping[str, Any],
               index: int, *, wait_s: float = 600.0, poll_s: float = 0.5) -> dict[str, int]:
    """COPY key range `index` of the plan, inside the held snapshot, into the staging table.

    Waits up to `wait_s` for the snapshot to be exported. A retry replaces the range's rows.
    Returns `{"index", "rows", "bytes"}`.
    """
    run = _as_plan(plan)
    if not 0 <= index < len(run.ranges):
        raise TerminalError(f"parallel run {run.run_key} has {len(run.ranges)} range(s), not range {index}",
                            table=table.name)
    from ._sync import _Names, _stream

    assert run.key_column is not None and run.key_type is not None
    key_range = run.ranges[index]
    try:
        with connect(target_dsn, role="target", table=table.name) as tgt:
            state = _wait_for_snapshot(tgt, table, run, wait_s=wait_s, poll_s=poll_s)
            columns = list(state["columns"])
            with connect(source_dsn, role="source", table=table.name) as src:
                shape = _describe(src, table)  # which columns COPY reads through a cast
                _import_snapshot(src, table, run, state)
                conditions, params = key_range.condition(run.key_column, run.key_type)
                stage = _stage_name(table)
                with tgt.transaction():
                    current = _run_row(tgt, run.run_key, lock=False)
                    if current["state"] != "held":
                        raise _released(table, run, current)
                    where = sql.SQL(" and ").join(conditions) if conditions else sql.SQL("true")
                    tgt.execute(sql.SQL("delete from {} where {}").format(stage, where), params)
                    source = _Names(table).copy_source(columns, *conditions, shape=shape)
                    rows, size = _stream(src, source, params, tgt, stage, columns, binary=bool(state["binary_copy"]),
                                         progress=f"{table.name} range {index + 1}")
                    tgt.execute(
                        sql.SQL("insert into {} (run_key, range_index, rows, bytes) values (%s, %s, %s, %s) "
                                "on conflict (run_key, range_index) do update set rows = excluded.rows, "
                                "bytes = excluded.bytes, done_at = now()").format(_RANGES),
                        (run.run_key, index, rows, size))
                src.rollback()
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing=f"copying key range {index + 1}")
    logger.info("%s: range %d/%d (%s) copied %d row(s)", table.name, index + 1, len(run.ranges),
                key_range.label(run.key_column), rows)
    return {"index": index, "rows": rows, "bytes": size}


def _new_report(table: TableConfig) -> SyncReport:
    source = table.source if not table.select else f"{table.source} (custom select)"
    return SyncReport(table=table.name, source=source, target=".".join(table.target_schema_table), mode=table.mode)


def _finish_into(source_dsn: str, target_dsn: str, table: TableConfig, run: ParallelPlan, report: SyncReport,
                 validate: bool, *, audit: bool) -> None:
    """The finish step, filling `report`; with `audit`, the `sync_runs` row commits with the data."""
    from ._sync import _Names, _set_lock_timeout, _validate_in_snapshot, record_committed

    names = _Names(table)
    with connect(target_dsn, role="target", table=table.name) as tgt, \
            connect(source_dsn, role="source", table=table.name) as src:
        with tgt.transaction():
            state = _run_row(tgt, run.run_key)
            done = tgt.execute(sql.SQL("select count(*), coalesce(sum(rows), 0), coalesce(sum(bytes), 0) "
                                       "from {} where run_key = %s").format(_RANGES), (run.run_key,)).fetchone()
        if state["state"] != "held":
            raise _released(table, run, state)
        shape = _describe(src, table)
        _import_snapshot(src, table, run, state)
        assert done is not None
        if int(done[0]) != len(run.ranges):
            raise TransientError(f"parallel run {run.run_key}: only {done[0]} of {len(run.ranges)} key range(s) "
                                 "are copied; run the missing ranges first", table=table.name)
        if audit:
            report.started_at = state["planned_at"]
        report.workers = len(run.ranges)
        report.rows_read, report.bytes = int(done[1]), int(done[2])
        report.schema_changes = list(state["schema_changes"] or [])
        report.copy_format = "binary" if state["binary_copy"] else "text"
        columns = list(state["columns"])
        with tgt.transaction():
            if _run_row(tgt, run.run_key, lock=True)["state"] != "held":
                raise _released(table, run, _run_row(tgt, run.run_key))
            _set_lock_timeout(tgt, table)
            if not _swap_loaded_table(tgt, table, run, shape, report):
                _insert_loaded_rows(tgt, table, names, shape, columns, report)
            if table.mode == "incremental":
                assert table.cursor_column is not None
                row = tgt.execute(sql.SQL("select max({})::text from {}").format(
                    sql.Identifier(table.cursor_column), names.target)).fetchone()
                report.watermark_after = row[0] if row else None
            write_state(tgt, report, table.cursor_column)
            if validate:
                # Inside the snapshot the ranges read, before the commit: the audit row can say the result.
                target_plan = TargetPlan(columns, [], bool(state["binary_copy"]))
                report.validation = _validate_in_snapshot(src, tgt, table, names, shape, target_plan)
            if audit:
                _complete(report)
                save_run(tgt, report)
            else:
                record_committed(tgt, report)  # sync_table brings the row up to date after the commit
            tgt.execute(sql.SQL("update {} set state = 'finished', ended_at = now(), report = %s "
                                "where run_key = %s").format(_RUNS),
                        (Jsonb(json.loads(json.dumps(report.to_dict()))), run.run_key))
        src.rollback()
    logger.info("%s: parallel run %s committed %d row(s) into %s", table.name, run.run_key, report.rows_inserted,
                names.target_text)


def _swap_loaded_table(tgt: psycopg.Connection, table: TableConfig, run: ParallelPlan, shape: Shape,
                       report: SyncReport) -> bool:
    """Swap the staging table in for the target when it was created for that (as a copy of the target
    that nothing keeps from being swapped); False when the rows must be written in place instead."""
    from ._sync import add_primary_key

    stage = _stage_name(table)
    row = tgt.execute("select relpersistence = 'p' from pg_class where oid = %s::regclass",
                      (stage.as_string(tgt),)).fetchone()
    if not (row and row[0]):
        return False
    key = f"copy_engine_{run.run_key[:16]}_key"
    # The key and the planner's statistics are built before the target is locked: readers keep
    # reading the old rows meanwhile. (A table replaced in place keeps its statistics; a new one
    # has none until autovacuum, and dbt reads it right after the sync.)
    add_primary_key(tgt, stage, key, shape, table)
    tgt.execute(sql.SQL("analyze {}").format(stage))
    schema, relation = table.target_schema_table
    try:
        with tgt.transaction():
            report.rows_deleted = swap_in(tgt, loaded=(STATE_SCHEMA, _stage_relation(table)), loaded_key=key,
                                          schema=schema, relation=relation, table=table.name)
    except SwapRefusedError as refused:
        logger.warning("%s: cannot swap the loaded rows in (%s); writing them into the target in place",
                       table.name, refused)
        return False
    report.rows_inserted = report.rows_read
    return True


def _insert_loaded_rows(tgt: psycopg.Connection, table: TableConfig, names: _Names, shape: Shape, columns: list[str],
                        report: SyncReport) -> None:
    """Replace the target's rows with the staging table's, in place: TRUNCATE, INSERT … SELECT, key."""
    from ._sync import _column_list, _drop_primary_key, add_primary_key

    stage = _stage_name(table)
    tgt.execute(sql.SQL("lock table {} in access exclusive mode").format(names.target))
    before = tgt.execute(sql.SQL("select count(*) from {}").format(names.target)).fetchone()
    report.rows_deleted = int(before[0]) if before else 0
    constraint = _drop_primary_key(tgt, names, shape)
    tgt.execute(sql.SQL("truncate {}").format(names.target))
    inserted = tgt.execute(sql.SQL("insert into {} ({}) select {} from {}").format(
        names.target, _column_list(columns), _column_list(columns), stage))
    report.rows_inserted = max(inserted.rowcount, 0)
    if constraint:
        add_primary_key(tgt, names.target, constraint, shape, table)
    tgt.execute(sql.SQL("drop table {}").format(stage))


def _complete(report: SyncReport) -> None:
    if report.validation.match is False:
        report.status = "failed"
        report.error = f"{report.table}: {_mismatch_message(report)}"
        report.error_type = ValidationMismatchError.__name__
    else:
        report.status = "success"
    _finish_report(report)


def _finish_report(report: SyncReport) -> None:
    """Duration and end time, counted from the plan (the run's start), not from this process's start."""
    from ._sync import _finish

    _finish(report, time.monotonic() - (dt.datetime.now(dt.UTC) - report.started_at).total_seconds())


def _mismatch_message(report: SyncReport) -> str:
    result = report.validation
    return (f"validation found {len(result.differing_ranges)} differing key range(s) (source {result.source_rows} "
            f"rows, target {result.target_rows}); first differing keys {result.differing_keys[:5]}; check for "
            "writes to the target outside the engine and run a full sync")


def finish_parallel_copy(source_dsn: str, target_dsn: str, table: TableConfig,
                         plan: ParallelPlan | Mapping[str, Any], *, validate: bool | None = None) -> SyncReport:
    """Swap the staged rows into the target atomically (or run the normal sync for an empty plan).

    Like `sync_table`: returns the run's report, raises a `CopyEngineError` (with `.report`) on
    failure, and appends the run to `_copy_engine.sync_runs`, here in the data's transaction.
    """
    run = _as_plan(plan)
    if not run.ranges:
        from ._sync import sync_table

        return sync_table(source_dsn, target_dsn, table.with_overrides(parallel=1, large=False), validate=validate)
    from ._sync import _record

    committed = _committed_report(target_dsn, table, run)
    if committed is not None:
        return committed
    report = _new_report(table)
    report.attempts = 1
    should_validate = table.validate if validate is None else validate
    try:
        try:
            _finish_into(source_dsn, target_dsn, table, run, report, should_validate, audit=True)
        except psycopg.Error as error:
            raise_classified(error, table=table.name, doing="finishing the parallel copy")
    except CopyEngineError as error:
        report.status = "failed"
        report.error = str(error)
        report.error_type = type(error).__name__
        error.report = report
        _finish_report(report)
        logger.error("%s", report.summary())
        _record(target_dsn, report)
        raise
    logger.info("%s", report.summary())
    if report.validation.match is False:
        error = ValidationMismatchError(_mismatch_message(report), table=table.name,
                                        details=report.validation.to_dict())
        error.report = report
        raise error
    return report


def _committed_report(target_dsn: str, table: TableConfig, run: ParallelPlan) -> SyncReport | None:
    """The report of a run whose finish step already committed successfully (a retried finish task)."""
    try:
        with connect(target_dsn, role="target", table=table.name) as tgt:
            ensure_parallel_tables(tgt)
            row = tgt.execute(sql.SQL("select report from {} where run_key = %s and state = 'finished'")
                              .format(_RUNS), (run.run_key,)).fetchone()
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing="finishing the parallel copy")
    if row is None or row[0] is None or row[0].get("status") != "success":
        return None
    logger.info("%s: parallel run %s has already committed; returning its report", table.name, run.run_key)
    return _report_from_dict(row[0])


def _report_from_dict(data: Mapping[str, Any]) -> SyncReport:
    fields = dict(data)
    validation = dict(fields.pop("validation") or {})
    differences = [RangeDifference(**item) for item in validation.pop("differing_ranges", [])]
    started, finished = fields.pop("started_at"), fields.pop("finished_at")
    return SyncReport(**fields, validation=ValidationResult(**validation, differing_ranges=differences),
                      started_at=dt.datetime.fromisoformat(started),
                      finished_at=dt.datetime.fromisoformat(finished) if finished else None)


def attempt_parallel(source_dsn: str, target_dsn: str, table: TableConfig, report: SyncReport,
                     validate: bool) -> None:
    """One attempt of `sync_table` for `parallel: N`: the same four steps, the ranges in threads."""
    plan = ParallelPlan.from_dict(plan_parallel_copy(source_dsn, target_dsn, table, report.workers))
    if not plan.ranges:
        from ._sync import _attempt

        report.workers = 1
        _attempt(source_dsn, target_dsn, table, report, validate)
        return
    logger.info("%s: copying %d key range(s) with %d worker(s)", table.name, len(plan.ranges), report.workers)
    with ThreadPoolExecutor(max_workers=1 + report.workers) as pool:
        holder = pool.submit(hold_snapshot, source_dsn, target_dsn, table, plan, poll_s=0.05)
        try:
            _await_snapshot(target_dsn, table, plan, holder)
            ranges = [pool.submit(copy_range, source_dsn, target_dsn, table, plan, index, wait_s=0, poll_s=0.05)
                      for index in range(len(plan.ranges))]
            for future in ranges:
                future.result()
            _finish_into(source_dsn, target_dsn, table, plan, report, validate, audit=False)
        except BaseException as error:
            abandon_parallel_copy(target_dsn, table, plan, f"{type(error).__name__} in the copy")
            raise
        holder.result()


def _await_snapshot(target_dsn: str, table: TableConfig, plan: ParallelPlan, holder: Future[str]) -> None:
    """Wait until the holder thread has exported the snapshot, or raise the error it failed with."""
    with connect(target_dsn, role="target", table=table.name) as tgt:
        while True:
            with tgt.transaction():
                state = _run_row(tgt, plan.run_key)
            if state["state"] == "held":
                return
            if holder.done():
                holder.result()
                raise _released(table, plan, state)
            time.sleep(0.02)
