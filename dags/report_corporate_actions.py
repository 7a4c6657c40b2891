"""
### Corporate-action report (example consumer)

An example of a DAG downstream of dbt: Cosmos emits an Asset event for every dbt model it builds,
and this DAG is scheduled on the one of `marts.fact_events`. Each time the transform rebuilds the
fact table, it counts the live events per type, the starting point of a report or an export.
With a dbt project of your own that builds no `marts.fact_events`, the DAG is not defined at all.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task

from include.dbt_project import load_manifest, relation_in_manifest
from include.pipeline import WAREHOUSE_CONN_ID, database_dsn, task_defaults, warehouse_table_asset
from include.reports import live_events_by_type

FACT_EVENTS_TABLE = "marts.fact_events"
FACT_EVENTS = warehouse_table_asset(FACT_EVENTS_TABLE)


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


# Only with the demo's dbt project: a DAG waiting on a table nothing builds would wait for ever.
if relation_in_manifest(load_manifest(), FACT_EVENTS_TABLE):
    report_corporate_actions()
