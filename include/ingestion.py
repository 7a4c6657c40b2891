"""The ingestion DAG's work, callable and testable without Airflow."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from include.alerts import send_validation_alert
from include.copy_engine import (
    SnapshotReleasedError,
    SyncReport,
    TableConfig,
    TerminalError,
    ValidationMismatchError,
    abandon_parallel_copy,
    copy_range,
    finish_parallel_copy,
    hold_snapshot,
    load_config,
    plan_parallel_copy,
    sync_table,
)
from include.pipeline import TABLES_CONFIG, warehouse_table_asset

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a snapshot holder keeps the source transaction open waiting for the ranges and the
# finish step (queued ranges, retries with backoff) before it gives up.
HOLD_TIMEOUT = timedelta(hours=2)
# How long a range waits for its snapshot to be exported (the holder may start after it).
SNAPSHOT_WAIT = timedelta(minutes=10)
# How long the holder waits for the first of its ranges to start. On Celery or Kubernetes the holder
# takes a worker slot for the whole copy; when every other slot is taken too (by other holders, or
# a worker with one slot), the ranges would wait for the holder's timeout of hours. Past this the
# holder lets go and fails with SlotsExhaustedError's message. INGEST_RANGES_START_TIMEOUT_S sets it.
RANGES_START_TIMEOUT = timedelta(seconds=float(os.environ.get("INGEST_RANGES_START_TIMEOUT_S", "600")))
# The task states of a range that has got a worker slot (running now, or ran already).
STARTED_STATES = ("running", "success", "failed", "up_for_retry", "up_for_reschedule", "restarting", "skipped")


class SlotsExhaustedError(TerminalError):
    """None of a large table's key ranges got a worker slot while its snapshot holder held one."""

    def __init__(self, table: str, ranges: int, waited: timedelta) -> None:
        super().__init__(
            f"none of its {ranges} copy_range tasks started within {waited.total_seconds():.0f}s of hold_snapshot "
            f"starting: every worker slot is taken, and hold_snapshot holds one for the whole copy. Give the "
            f"workers at least 2 slots per large table copied at the same time ({1 + ranges} to copy all its "
            "ranges at once; README, 'Sizing worker slots'), then clear the table's task group from its plan task",
            table=table)


def configured_tables() -> list[TableConfig]:
    """The tables of include/config/tables.yml (read at DAG parse time: a small local file)."""
    return list(load_config(TABLES_CONFIG).tables)


# The pipeline's schedule when tables.yml sets none: every day at midnight UTC.
DEFAULT_SCHEDULE = "@daily"
SCHEDULE_VARIABLE = "PIPELINE_SCHEDULE"
_PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")


class ScheduleError(ValueError):
    """`schedule:` in the table configuration is not a cron expression, a preset or `none`."""


def pipeline_schedule(config_path: Path | None = None) -> str | None:
    """When the pipeline starts on its own: `schedule:` of the table configuration (a cron
    expression, a preset such as `@hourly`, or `none` for manual runs only), `@daily` by default.

    PIPELINE_SCHEDULE overrides it for one environment (the local stack sets `none`: `make run`
    triggers the run itself). Ingestion runs on it; with no tables configured, the transform does.
    """
    import yaml
    from croniter import croniter

    value = os.environ.get(SCHEDULE_VARIABLE)
    where = SCHEDULE_VARIABLE
    if value is None:
        path = config_path or TABLES_CONFIG
        document = yaml.safe_load(path.read_text()) or {}
        value = document.get("schedule", DEFAULT_SCHEDULE)
        where = f"`schedule:` in {path.name}"
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    value = str(value).strip()
    if value in _PRESETS or (not value.startswith("@") and croniter.is_valid(value)):
        return value
    raise ScheduleError(
        f"{where} is {value!r}: give a cron expression (e.g. '0 6 * * *'), one of {', '.join(_PRESETS)}, or none")


def transform_schedule() -> list[Any] | str | None:
    """The transform runs once every configured raw table has new data (their Assets, all of them);
    a dbt-only project (no tables) runs on the pipeline's schedule instead."""
    tables = configured_tables()
    if tables:
        return [warehouse_table_asset(table.target) for table in tables]
    return pipeline_schedule()


def ingestion_schedule() -> str | None:
    """Ingestion runs on the pipeline's schedule (nothing to run when no table is configured)."""
    schedule = pipeline_schedule()
    return schedule if configured_tables() else None


def table_config(name: str) -> TableConfig:
    return load_config(TABLES_CONFIG).table(name)


def is_large(table: TableConfig) -> bool:
    """A table with `parallel: N` (N > 1) is copied as N key-range tasks on one snapshot."""
    return table.parallel > 1


# `full`: a `mode: cdc` table whose source is not at wal_level = logical is copied in full instead,
# with a note. The local stack sets it, so that the demo also runs on a source of your own that
# cannot decode changes; unset (a Deployment), such a table fails with the engine's message and fix.
CDC_FALLBACK_VARIABLE = "PIPELINE_CDC_FALLBACK"


def cdc_fallback(table: TableConfig, source_dsn: str) -> tuple[TableConfig, str | None]:
    """The table as this run copies it, and why it is not by CDC when PIPELINE_CDC_FALLBACK allows that."""
    if table.mode != "cdc" or os.environ.get(CDC_FALLBACK_VARIABLE, "").strip().lower() != "full":
        return table, None
    import psycopg

    try:
        with psycopg.connect(source_dsn, connect_timeout=10) as conn:
            row = conn.execute("select current_setting('wal_level')").fetchone()
    except psycopg.Error:
        return table, None  # the copy engine names the connection problem
    wal_level = row[0] if row else None
    if wal_level == "logical":
        return table, None
    return table.with_overrides(mode="full"), (
        f"copied in full, not by CDC: the source's wal_level is {wal_level} (set wal_level = logical on the source "
        f"and restart it to sync by CDC; {CDC_FALLBACK_VARIABLE}=full allowed the full copy)")


def sync_configured_table(name: str, source_dsn: str, warehouse_dsn: str) -> SyncReport:
    """Copy one configured table into the warehouse and log its report's summary."""
    table, fallback = cdc_fallback(table_config(name), source_dsn)
    if fallback:
        logger.warning("%s: %s", name, fallback)
    report = sync_table(source_dsn, warehouse_dsn, table)
    if fallback:
        report.notes.append(fallback)
    logger.info("%s", report.summary())
    return report


def sync_in_task(name: str, source_dsn: str, warehouse_dsn: str, context: Mapping[str, Any]) -> SyncReport:
    """`sync_configured_table` as an Airflow task runs it.

    Transient errors (a dropped connection, a concurrent run) propagate and Airflow retries them
    with backoff. Terminal ones (a missing table, a type conflict, a validation mismatch) fail the
    task at once: retrying cannot fix them, a person has to. A mismatch also sends an alert.
    """
    from airflow.sdk.exceptions import AirflowFailException

    try:
        return sync_configured_table(name, source_dsn, warehouse_dsn)
    except ValidationMismatchError as error:
        send_validation_alert(context, name, str(error))
        raise AirflowFailException(str(error)) from error
    except TerminalError as error:
        raise AirflowFailException(str(error)) from error


def asset_event_extra(report: SyncReport) -> dict[str, Any]:
    """What an operator wants to see on the raw table's Asset event."""
    data = report.to_dict()
    keys = ("mode", "rows_read", "rows_inserted", "rows_updated", "rows_deleted", "rows_replaced", "duration_s",
            "watermark_before", "watermark_after")  # fmt: skip
    extra = {key: data[key] for key in keys if key in data}
    # A CDC table's slot, and anything the run found worth saying (such as a slot found invalidated).
    extra.update({key: data[key] for key in ("slot_retained_wal_bytes", "slot_lag_bytes", "notes") if data.get(key)})
    validation = data.get("validation") or {}
    extra["validation_match"] = validation.get("match")
    return extra


# --- a large table: plan -> [hold_snapshot, copy_range x N] -> finish ---------------------------
#
# The plan travels between tasks as a list with one entry per key range (what `copy_range` is
# mapped over: Airflow maps only over a task's return value); each entry carries the whole plan.
# An empty list means no ranges: the mapped task is skipped and the finish step runs the normal sync.


def plan_ranges(name: str, source_dsn: str, warehouse_dsn: str) -> list[dict[str, Any]]:
    """Plan a large table's copy: one `{"index", "label", "plan"}` per key range."""
    table = table_config(name)
    plan = _step(name, warehouse_dsn, None, None, lambda: plan_parallel_copy(source_dsn, warehouse_dsn, table))
    return [{**part, "plan": plan} for part in plan["parts"]]


def _plan_of(name: str, parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    if parts:
        return dict(parts[0]["plan"])
    table = table_config(name)
    return {"run_key": "", "table": name, "target": table.target, "ranges": []}


def hold_snapshot_in_task(name: str, source_dsn: str, warehouse_dsn: str, parts: list[Mapping[str, Any]],
                          context: Mapping[str, Any], ranges_started: Callable[[], int] | None = None) -> str:
    """Hold the plan's source snapshot while the range tasks and the finish task run.

    `ranges_started` counts the plan's range tasks that have got a worker slot; until one has,
    the hold is bounded by RANGES_START_TIMEOUT (then the whole copy by HOLD_TIMEOUT). Without
    it (the ranges run in threads of this process) only HOLD_TIMEOUT bounds the hold.
    """
    plan = _plan_of(name, parts)

    def hold() -> str:
        return hold_snapshot(source_dsn, warehouse_dsn, table_config(name), plan,
                             timeout_s=HOLD_TIMEOUT.total_seconds())

    def give_up(error: SlotsExhaustedError) -> None:
        abandon_parallel_copy(warehouse_dsn, table_config(name), plan, str(error))

    if ranges_started is None:
        return _step(name, warehouse_dsn, plan, context, hold)
    return _step(name, warehouse_dsn, plan, context, lambda: hold_until_ranges_start(
        name, len(parts), hold, ranges_started, give_up, RANGES_START_TIMEOUT))


def hold_until_ranges_start(name: str, ranges: int, hold: Callable[[], str], ranges_started: Callable[[], int],
                            give_up: Callable[[SlotsExhaustedError], None], timeout: timedelta,
                            poll_s: float = 5.0) -> str:
    """Run `hold` (which blocks until the copy ends) and watch that a range starts within `timeout`.

    If none has, `give_up` releases the snapshot (so `hold` returns) and SlotsExhaustedError is raised.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hold_snapshot") as pool:
        holder = pool.submit(hold)
        deadline = time.monotonic() + timeout.total_seconds()
        while ranges and not holder.done():
            if ranges_started() > 0:
                break  # a range has a slot: the others follow as slots free up
            if time.monotonic() > deadline:
                error = SlotsExhaustedError(name, ranges, timeout)
                logger.error("%s", error)
                give_up(error)
                holder.result()
                raise error
            wait([holder], timeout=poll_s)
        return holder.result()


def copy_range_in_task(name: str, source_dsn: str, warehouse_dsn: str, part: Mapping[str, Any],
                       context: Mapping[str, Any]) -> dict[str, int]:
    """Copy one key range of the plan inside its snapshot."""
    plan = dict(part["plan"])
    return _step(name, warehouse_dsn, plan, context, lambda: copy_range(
        source_dsn, warehouse_dsn, table_config(name), plan, int(part["index"]),
        wait_s=SNAPSHOT_WAIT.total_seconds()))


def finish_in_task(name: str, source_dsn: str, warehouse_dsn: str, parts: list[Mapping[str, Any]],
                   context: Mapping[str, Any]) -> SyncReport:
    """Swap the staged rows into the raw table (or run the normal sync when the plan has no ranges)."""
    plan = _plan_of(name, parts)
    table = table_config(name)
    report = _step(name, warehouse_dsn, plan, context,
                   lambda: finish_parallel_copy(source_dsn, warehouse_dsn, table, plan))
    logger.info("%s", report.summary())
    return report


def _step(name: str, warehouse_dsn: str, plan: Mapping[str, Any] | None, context: Mapping[str, Any] | None,
          run: Callable[[], T]) -> T:
    """Run one step of a large table's copy with the ingestion's failure policy.

    Terminal errors fail the task without retrying (a validation mismatch also alerts). When a step
    fails for good (terminal, or its last try), the run is abandoned so the snapshot holder lets go
    at once instead of waiting for its timeout. A snapshot that is no longer held cannot come back:
    the message says to clear the table's task group from its plan task.
    """
    from airflow.sdk.exceptions import AirflowFailException

    try:
        return run()
    except SnapshotReleasedError as error:
        raise AirflowFailException(str(error)) from error
    except ValidationMismatchError as error:
        if context is not None:
            send_validation_alert(context, name, str(error))
        raise AirflowFailException(str(error)) from error
    except TerminalError as error:
        _abandon(name, warehouse_dsn, plan, context, str(error))
        raise AirflowFailException(str(error)) from error
    except Exception as error:
        if context is not None and _is_last_try(context):
            _abandon(name, warehouse_dsn, plan, context, str(error))
        raise


def _is_last_try(context: Mapping[str, Any]) -> bool:
    ti = context.get("ti")
    return ti is None or int(getattr(ti, "try_number", 1)) > int(getattr(ti, "max_tries", 0))


def _abandon(name: str, warehouse_dsn: str, plan: Mapping[str, Any] | None, context: Mapping[str, Any] | None,
             reason: str) -> None:
    if plan is None or not plan.get("ranges"):
        return
    task_id = getattr(context.get("ti"), "task_id", "a step") if context else "a step"
    abandon_parallel_copy(warehouse_dsn, table_config(name), plan, f"{task_id} failed: {reason}")


def ranges_started(ti: Any, range_task: str) -> Callable[[], int]:
    """How many of the holder's sibling range tasks (same group, same run) have got a worker slot,
    asked through the Task SDK (the task's own Execution API; no metadata database access)."""
    group = ti.task_id.rpartition(".")[0]
    task_id = f"{group}.{range_task}" if group else range_task

    def count() -> int:
        return int(ti.get_ti_count(dag_id=ti.dag_id, task_ids=[task_id], run_ids=[ti.run_id],
                                   states=list(STARTED_STATES)))

    return count
