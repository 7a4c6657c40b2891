"""Cosmos configuration, built once here so that DAG files only wire it.

The dbt project is loaded from `dbt/target/manifest.json` (LoadMode.DBT_MANIFEST): parsing a DAG
file runs no dbt. `make manifest` (part of `make run`, and of the Docker image build) writes it.

DBT_EXECUTION_MODE picks how Cosmos runs dbt; the README gives the measurements behind the default:
- `dbt_runner` (default): in the Airflow worker's own Python through dbt's `dbtRunner`;
- `virtualenv`: the `dbt` executable of a separate virtualenv (DBT_EXECUTABLE), as a subprocess;
- `watcher`: one `dbt build` per task group, with one sensor task per node watching its result.
"""

from __future__ import annotations

import os
import shutil

from cosmos import ExecutionConfig, ProfileConfig, ProjectConfig, RenderConfig
from cosmos.constants import ExecutionMode, InvocationMode, LoadMode, TestBehavior
from cosmos.profiles import PostgresUserPasswordProfileMapping

from include.pipeline import PROJECT_ROOT, WAREHOUSE_CONN_ID

DBT_PROJECT_DIR = PROJECT_ROOT / "dbt"
DBT_MANIFEST = DBT_PROJECT_DIR / "target" / "manifest.json"
DBT_PROJECT_NAME = "postgres_analytics"
EXECUTION_MODES = ("dbt_runner", "virtualenv", "watcher")

if not DBT_MANIFEST.exists():
    raise FileNotFoundError(
        f"The dbt manifest {DBT_MANIFEST} is missing: run `make manifest` "
        "(the Docker image builds it in its Dockerfile)."
    )

project_config = ProjectConfig(
    dbt_project_path=DBT_PROJECT_DIR,
    manifest_path=DBT_MANIFEST,
    project_name=DBT_PROJECT_NAME,
)

# Cosmos writes the profile from the Airflow connection at run time: no secret in the repository.
profile_config = ProfileConfig(
    profile_name="warehouse",
    target_name="airflow",
    profile_mapping=PostgresUserPasswordProfileMapping(
        conn_id=WAREHOUSE_CONN_ID,
        profile_args={"schema": "analytics", "threads": 4},
    ),
)


def _execution_config(mode: str) -> ExecutionConfig:
    if mode == "dbt_runner":
        return ExecutionConfig(execution_mode=ExecutionMode.LOCAL, invocation_mode=InvocationMode.DBT_RUNNER)
    if mode == "virtualenv":
        dbt = os.environ.get("DBT_EXECUTABLE") or shutil.which("dbt") or "dbt"
        return ExecutionConfig(
            execution_mode=ExecutionMode.LOCAL,
            invocation_mode=InvocationMode.SUBPROCESS,
            dbt_executable_path=dbt,
        )
    if mode == "watcher":
        return ExecutionConfig(execution_mode=ExecutionMode.WATCHER, invocation_mode=InvocationMode.DBT_RUNNER)
    raise ValueError(f"DBT_EXECUTION_MODE={mode!r}: choose one of {', '.join(EXECUTION_MODES)}")


DBT_EXECUTION_MODE = os.environ.get("DBT_EXECUTION_MODE", "dbt_runner")
execution_config = _execution_config(DBT_EXECUTION_MODE)


def render_config(*selectors: str) -> RenderConfig:
    """One layer of the project; each model runs as its own task followed by a task of its tests."""
    return RenderConfig(
        load_method=LoadMode.DBT_MANIFEST,
        select=list(selectors),
        test_behavior=TestBehavior.AFTER_EACH,
    )
