"""
### Corporate-action report (example consumer)

An example of a DAG downstream of dbt: Cosmos emits an Asset event for every dbt model it builds,
and this DAG is scheduled on the one of `marts.fact_events`. Each time the transform rebuilds the
fact table, it counts the live events per type, the starting point of a report or an export.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task

from include.pipeline import WAREHOUSE_CONN_ID, database_dsn, task_defaults, warehouse_table_asset
from include.reports import live_events_by_type

FACT_EVENTS = warehouse_table_asset("marts.fact_events")


@dag(
    schedule=[FACT_EVENTS],
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    tags=["consumer", "example"],
    doc_md=__doc__,
    default_args=task_defaults("analytics", retries=2, max_retry_delay=timedelta(minutes=5)),
)
def report_corporate_actions():
    @task
    def count_live_events_by_type() -> dict[str, int]:
        return live_events_by_type(database_dsn(WAREHOUSE_CONN_ID))

    count_live_events_by_type()


report_corporate_actions()
