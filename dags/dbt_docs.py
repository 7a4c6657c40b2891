"""
### dbt docs

Generates the dbt project's documentation (`dbt docs generate`: index, manifest and the catalog
read from the warehouse) and publishes it where Cosmos' plugin serves it, *Browse → dbt Docs*.

**Scheduled on the Assets of the project's final models** (those no other model reads), all of
them: Cosmos emits one for each model `transform_dbt` builds, so the docs follow every complete
transform run without sitting on its path to the marts. A run whose final models did not all
build leaves the previous docs in place.

The task writes in a temporary copy of the project, never into `dbt/target`, whose manifest the
transform DAG is rendered from.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag

from include.dbt_config import dbt_docs_task, final_model_tables
from include.pipeline import task_defaults, warehouse_table_asset


@dag(
    schedule=[warehouse_table_asset(table) for table in final_model_tables()],
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    tags=["transform", "dbt", "docs"],
    doc_md=__doc__,
    default_args=task_defaults("analytics", retries=2, max_retry_delay=timedelta(minutes=5)),
)
def dbt_docs():
    dbt_docs_task()


dbt_docs()
