"""
### Transform with dbt

Runs the dbt project in `dbt/` against the warehouse (`warehouse_postgres`), rendered by
Astronomer Cosmos: every snapshot, model and test is its own task, layer by layer
(snapshots → staging → intermediate → marts).

**Scheduled on the raw tables' Assets**, all of them (`&`): the transform runs once every raw
table has been refreshed since its last run, so the marts never join a fresh table to a stale one,
and a table whose copy failed does not trigger it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, get_current_context, task
from cosmos import DbtTaskGroup

from include.dbt_config import execution_config, profile_config, project_config, render_config
from include.ingestion import configured_tables
from include.pipeline import describe_asset_events, task_defaults, warehouse_table_asset

RAW_ASSETS = [warehouse_table_asset(table.target) for table in configured_tables()]
LAYERS = {
    "snapshots": "path:snapshots",
    "staging": "path:models/staging",
    "intermediate": "path:models/intermediate",
    "marts": "path:models/marts",
}


def _all_of(assets):
    condition = assets[0]
    for asset in assets[1:]:
        condition = condition & asset
    return condition


@dag(
    schedule=_all_of(RAW_ASSETS),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    tags=["transform", "dbt", "cosmos"],
    doc_md=__doc__,
    default_args=task_defaults("analytics", retries=2, max_retry_delay=timedelta(minutes=5)),
)
def transform_dbt():
    @task
    def log_triggering_events() -> list[str]:
        """Say which raw-table events this run reacts to."""
        return describe_asset_events(get_current_context()["triggering_asset_events"])

    previous = log_triggering_events()
    for layer, selector in LAYERS.items():
        group = DbtTaskGroup(
            group_id=layer,
            project_config=project_config,
            profile_config=profile_config,
            execution_config=execution_config,
            render_config=render_config(selector),
        )
        previous >> group
        previous = group


transform_dbt()
