"""The entry points: `sync_table` (choose the strategy, retry), `validate_table`, `finish_parallel_copy`,
`drop_unconfigured_replication`."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from ._cdc import attempt_cdc, drop_replication
from ._config import EngineConfig, TableConfig
from ._connect import mask_dsn, raise_classified
from ._errors import ConcurrentRunError, CopyEngineError, TerminalError, TransientError
from ._parallel import ParallelPlan, as_plan, attempt_ranges, finish_ranges
from ._report import SyncReport, ValidationResult
from ._run import TableRun, finish_report, mismatch_error, open_snapshot, record_failure, record_final
from ._schema import SOFT_DELETE_COLUMN, TargetPlan, relation_oid, target_conversions
from ._sync import attempt_stream

logger = logging.getLogger(__name__)


def sync_table(
    source_dsn: str,
    target_dsn: str,
    table: TableConfig,
    *,
    validate: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncReport:
    """Copy one table from the source database into the warehouse and return the run report.

    Raises a `CopyEngineError` subclass on failure (its `.report` holds the failed run's report):
    `TransientError` after the retries are spent, `TerminalError` at once.
    """
    run = TableRun(source_dsn, target_dsn, table, validate=validate)
    report = run.report
    logger.info("%s: %s sync %s -> %s (target %s)", table.name, table.mode, report.source, report.target,
                mask_dsn(target_dsn))
    try:
        for attempt in range(1, table.retries + 2):
            report.attempts = attempt
            try:
                try:
                    if table.mode == "cdc":
                        report.workers = 1
                        attempt_cdc(run)
                    elif table.parallel <= 1 or not attempt_ranges(run):
                        report.workers = 1
                        attempt_stream(run)
                except psycopg.Error as error:
                    raise_classified(error, table=table.name, doing="the sync")
                break
            except TransientError as error:
                if isinstance(error, ConcurrentRunError) or attempt > table.retries:
                    raise
                delay = table.retry_backoff_s * (2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                logger.warning("%s: attempt %d failed (%s); retrying in %.1fs", table.name, attempt, error.message,
                               delay)
                _reset_counts(report)
                sleep(delay)
        if report.validation.match is False:
            raise mismatch_error(report)
        report.status = "success"
    except CopyEngineError as error:
        record_failure(target_dsn, report, error)
        raise
    finish_report(report)
    logger.info("%s", report.summary())
    record_final(target_dsn, report)
    return report


def _reset_counts(report: SyncReport) -> None:
    """Before a retry: what the failed attempt counted. Schema changes it committed stay reported."""
    report.rows_read = report.rows_inserted = report.rows_updated = report.rows_deleted = report.rows_replaced = 0
    report.bytes = 0
    report.watermark_before = report.watermark_after = None
    report.validation = ValidationResult.skipped_result()


def finish_parallel_copy(source_dsn: str, target_dsn: str, table: TableConfig,
                         plan: ParallelPlan | Mapping[str, Any], *, validate: bool | None = None) -> SyncReport:
    """Swap the staged rows into the target atomically (or run the normal sync for an empty plan).

    Like `sync_table`: returns the run's report, raises a `CopyEngineError` (with `.report`) on
    failure, and appends the run to `_copy_engine.sync_runs`, here in the data's transaction.
    """
    ranges = as_plan(plan)
    if not ranges.ranges:
        return sync_table(source_dsn, target_dsn, table.with_overrides(parallel=1), validate=validate)
    return finish_ranges(source_dsn, target_dsn, table, ranges, validate=validate)


def validate_table(source_dsn: str, target_dsn: str, table: TableConfig) -> ValidationResult:
    """Compare source and target now, without syncing."""
    run = TableRun(source_dsn, target_dsn, table)
    try:
        with run.connected():
            shape = run.describe()
            target_schema, target_relation = table.target_schema_table
            with run.tgt.transaction(force_rollback=True):
                oid = relation_oid(run.tgt, target_schema, target_relation)
                if oid is None:
                    raise TerminalError(f"target table {run.names.target_text} does not exist; run a sync first",
                                        table=table.name)
                converted = target_conversions(run.tgt, shape, oid)
                has_soft = run.tgt.execute(
                    "select 1 from information_schema.columns where table_schema = %s and table_name = %s "
                    "and column_name = %s", (target_schema, target_relation, SOFT_DELETE_COLUMN)).fetchone()
            run.plan = TargetPlan(shape.names, [SOFT_DELETE_COLUMN] if has_soft else [], True, converted=converted)
            open_snapshot(run.src)
            result = run.validate_in_snapshot()
            run.src.rollback()
            return result
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing="the validation")


def drop_unconfigured_replication(source_dsn: str, target_dsn: str, config: EngineConfig, *,
                                  dry_run: bool = False) -> list[str]:
    """Drop the replication slot and publication of each CDC table no longer configured (with mode cdc).

    A slot nobody reads keeps the source's WAL; returns what was dropped (with `dry_run`: would be).
    """
    configured = [".".join(table.target_schema_table) for table in config.tables if table.mode == "cdc"]
    try:
        return drop_replication(source_dsn, target_dsn, configured, dry_run=dry_run)
    except psycopg.Error as error:
        raise_classified(error, table="(cdc cleanup)", doing="dropping replication slots")
