"""The core both strategies share: one `TableRun` per run of one table, and the steps it takes.

A run holds its connections, the table's configuration, the names it reads and writes, the
source's shape, the target plan and the report. Each step here takes the run and does one thing;
`_sync` (one stream) and `_parallel` (key ranges on one snapshot) are orders of these steps, and
`_api` chooses between them and retries.
"""

from __future__ import annotations

import datetime as dt
import logging
import resource
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from psycopg import sql

from ._config import TableConfig
from ._connect import connect
from ._copy import TableColumns, stream
from ._errors import (
    ConcurrentRunError,
    CopyEngineError,
    MissingPrimaryKeyError,
    SourceError,
    ValidationMismatchError,
)
from ._report import SyncReport, ValidationResult
from ._schema import SOFT_DELETE_COLUMN, Shape, TargetPlan, describe_source, ensure_types, prepare_target, user_types
from ._state import ensure_state_tables, run_lock_key, save_run
from ._validate import RowSet, compare

logger = logging.getLogger(__name__)

T = TypeVar("T")


def user_sql(text: str) -> sql.SQL:
    """User SQL from the configuration, as a fragment; `%` is escaped because queries take parameters."""
    return sql.SQL(text.strip().rstrip(";").replace("%", "%%"))


def column_list(names: list[str] | tuple[str, ...], prefix: str | None = None) -> sql.Composable:
    if prefix:
        return sql.SQL(", ").join(sql.Identifier(prefix, n) for n in names)
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


@dataclass(frozen=True)
class Names:
    """What a table's run reads (the source, a custom select and where) and writes (the target)."""

    table: TableConfig

    @property
    def target(self) -> sql.Identifier:
        return sql.Identifier(*self.table.target_schema_table)

    @property
    def target_text(self) -> str:
        return ".".join(self.table.target_schema_table)

    def base(self) -> sql.Composable:
        if self.table.select:
            return sql.SQL("({})").format(user_sql(self.table.select))
        return sql.Identifier(*self.table.source_schema_table)

    def select_from_base(self) -> sql.Composable | None:
        return user_sql(self.table.select) if self.table.select else None

    def where(self) -> sql.Composable | None:
        return user_sql(self.table.where) if self.table.where else None

    def copy_source(self, columns: list[str], *extra: sql.Composable, shape: Shape | None = None) -> sql.Composable:
        """What `COPY … TO STDOUT` reads: the plain `table (columns)` form when nothing filters it and the
        source's shape allows it (see `Shape.read_reason`)."""
        if not extra and not self.table.where and not self.table.select and (shape is None or not shape.read_reason):
            return TableColumns(self.base(), columns)
        return self.source_rows(columns, *extra, shape=shape)

    def source_rows(self, columns: list[str] | tuple[str, ...], *extra: sql.Composable,
                    shape: Shape | None = None) -> sql.Composable:
        """`select <columns> from <source or custom select> where <custom where> and <extra>`; with the
        shape, a column whose output loses stored content is read through its cast."""
        conditions: list[sql.Composable] = []
        if self.table.where:
            conditions.append(sql.SQL("({})").format(user_sql(self.table.where)))
        conditions.extend(extra)
        select_list = shape.read_list(list(columns)) if shape is not None else column_list(columns)
        query = sql.SQL("select {} from {} as _source").format(select_list, self.base())
        if conditions:
            query = sql.SQL("{} where {}").format(query, sql.SQL(" and ").join(conditions))
        return query

    def target_rows(self, columns: list[str] | tuple[str, ...], *, live_only: bool,
                    converted: dict[str, str] | None = None) -> RowSet:
        """The target's rows as a subquery; `live_only` leaves out the rows marked soft-deleted;
        `converted` columns are read in the source's type (`TargetPlan.converted`)."""
        live = sql.SQL(" where {} is null").format(sql.Identifier(SOFT_DELETE_COLUMN)) if live_only else sql.SQL("")
        converted = converted or {}
        items = sql.SQL(", ").join(
            sql.SQL("{0}::{1} as {0}").format(sql.Identifier(c), sql.SQL(converted[c])) if c in converted
            else sql.Identifier(c) for c in columns)
        return RowSet(sql.SQL("(select {} from {}{})").format(items, self.target, live))


def new_report(table: TableConfig) -> SyncReport:
    source = table.source if not table.select else f"{table.source} (custom select)"
    return SyncReport(table=table.name, source=source, target=".".join(table.target_schema_table), mode=table.mode,
                      workers=table.parallel)


def finish_report(report: SyncReport) -> None:
    """End time, duration (from the run's start, which for a parallel copy is its plan) and rate."""
    report.finished_at = dt.datetime.now(dt.UTC)
    report.duration_s = round((report.finished_at - report.started_at).total_seconds(), 3)
    report.rows_per_s = round(report.rows_read / report.duration_s, 1) if report.duration_s > 0 else 0.0
    report.peak_memory_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def mismatch_error(report: SyncReport) -> ValidationMismatchError:
    result = report.validation
    error = ValidationMismatchError(
        f"validation found {len(result.differing_ranges)} differing key range(s) (source {result.source_rows} "
        f"rows, target {result.target_rows}); first differing keys {result.differing_keys[:5]}; check for writes "
        "to the target outside the engine and run a full sync",
        table=report.table, details=result.to_dict())
    error.report = report
    return error


def record_final(target_dsn: str, report: SyncReport) -> None:
    """The run's final audit row: the committed row updated, or a new row for a run that committed nothing."""
    try:
        with psycopg.connect(target_dsn, connect_timeout=10, application_name="copy_engine") as conn:
            ensure_state_tables(conn)
            save_run(conn, report)
    except (psycopg.Error, CopyEngineError) as error:
        logger.warning("%s: could not append the run to _copy_engine.sync_runs: %s", report.table,
                       (str(error).splitlines() or [""])[0])


def record_failure(target_dsn: str, report: SyncReport, error: CopyEngineError) -> None:
    """A failed run's bookkeeping: the report says why, the error carries it, the audit keeps it."""
    report.status = "failed"
    report.error = str(error)
    report.error_type = type(error).__name__
    error.report = report
    finish_report(report)
    logger.error("%s", report.summary())
    record_final(target_dsn, report)


def wait_for(check: Callable[[], T | None], *, timeout_s: float, poll_s: float) -> T | None:
    """Call `check` every `poll_s` seconds until it returns something; None when `timeout_s` passes first."""
    started = time.monotonic()
    while True:
        found = check()
        if found is not None:
            return found
        waited = time.monotonic() - started
        if waited >= timeout_s:
            return None
        time.sleep(min(poll_s, max(0.01, timeout_s - waited)))


def open_snapshot(src: psycopg.Connection) -> None:
    """Start the source's `REPEATABLE READ READ ONLY` transaction: every later read sees one snapshot."""
    src.rollback()
    src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    src.read_only = True
    src.execute("select 1")


def import_snapshot(src: psycopg.Connection, snapshot: str) -> None:
    """Start a source transaction on the snapshot another transaction exported (`pg_export_snapshot`)."""
    src.rollback()
    src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    src.read_only = True
    src.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(snapshot)))


class TableRun:
    """One run of one table: its connections, configuration, names, source shape, target plan and report.

    `connected()` opens both connections; `describe()` reads the source's shape and
    `prepare_target()` makes the target plan; the other methods are the steps both strategies take.
    """

    def __init__(self, source_dsn: str, target_dsn: str, table: TableConfig, *, validate: bool | None = None,
                 report: SyncReport | None = None) -> None:
        self.source_dsn = source_dsn
        self.target_dsn = target_dsn
        self.table = table
        self.names = Names(table)
        self.report = report if report is not None else new_report(table)
        self.validate = table.validate if validate is None else validate
        self._src: psycopg.Connection | None = None
        self._tgt: psycopg.Connection | None = None
        self._shape: Shape | None = None
        self._plan: TargetPlan | None = None

    @property
    def src(self) -> psycopg.Connection:
        assert self._src is not None, "the run is not connected"
        return self._src

    @property
    def tgt(self) -> psycopg.Connection:
        assert self._tgt is not None, "the run is not connected"
        return self._tgt

    @property
    def shape(self) -> Shape:
        assert self._shape is not None, "describe() the source first"
        return self._shape

    @property
    def plan(self) -> TargetPlan:
        assert self._plan is not None, "prepare_target() first"
        return self._plan

    @plan.setter
    def plan(self, plan: TargetPlan) -> None:
        self._plan = plan

    @contextmanager
    def connected(self, *, source_application: str = "copy_engine") -> Iterator[None]:
        with connect(self.target_dsn, role="target", table=self.table.name) as tgt, \
                connect(self.source_dsn, role="source", table=self.table.name,
                        application_name=source_application) as src:
            self._tgt, self._src = tgt, src
            try:
                yield
            finally:
                self._tgt = self._src = None

    # --- the run lock ---------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the session advisory lock on the target table; waits up to `lock_wait_s`, then fails clearly."""
        key = run_lock_key(self.names.target_text)

        def try_lock() -> bool | None:
            row = self.tgt.execute("select pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()
            self.tgt.commit()
            return True if row and row[0] else None

        started = time.monotonic()
        if wait_for(try_lock, timeout_s=self.table.lock_wait_s, poll_s=0.2) is None:
            waited = time.monotonic() - started
            raise ConcurrentRunError(
                f"another run is syncing {self.names.target_text} and still holds its lock after {waited:.1f}s; "
                "let it finish, or raise lock_wait_s",
                table=self.table.name, waited_s=waited)
        try:
            yield
        finally:
            self._unlock(key)

    def _unlock(self, key: str) -> None:
        if self.tgt.closed:
            return
        try:
            self.tgt.rollback()
            self.tgt.execute("select pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
            self.tgt.commit()
        except psycopg.Error:
            logger.debug("could not release the run lock on %s; the session end releases it", self.names.target_text)

    # --- the source and the target's shape ------------------------------------------------------

    def describe(self, *, key_for: str | None = None) -> Shape:
        """Read the source's columns and key; `key_for` names what needs a key, if anything does.

        A configuration the source cannot serve (a missing key or cursor column) fails here, before
        anything is written.
        """
        table = self.table
        schema_name, relation = table.source_schema_table
        shape = describe_source(self.src, table=table.name, schema_name=schema_name, relation=relation,
                                select=self.names.select_from_base(), where=self.names.where(),
                                primary_key=table.primary_key)
        if key_for and not shape.primary_key:
            raise MissingPrimaryKeyError(f"{key_for} needs a primary key and {table.source} has none; set primary_key",
                                         table=table.name)
        if table.mode == "incremental" and table.cursor_column and shape.column(table.cursor_column) is None:
            raise SourceError(
                f"cursor_column {table.cursor_column} is not a source column ({', '.join(shape.names)})",
                table=table.name)
        self._shape = shape
        return shape

    def create_types(self) -> None:
        """Create the user-defined types the source's columns need in the target (committed at once)."""
        with self.src.transaction(force_rollback=True):
            types = user_types(self.src, self.shape.columns, table=self.table.name)
        with self.tgt.transaction():
            self.report.schema_changes.extend(ensure_types(self.tgt, types, table=self.table.name))

    def prepare_target(self, *, need_key: bool) -> TargetPlan:
        """Create the target table or bring it in line with the source, in the caller's transaction."""
        schema_name, relation = self.table.target_schema_table
        plan = prepare_target(self.tgt, self.shape, table=self.table.name, schema_name=schema_name,
                              relation=relation, soft_delete=self.table.delete_detection == "soft", need_key=need_key)
        self.report.schema_changes.extend(plan.changes)
        self.report.copy_format = "binary" if plan.binary else "text"
        self._plan = plan
        return plan

    # --- writing the target ---------------------------------------------------------------------

    @contextmanager
    def data_transaction(self) -> Iterator[None]:
        """The target transaction that writes the rows; when it rolls back, so does the report.

        A failed run then reports no row it did not commit and no schema change it rolled back.
        """
        report = self.report
        kept = (report.rows_read, report.rows_inserted, report.rows_updated, report.rows_deleted,
                report.rows_replaced, report.bytes, list(report.schema_changes), report.watermark_after)
        try:
            with self.tgt.transaction():
                yield
        except BaseException:
            (report.rows_read, report.rows_inserted, report.rows_updated, report.rows_deleted,
             report.rows_replaced, report.bytes, report.schema_changes, report.watermark_after) = kept
            raise

    def set_lock_timeout(self) -> None:
        self.tgt.execute("select set_config('lock_timeout', %s, true)", (f"{int(self.table.lock_timeout_s * 1000)}ms",))

    def upsert(self, rows: sql.Composable, *, computed: Collection[str] = ()) -> tuple[int, int]:
        """Write `rows` (a select of the plan's columns, at most one row per key) into the target: a new key
        is inserted, a known one updated where a value differs; returns (inserted, updated).

        Each row finds its key through the target's key index (the insert's conflict check), so the cost
        follows the rows written, not the table. Rows whose values are all equal are not rewritten.
        `computed` columns are written by the insert only: the caller computes them after.
        """
        row = self.tgt.execute(self.upsert_query(rows, computed=computed)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def upsert_query(self, rows: sql.Composable, *, computed: Collection[str] = ()) -> sql.Composable:
        """`upsert`'s statement, for a caller that sends it itself: its one row is (inserted, updated)."""
        names, plan, shape = self.names, self.plan, self.shape
        key = list(shape.primary_key)
        values = [c for c in plan.columns if c not in key and c not in computed]
        # Columns the source no longer has, and the soft-delete mark, are reset on every written row.
        reset = list(plan.extra_columns)
        setters = [sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in values]
        setters += [sql.SQL("{} = null").format(sql.Identifier(c)) for c in reset]
        # Text comparison: exact for every type (also -0 vs 0, 1.0 vs 1.00) and works for json and xml,
        # which have no equality operator.
        changed = [sql.SQL("({} is distinct from {})").format(shape.as_text(c, "t"), shape.as_text(c, "excluded"))
                   for c in values]
        changed += [sql.SQL("t.{} is not null").format(sql.Identifier(c)) for c in reset]
        if setters:
            action: sql.Composable = sql.SQL("do update set {} where {}").format(
                sql.SQL(", ").join(setters), sql.SQL(" or ").join(changed) if changed else sql.SQL("false"))
        else:
            action = sql.SQL("do nothing")
        # `overriding system value`: a target made by hand may keep the source's identity columns, which
        # COPY writes and an insert would refuse.
        query = sql.SQL(
            """with written as (
                   insert into {target} as t ({columns}) overriding system value
                   {rows}
                   on conflict ({key}) {action}
                   returning (xmax = 0) as inserted
               )
               select count(*) filter (where inserted), count(*) filter (where not inserted) from written"""
        ).format(target=names.target, columns=column_list(plan.columns), rows=rows, key=column_list(key),
                 action=action)
        return query

    def replace_rows(self, load: Callable[[], int], key_changes: Callable[[TableRun], tuple[int, int]]) -> int:
        """Replace the target's rows in place: lock it, drop its key, TRUNCATE, `load()`, rebuild the key.

        Returns the rows `load` wrote. Readers wait on the lock and then see the old rows or the new.
        """
        target = self.names.target
        self.set_lock_timeout()
        self.tgt.execute(sql.SQL("lock table {} in access exclusive mode").format(target))
        before = self.rows_before(key_changes)
        key_constraint = self._drop_primary_key()
        self.tgt.execute(sql.SQL("truncate {}").format(target))
        rows = load()
        if key_constraint:
            self.add_primary_key(target, key_constraint)
        self.report_replacement(rows, before)
        return rows

    def rows_before(self, key_changes: Callable[[TableRun], tuple[int, int]]) -> tuple[int, int | None]:
        """Before the target's rows are replaced: (rows it holds, those whose key the source lacks).

        The second is None for a table without a primary key (its rows have no identity to follow).
        """
        target = self.names.target
        if not self.shape.primary_key:
            row = self.tgt.execute(sql.SQL("select count(*) from {}").format(target)).fetchone()
            return (int(row[0]) if row else 0), None
        empty = self.tgt.execute(sql.SQL("select not exists (select from {})").format(target)).fetchone()
        return (0, 0) if empty and empty[0] else key_changes(self)

    def report_replacement(self, rows: int, before: tuple[int, int | None]) -> None:
        """A full copy's counts against what the target held: rows whose key is new (inserted), whose
        key is gone (deleted), and rows written in place of one with the same key (replaced)."""
        old_rows, removed = before
        kept = old_rows - removed if removed is not None else min(old_rows, rows)
        self.report.rows_replaced = kept
        self.report.rows_inserted = rows - kept
        self.report.rows_deleted = old_rows - kept

    def load_full(self, key_changes: Callable[[TableRun], tuple[int, int]]) -> None:
        """Replace the target's rows with the source snapshot's, streamed in one COPY.

        `key_changes` counts the keys the target holds and the source lacks, for the report.
        """
        plan, report = self.plan, self.report

        def load() -> int:
            # FREEZE (allowed: the table was truncated in this transaction) writes the rows frozen and their
            # pages all-visible, so the first reader sets no hint bits, vacuum need not freeze them, and the
            # next full sync counts the old rows from the key index. Like TRUNCATE, it lets a transaction whose
            # snapshot is older than the commit see the new rows; readers still never see a partial table.
            rows, report.bytes = stream(self.src, self.names.copy_source(plan.columns, shape=self.shape), {}, self.tgt,
                                        self.names.target, plan.columns, binary=plan.binary,
                                        progress=self.table.name, freeze=plan.ordinary_table)
            return rows

        report.rows_read = self.replace_rows(load, key_changes)

    def add_primary_key(self, relation: sql.Composable, constraint: str) -> None:
        """Build the primary key on freshly loaded rows; a repeated key value is the source's error."""
        key = self.shape.primary_key
        # One in-memory sort for the key index (the default 64MB spills at a few million rows).
        self.tgt.execute("select set_config('maintenance_work_mem', '256MB', true)")
        try:
            with self.tgt.transaction():
                self.tgt.execute(sql.SQL("alter table {} add constraint {} primary key ({})").format(
                    relation, sql.Identifier(constraint), column_list(key)))
        except psycopg.errors.UniqueViolation as error:
            raise SourceError(
                f"the source rows repeat a primary key value ({', '.join(key)}): "
                f"{(str(error).splitlines() or [''])[-1]}; fix the custom select or primary_key",
                table=self.table.name) from error

    def _drop_primary_key(self) -> str | None:
        """Drop the target's primary key for the load and return its name, unless something depends on it."""
        if not self.shape.primary_key:
            return None
        row = self.tgt.execute(
            "select c.conname from pg_constraint as c join pg_class as r on r.oid = c.conrelid "
            "join pg_namespace as n on n.oid = r.relnamespace "
            "where n.nspname = %s and r.relname = %s and c.contype = 'p'", self.table.target_schema_table).fetchone()
        if row is None:
            return None
        try:
            with self.tgt.transaction():
                self.tgt.execute(sql.SQL("alter table {} drop constraint {}").format(
                    self.names.target, sql.Identifier(row[0])))
        except psycopg.errors.DependentObjectsStillExist:
            logger.info("%s: primary key has dependents (foreign keys); loading with the index in place",
                        self.table.name)
            return None
        return str(row[0])

    # --- validation and the audit row -----------------------------------------------------------

    def validate_in_snapshot(self) -> ValidationResult:
        """Compare the source, as the run's snapshot sees it, with the target as this transaction sees it."""
        table, shape = self.table, self.shape
        return compare(
            self.src, self.tgt,
            source_rows=RowSet(sql.SQL("({})").format(self.names.source_rows(shape.names))),
            target_rows=self.names.target_rows(shape.names,
                                               live_only=SOFT_DELETE_COLUMN in self.plan.extra_columns,
                                               converted=self.plan.converted),
            shape=shape, ranges=table.validation_ranges,
            count_query=user_sql(table.count_query) if table.count_query else None)

    def record_committed(self) -> None:
        """Write the run's audit row inside the data transaction, so that it commits with the data.

        It says success so far; `record_final` brings it up to date after the commit.
        """
        self.report.status = "success"
        finish_report(self.report)
        save_run(self.tgt, self.report)
