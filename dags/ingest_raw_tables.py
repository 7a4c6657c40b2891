"""
### Ingest raw tables

Copies every table listed in `include/config/tables.yml` from the **source** PostgreSQL
(`source_postgres`) into the **warehouse** (`warehouse_postgres`), schema `raw`, with the project's
copy engine (`include/copy_engine`): PostgreSQL `COPY` streaming, incremental upserts on a cursor
column, delete detection and checksum validation.

- `check_connections` fails first, with one clear message, when a database cannot be reached.
- `sync_table` is mapped: one task per table, named after it, limited by the `source_postgres` pool.
- A failure alerts through Slack and email when the `slack_alerts` / `smtp_alerts` connections
  exist (docs/alerts.md); a validation mismatch alerts too and fails without retrying.
- Each successful copy emits an event on its raw table's Asset, with the rows inserted, updated and
  deleted attached; `transform_dbt` is scheduled on those Assets.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import AssetAlias, dag, get_current_context, task

from include.ingestion import asset_event_extra, configured_tables, sync_in_task
from include.pipeline import (
    SOURCE_CONN_ID,
    SOURCE_POOL,
    WAREHOUSE_CONN_ID,
    check_database,
    database_dsn,
    task_defaults,
    warehouse_table_asset,
)

RAW_TABLES = AssetAlias("raw_tables")
TABLES = configured_tables()


@dag(
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    tags=["ingestion", "copy_engine"],
    doc_md=__doc__,
    default_args=task_defaults("data-platform", retries=3, max_retry_delay=timedelta(minutes=10)),
)
def ingest_raw_tables():
    @task
    def check_connections() -> list[str]:
        return [check_database(conn_id, database_dsn(conn_id)) for conn_id in (SOURCE_CONN_ID, WAREHOUSE_CONN_ID)]

    @task(pool=SOURCE_POOL, outlets=[RAW_TABLES], map_index_template="{{ table_name }}")
    def sync_table(table_name: str, *, outlet_events=None) -> dict:
        context = get_current_context()
        context["table_name"] = table_name
        report = sync_in_task(table_name, database_dsn(SOURCE_CONN_ID), database_dsn(WAREHOUSE_CONN_ID), context)
        target = next(t.target for t in TABLES if t.name == table_name)
        outlet_events[RAW_TABLES].add(warehouse_table_asset(target), extra=asset_event_extra(report))
        return report.to_dict()

    check_connections() >> sync_table.expand(table_name=[t.name for t in TABLES])


ingest_raw_tables()
