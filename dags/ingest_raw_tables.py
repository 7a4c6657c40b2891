"""
### Ingest raw tables

Copies every table listed in `include/config/tables.yml` from the **source** PostgreSQL
(`source_postgres`) into the **warehouse** (`warehouse_postgres`), schema `raw`, with the project's
copy engine (`include/copy_engine`): PostgreSQL `COPY` streaming, incremental upserts on a cursor
column, delete detection and checksum validation.

- `check_connections` fails first, with one clear message, when a database cannot be reached.
- `sync_table` is mapped: one task per table, named after it, limited by the `source_postgres` pool.
- A large table (`parallel: N` in the configuration) gets its own task group `sync_<table>`:
  `plan` splits its key into N ranges; `hold_snapshot` exports one source snapshot and holds it;
  `copy_range` is mapped, one task per key range (named by the range), each reading that snapshot
  into a staging table; `finish` swaps the staged rows into the raw table in one transaction.
  An incremental table past its first load has no ranges: `copy_range` is skipped and `finish`
  runs the normal sync. `hold_snapshot` is outside the pool, so it never takes a slot that its
  ranges wait for; if none of its ranges gets a worker slot within 10 minutes (all taken, e.g. by
  other holders), it lets go and fails with a message saying how many slots to give the workers.
  To restart a failed large-table copy, clear its task group from `plan`.
- A failure alerts through Slack and email when the `slack_alerts` / `smtp_alerts` connections
  exist (docs/alerts.md); a validation mismatch alerts too and fails without retrying.
- Runs on `schedule:` of `include/config/tables.yml` (a cron expression or preset, `@daily` when
  unset); `make run` triggers it at once.
- Each successful copy emits an event on its raw table's Asset, with the rows inserted, updated and
  deleted attached; `transform_dbt` is scheduled on those Assets.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import AssetAlias, TaskGroup, TriggerRule, dag, get_current_context, task

from include.ingestion import (
    asset_event_extra,
    configured_tables,
    copy_range_in_task,
    finish_in_task,
    hold_snapshot_in_task,
    ingestion_schedule,
    is_large,
    plan_ranges,
    ranges_started,
    sync_in_task,
)
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
LARGE_TABLES = [t for t in TABLES if is_large(t)]


@dag(
    schedule=ingestion_schedule(),
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

    @task(pool=SOURCE_POOL)
    def plan(table_name: str) -> list[dict]:
        return plan_ranges(table_name, database_dsn(SOURCE_CONN_ID), database_dsn(WAREHOUSE_CONN_ID))

    # Outside the pool (it holds one idle transaction, not a copy), and weighted so the scheduler
    # queues it before the ranges that wait for its snapshot.
    @task(priority_weight=10)
    def hold_snapshot(table_name: str, parts: list[dict]) -> str:
        context = get_current_context()
        return hold_snapshot_in_task(table_name, database_dsn(SOURCE_CONN_ID), database_dsn(WAREHOUSE_CONN_ID),
                                     parts, context, ranges_started(context["ti"], "copy_range"))

    @task(pool=SOURCE_POOL, map_index_template="{{ key_range }}")
    def copy_range(table_name: str, part: dict) -> dict:
        context = get_current_context()
        context["key_range"] = part["label"]
        return copy_range_in_task(table_name, database_dsn(SOURCE_CONN_ID), database_dsn(WAREHOUSE_CONN_ID), part,
                                  context)

    # none_failed: runs when the ranges succeeded, and when they were skipped (no ranges to copy).
    @task(pool=SOURCE_POOL, outlets=[RAW_TABLES], trigger_rule=TriggerRule.NONE_FAILED)
    def finish(table_name: str, parts: list[dict], *, outlet_events=None) -> dict:
        context = get_current_context()
        report = finish_in_task(table_name, database_dsn(SOURCE_CONN_ID), database_dsn(WAREHOUSE_CONN_ID), parts,
                                context)
        target = next(t.target for t in TABLES if t.name == table_name)
        outlet_events[RAW_TABLES].add(warehouse_table_asset(target), extra=asset_event_extra(report))
        return report.to_dict()

    checked = check_connections()
    checked >> sync_table.expand(table_name=[t.name for t in TABLES if not is_large(t)])
    for table in LARGE_TABLES:
        with TaskGroup(group_id=f"sync_{table.name}"):
            parts = plan(table.name)
            hold_snapshot(table.name, parts)
            copy_range.partial(table_name=table.name).expand(part=parts) >> finish(table.name, parts)
        checked >> parts


ingest_raw_tables()
