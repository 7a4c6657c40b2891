"""Cosmos configuration, built once here so that DAG files only wire it.

The dbt project is loaded from `dbt/target/manifest.json` (LoadMode.DBT_MANIFEST): parsing a DAG
file runs no dbt. `make manifest` (part of `make run`, and of the Docker image build) writes it.
Every task runs dbt in a temporary copy of the project, so no task ever rewrites that manifest;
the docs task publishes its own manifest, catalog and index into the dbt docs folder instead.

DBT_EXECUTION_MODE picks how Cosmos runs dbt (and DBT_TEST_BEHAVIOR how tests become tasks); the
README gives the measurements behind the defaults:
- `dbt_runner` (default): in the Airflow worker's own Python through dbt's `dbtRunner`;
- `virtualenv`: the `dbt` executable of a separate virtualenv (DBT_EXECUTABLE), as a subprocess;
- `watcher`: one `dbt build` per task group, with one sensor task per node watching its result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cosmos import ExecutionConfig, ProfileConfig, ProjectConfig, RenderConfig
from cosmos import settings as cosmos_settings
from cosmos.constants import ExecutionMode, InvocationMode, LoadMode, TestBehavior
from cosmos.operators.local import DbtDocsLocalOperator, DbtSourceLocalOperator
from cosmos.profiles import BaseProfileMapping

from include.dbt_project import (
    DBT_PROFILE,
    DBT_TARGET,
    DbtProjectProblem,
    dbt_project_dir,
    libpq_environment,
    load_manifest,
    manifest_path,
    profile_output,
)
from include.pipeline import WAREHOUSE_CONN_ID, database_dsn

DBT_PROJECT_DIR = dbt_project_dir()
DBT_MANIFEST = manifest_path(DBT_PROJECT_DIR)
MANIFEST = load_manifest(DBT_MANIFEST)  # raises, naming `make manifest`, when it is missing
DBT_PROJECT_NAME = MANIFEST["metadata"]["project_name"]
EXECUTION_MODES = ("dbt_runner", "virtualenv", "watcher")
# The key of this project in `[cosmos] dbt_docs_projects`: the Cosmos plugin serves its docs at
# /cosmos/<key>/dbt_docs_index.html, and the docs task writes into that entry's "dir".
DBT_DOCS_PROJECT = DBT_PROJECT_NAME
DBT_DOCS_FILES = ("manifest.json", "catalog.json", "index.html")  # index last: it loads the other two

logger = logging.getLogger(__name__)

project_config = ProjectConfig(
    dbt_project_path=DBT_PROJECT_DIR,
    manifest_path=DBT_MANIFEST,
    project_name=DBT_PROJECT_NAME,
)


class WarehouseProfileMapping(BaseProfileMapping):
    """The dbt profile of an Airflow Postgres connection, built from the DSN the copy engine uses.

    Cosmos' PostgresUserPasswordProfileMapping requires a password; this one passes on what the
    connection has (password or none, SSL files, `passfile`, options), so dbt authenticates exactly
    as the copy engine does. A connection that is missing or unusable is a configuration error: the
    task fails at once, without retries.
    """

    airflow_connection_type = "postgres"
    dbt_profile_type = "postgres"

    def _params(self) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException
        from psycopg.conninfo import conninfo_to_dict

        try:
            return conninfo_to_dict(database_dsn(self.conn_id))
        except Exception as error:  # a missing connection: AirflowNotFoundException, or a malformed one
            raise AirflowFailException(
                f"Airflow connection '{self.conn_id}' cannot be read ({type(error).__name__}: {error}); define it "
                f"in airflow_settings.yaml or as AIRFLOW_CONN_{self.conn_id.upper()}") from None

    @property
    def profile(self) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        try:
            return profile_output(self._params(), self.get_env_var_format("password"))
        except DbtProjectProblem as problem:
            raise AirflowFailException(f"Airflow connection '{self.conn_id}': {problem}") from None

    @property
    def env_vars(self) -> dict[str, str]:
        params = self._params()
        env = libpq_environment(params)
        if params.get("password"):
            env[self.get_env_var_name("password")] = str(params["password"])
        return env


# Cosmos writes the profile from the Airflow connection at run time: no secret in the repository.
profile_config = ProfileConfig(
    profile_name=DBT_PROFILE,
    target_name=DBT_TARGET,
    profile_mapping=WarehouseProfileMapping(conn_id=WAREHOUSE_CONN_ID),
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


# DBT_TEST_BEHAVIOR picks how dbt tests become tasks; the README gives the measurements behind the
# default. `after_each`: each model's tests are a task of their own, right after the model's task.
# `build`: one `dbt build` task per model runs the model and then its tests.
TEST_BEHAVIORS = ("after_each", "build")
DBT_TEST_BEHAVIOR = os.environ.get("DBT_TEST_BEHAVIOR", "after_each")
if DBT_TEST_BEHAVIOR not in TEST_BEHAVIORS:
    raise ValueError(f"DBT_TEST_BEHAVIOR={DBT_TEST_BEHAVIOR!r}: choose one of {', '.join(TEST_BEHAVIORS)}")


def render_config(*selectors: str) -> RenderConfig:
    """One layer of the project; each snapshot and model its own task, its tests as DBT_TEST_BEHAVIOR says."""
    return RenderConfig(
        load_method=LoadMode.DBT_MANIFEST,
        select=list(selectors),
        test_behavior=TestBehavior(DBT_TEST_BEHAVIOR),
    )


def _dbt_task_args(task_id: str) -> dict[str, Any]:
    """What Cosmos hands the tasks of its own task groups, for the tasks this project adds itself:
    the project, the profile, how dbt is invoked, and a partial-parse cache of the task's own."""
    return {
        "task_id": task_id,
        "project_dir": str(DBT_PROJECT_DIR),
        "profile_config": profile_config,
        "manifest_filepath": str(DBT_MANIFEST),
        "invocation_mode": execution_config.invocation_mode,
        "dbt_executable_path": str(execution_config.dbt_executable_path),
        "install_deps": False,
        "emit_datasets": False,
        "cache_dir": cosmos_settings.cache_dir / f"{DBT_PROJECT_NAME}__{task_id}",
    }


def log_stale_sources(context: Mapping[str, Any]) -> None:
    """dbt found a source past its `warn_after` but within its `error_after`: say so, and go on."""
    for name, message in zip(context.get("test_names") or [], context.get("test_results") or [], strict=False):
        logger.warning("source %s is stale (past warn_after, within error_after): %s", name, message)


def source_freshness_task(task_id: str = "source_freshness") -> DbtSourceLocalOperator:
    """`dbt source freshness` of the raw tables the snapshots read, both in one dbt invocation.

    dbt exits successfully when a source is only past `warn_after`, so the task succeeds with the
    warning in its log; past `error_after` dbt fails, the task fails, and nothing downstream runs.
    """
    return DbtSourceLocalOperator(
        select="source:raw", on_warning_callback=log_stale_sources, **_dbt_task_args(task_id)
    )


class DbtDocsNotConfigured(RuntimeError):
    """`[cosmos] dbt_docs_projects` has no folder for this project, so the docs have nowhere to go."""


def dbt_docs_location() -> tuple[str, str | None]:
    """The folder (or object-storage URL) and connection the Cosmos plugin serves this project's docs from."""
    from airflow.sdk.configuration import conf

    projects = json.loads(conf.get("cosmos", "dbt_docs_projects", fallback=None) or "{}")
    entry = projects.get(DBT_DOCS_PROJECT) or {}
    if not entry.get("dir"):
        raise DbtDocsNotConfigured(
            f"[cosmos] dbt_docs_projects has no 'dir' for '{DBT_DOCS_PROJECT}': set "
            "AIRFLOW__COSMOS__DBT_DOCS_PROJECTS (the local stack and the Dockerfile do)."
        )
    return str(entry["dir"]), entry.get("conn_id")


def publish_dbt_docs(project_dir: str, **_: Any) -> None:
    """Copy what `dbt docs generate` wrote in the task's temporary project into the docs folder.

    Each file is replaced in one rename, so the plugin serves either the old file or the new one.
    """
    generated = Path(project_dir) / "target"
    docs_dir, conn_id = dbt_docs_location()
    if "://" in docs_dir:
        from airflow.sdk import ObjectStoragePath

        remote = ObjectStoragePath(docs_dir, conn_id=conn_id)
        for name in DBT_DOCS_FILES:
            (remote / name).write_bytes((generated / name).read_bytes())
    else:
        folder = Path(docs_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name in DBT_DOCS_FILES:
            partial = folder / f".{name}.partial"
            shutil.copyfile(generated / name, partial)
            os.replace(partial, folder / name)
    logger.info("dbt docs published to %s (%s)", docs_dir, ", ".join(DBT_DOCS_FILES))


def dbt_docs_task(task_id: str = "dbt_docs") -> DbtDocsLocalOperator:
    """`dbt docs generate`, then publish the docs where the Cosmos dbt docs plugin serves them."""
    return DbtDocsLocalOperator(callback=publish_dbt_docs, **_dbt_task_args(task_id))
