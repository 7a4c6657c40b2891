"""The ingestion DAG's work, callable and testable without Airflow."""

from __future__ import annotations

import logging
from typing import Any

from include.copy_engine import SyncReport, TableConfig, load_config, sync_table
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


def asset_event_extra(report: SyncReport) -> dict[str, Any]:
    """What an operator wants to see on the raw table's Asset event."""
    data = report.to_dict()
    keys = ("mode", "rows_read", "rows_inserted", "rows_updated", "rows_deleted", "duration_s",
            "watermark_before", "watermark_after")  # fmt: skip
    extra = {key: data[key] for key in keys if key in data}
    validation = data.get("validation") or {}
    extra["validation_match"] = validation.get("match")
    return extra
