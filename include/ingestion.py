"""The ingestion DAG's work, callable and testable without Airflow."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from include.alerts import send_validation_alert
from include.copy_engine import (
    SyncReport,
    TableConfig,
    TerminalError,
    ValidationMismatchError,
    load_config,
    sync_table,
)
from include.pipeline import TABLES_CONFIG

logger = logging.getLogger(__name__)


def configured_tables() -> list[TableConfig]:
    """The tables of include/config/tables.yml (read at DAG parse time: a small local file)."""
    return list(load_config(TABLES_CONFIG).tables)


def table_config(name: str) -> TableConfig:
    return load_config(TABLES_CONFIG).table(name)


def sync_configured_table(name: str, source_dsn: str, warehouse_dsn: str) -> SyncReport:
    """Copy one configured table into the warehouse and log its report's summary."""
    report = sync_table(source_dsn, warehouse_dsn, table_config(name))
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
    keys = ("mode", "rows_read", "rows_inserted", "rows_updated", "rows_deleted", "duration_s",
            "watermark_before", "watermark_after")  # fmt: skip
    extra = {key: data[key] for key in keys if key in data}
    validation = data.get("validation") or {}
    extra["validation_match"] = validation.get("match")
    return extra
