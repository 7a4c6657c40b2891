"""
### Transform with dbt

Runs the dbt project in `dbt/` against the warehouse (`warehouse_postgres`), rendered by
Astronomer Cosmos: every snapshot, model and test is its own task, layer by layer
(snapshots → staging → intermediate → marts).

**Scheduled on the raw tables' Assets**, all of them: the transform runs once every raw table of
`include/config/tables.yml` has been refreshed since its last run, so the marts never join a fresh
table to a stale one, and a table whose copy failed does not trigger it. With no tables configured
(a dbt-only project) it runs on the file's `schedule:` instead.

**Source freshness first.** `source_freshness` runs `dbt source freshness` on the raw tables (the
newest `updated_at` / `changed_at` against the thresholds in `dbt/models/staging/_raw__sources.yml`).
A source past `warn_after` only warns: the task succeeds, its log names the stale source and the
transform goes on. A source past `error_after` fails the task, so the snapshots and everything after
them do not run on data that old; the run is marked failed and the failure alert names the task.

**dbt docs last.** `dbt_docs` runs `dbt docs generate` after the marts and publishes index, manifest
and catalog into the folder of `[cosmos] dbt_docs_projects`; the UI shows them under
*Browse → dbt Docs*. It writes in a temporary copy of the project, never into `dbt/target`, whose
manifest this DAG is rendered from.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, get_current_context, task
from cosmos import DbtTaskGroup

from include.dbt_config import (
    dbt_docs_task,
    execution_config,
    profile_config,
    project_config,
    render_config,
    source_freshness_task,
)
from include.ingestion import transform_schedule
from include.pipeline import describe_asset_events, task_defaults

LAYERS = {
    "snapshots": "path:snapshots",
    "staging": "path:models/staging",
    "intermediate": "path:models/intermediate",
    "marts": "path:models/marts",
}


@dag(
    schedule=transform_schedule(),
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

    # Only informative: it runs beside the dbt tasks rather than as a step before them.
    log_triggering_events()
    previous = source_freshness_task()
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
    previous >> dbt_docs_task()


transform_dbt()
