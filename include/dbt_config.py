"""Cosmos configuration, built once here so that DAG files only wire it.

The dbt project is loaded from `dbt/target/manifest.json` (LoadMode.DBT_MANIFEST): parsing a DAG
file runs no dbt. `make manifest` (part of `make run`, and of the Docker image build) writes it.
Every task runs dbt in a temporary copy of the project, so no task ever rewrites that manifest;
the docs task publishes its own manifest, catalog and index into the dbt docs folder instead.

The whole project is one task group, grouped by folder, ordered by dbt's own graph: nothing here
names a folder, a layer or a source. DBT_EXECUTION_MODE picks how Cosmos runs dbt (and
DBT_TEST_BEHAVIOR how tests become tasks); the README gives the measurements behind the default:
- `watcher` (default): one `dbt build` of the whole project in a producer task (source freshness
  first, when the project has sources with a freshness threshold), and one sensor task per node
  that reports that node's own dbt result; a cleared or retried node task runs dbt for that node alone;
- `dbt_runner`: one dbt invocation per node, in the Airflow worker's own Python (dbt's `dbtRunner`);
- `virtualenv`: the same through the `dbt` executable of a separate virtualenv (DBT_EXECUTABLE).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cosmos import DbtTaskGroup, ExecutionConfig, ProfileConfig, ProjectConfig, RenderConfig
from cosmos import settings as cosmos_settings
from cosmos.constants import ExecutionMode, InvocationMode, LoadMode, SourceRenderingBehavior, TestBehavior
from cosmos.dbt.selector import select_nodes
from cosmos.operators._watcher.base import BaseConsumerSensor
from cosmos.operators.local import DbtDocsLocalOperator
from cosmos.operators.watcher import DbtProducerWatcherOperator
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
from include.dbt_watcher import (
    DBT_SUCCESS_STATUSES,
    dbt_result_line,
    defer_to_node_result_trigger,
    emit_built_assets,
    node_events,
    queue_xcom_pushes,
    say_what_dbt_found,
    start_in_triggerer,
)
from include.pipeline import WAREHOUSE_CONN_ID, database_dsn

DBT_PROJECT_DIR = dbt_project_dir()
DBT_MANIFEST = manifest_path(DBT_PROJECT_DIR)
MANIFEST = load_manifest(DBT_MANIFEST)  # raises, naming `make manifest`, when it is missing
DBT_PROJECT_NAME = MANIFEST["metadata"]["project_name"]
EXECUTION_MODES = ("watcher", "dbt_runner", "virtualenv")
# The key of this project in `[cosmos] dbt_docs_projects`: the Cosmos plugin serves its docs at
# /cosmos/<key>/dbt_docs_index.html, and the docs task writes into that entry's "dir".
DBT_DOCS_PROJECT = DBT_PROJECT_NAME
DBT_DOCS_FILES = ("manifest.json", "catalog.json", "index.html")  # index last: it loads the other two

logger = logging.getLogger(__name__)

project_config = ProjectConfig(
    dbt_project_path=DBT_PROJECT_DIR,
    manifest_path=DBT_MANIFEST,
    project_name=DBT_PROJECT_NAME,
    # No `dbt deps` at run time: the hub is out of reach for many deployments.
    install_dbt_deps=False,
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


class DbtSelectionError(ValueError):
    """A setting selects dbt nodes that the manifest does not have."""


def manifest() -> dict[str, Any]:
    """The parsed manifest of the dbt project (dbt/, or DBT_PROJECT_DIR), read once per process."""
    return MANIFEST


def _has_freshness(source: Mapping[str, Any]) -> bool:
    freshness = source.get("freshness") or {}
    return any((freshness.get(level) or {}).get("count") for level in ("warn_after", "error_after"))


def sources_with_freshness() -> list[str]:
    """The project's sources that declare a `warn_after` or `error_after`, as dbt unique ids."""
    return sorted(uid for uid, source in manifest()["sources"].items() if _has_freshness(source))


def final_model_tables() -> list[str]:
    """`schema.table` of every model that no other model reads: the project's end products.

    Cosmos emits an Asset event for each model it builds; these are the ones a DAG that follows a
    whole transform run (the docs) is scheduled on.
    """
    nodes = manifest()["nodes"]
    models = {uid: node for uid, node in nodes.items() if node["resource_type"] == "model"}
    read = {parent for node in models.values() for parent in node["depends_on"]["nodes"]}
    return sorted(f"{node['schema']}.{node['alias']}" for uid, node in models.items() if uid not in read)


def skip_what_reads_sources_past_error_after(
    context: Any, dag: Any, task_group: Any, nodes: Mapping[str, Any] | None, sources_json: Mapping[str, Any] | None
) -> list[tuple[str, str]]:
    """The watcher producer's freshness rule, as the separate freshness task had it: a source past
    `error_after` stops every node that reads only stale sources (or nodes so stopped); a source past
    `warn_after` only warns (Cosmos' default would skip on a warning too)."""
    stale = {
        result["unique_id"]
        for result in (sources_json or {}).get("results", [])
        if result.get("status") == "error"
    }
    for result in (sources_json or {}).get("results", []):
        if result.get("status") == "warn":
            logger.warning("source %s is stale (past warn_after, within error_after)", result["unique_id"])
    if not stale or not nodes:
        return []
    stopped: set[str] = set()
    changed = True
    while changed:
        changed = False
        for uid, node in nodes.items():
            if uid in stopped or node.resource_type.value not in ("model", "seed", "snapshot"):
                continue
            if node.depends_on and all(parent in stale or parent in stopped for parent in node.depends_on):
                stopped.add(uid)
                changed = True
    logger.error("sources past error_after: %s; not run: %s", sorted(stale), sorted(stopped))
    return [(uid, "skipped") for uid in sorted(stopped)]


def _execution_config(mode: str) -> ExecutionConfig:
    if mode == "watcher":
        return ExecutionConfig(
            execution_mode=ExecutionMode.WATCHER,
            invocation_mode=InvocationMode.DBT_RUNNER,
            setup_operator_args={"freshness_callback": skip_what_reads_sources_past_error_after},
        )
    if mode == "dbt_runner":
        return ExecutionConfig(execution_mode=ExecutionMode.LOCAL, invocation_mode=InvocationMode.DBT_RUNNER)
    if mode == "virtualenv":
        dbt = os.environ.get("DBT_EXECUTABLE") or shutil.which("dbt") or "dbt"
        return ExecutionConfig(
            execution_mode=ExecutionMode.LOCAL,
            invocation_mode=InvocationMode.SUBPROCESS,
            dbt_executable_path=dbt,
        )
    raise ValueError(f"DBT_EXECUTION_MODE={mode!r}: choose one of {', '.join(EXECUTION_MODES)}")


DBT_EXECUTION_MODE = os.environ.get("DBT_EXECUTION_MODE", "watcher")
execution_config = _execution_config(DBT_EXECUTION_MODE)


# DBT_TEST_BEHAVIOR picks how dbt tests become tasks. `after_each`: each model's tests are a task of
# their own, right after the model's task. `build` (not in watcher mode, whose producer already runs
# one `dbt build`): one `dbt build` task per model runs the model and then its tests.
TEST_BEHAVIORS = ("after_each", "build")
DBT_TEST_BEHAVIOR = os.environ.get("DBT_TEST_BEHAVIOR", "after_each")
if DBT_TEST_BEHAVIOR not in TEST_BEHAVIORS:
    raise ValueError(f"DBT_TEST_BEHAVIOR={DBT_TEST_BEHAVIOR!r}: choose one of {', '.join(TEST_BEHAVIORS)}")
if DBT_TEST_BEHAVIOR == "build" and DBT_EXECUTION_MODE == "watcher":
    raise ValueError(
        "DBT_TEST_BEHAVIOR=build needs DBT_EXECUTION_MODE=dbt_runner or virtualenv: in watcher mode the "
        "producer already runs the whole project as one `dbt build`"
    )

# Each node's task asks for its node's result every second (Cosmos' default, every 10 s, adds
# seconds to every step of the chain). DBT_WATCHER_TASKS says where a task waits for a node the
# build has not reached yet: `triggerer` (default): it starts in the triggerer (`start_from_trigger`),
# which ends it there when its node succeeded: no worker process unless it fails or is retried
# (include/dbt_watcher.py); `deferred`: it starts in a worker, which ends it when its node is done
# already, else defers to the triggerer; `worker`: in its own worker process, polling. The README
# compares the three.
WATCHER_TASK_PLACES = ("triggerer", "deferred", "worker")
DBT_WATCHER_TASKS = os.environ.get("DBT_WATCHER_TASKS", "triggerer")
if DBT_WATCHER_TASKS not in WATCHER_TASK_PLACES:
    raise ValueError(f"DBT_WATCHER_TASKS={DBT_WATCHER_TASKS!r}: choose one of {', '.join(WATCHER_TASK_PLACES)}")
WATCHER_SENSOR_ARGS = {"poke_interval": 1, "deferrable": DBT_WATCHER_TASKS != "worker"}


def render_config() -> RenderConfig:
    """The whole project, grouped by folder; sources with a freshness threshold checked first."""
    freshness = SourceRenderingBehavior.WITH_TESTS_OR_FRESHNESS if sources_with_freshness() else (
        SourceRenderingBehavior.NONE
    )
    return RenderConfig(
        load_method=LoadMode.DBT_MANIFEST,
        test_behavior=TestBehavior(DBT_TEST_BEHAVIOR),
        group_nodes_by_folder=True,
        source_rendering_behavior=freshness,
    )


@functools.cache
def _ancestors() -> dict[str, frozenset[str]]:
    """Every node's upstream nodes, all the way up, from the manifest's parent map."""
    parents_of = manifest().get("parent_map", {})
    found: dict[str, frozenset[str]] = {}

    def up(uid: str) -> frozenset[str]:
        if uid not in found:
            found[uid] = frozenset()  # a cycle (none in dbt) would stop here
            direct = set(parents_of.get(uid, []))
            found[uid] = frozenset(direct.union(*(up(parent) for parent in direct)))
        return found[uid]

    return {uid: up(uid) for uid in parents_of}


def test_owners(test: Mapping[str, Any]) -> list[str]:
    """The nodes a test's results count for: of its parents, those no other parent reads.

    A `relationships` test on fact_events that refers to dim_securities checks fact_events: counted
    under dim_securities too (Cosmos' rule), it kept dim_securities' test task waiting for the facts,
    and failed it when the facts were skipped for another model's failure. A test whose parents do
    not read each other counts for the model it is defined on, else for each of them.
    """
    parents = list(dict.fromkeys(test["depends_on"]["nodes"]))
    ancestors = _ancestors()
    owners = [p for p in parents if not any(p in ancestors.get(other, ()) for other in parents if other != p)]
    if len(owners) > 1 and test.get("attached_node") in owners:
        return [test["attached_node"]]
    return owners or parents


@functools.cache
def _tests_by_node() -> dict[str, list[str]]:
    """Each node's tests (`test_owners`), from the manifest, built once per process (not once per test task)."""
    tests: dict[str, list[str]] = {}
    for uid, node in sorted(manifest()["nodes"].items()):
        if node["resource_type"] == "test":
            for owner in test_owners(node):
                tests.setdefault(owner, []).append(uid)
    return tests


def count_tests_for_their_owners(producer: DbtProducerWatcherOperator) -> None:
    """The producer reports a model's tests as done when those `test_owners` gives it are."""
    owned = _tests_by_node()
    producer.tests_per_model = {model: [t for t in tests if t in owned.get(model, [])]
                                for model, tests in producer.tests_per_model.items()}  # fmt: skip


def _watched_nodes(task: Any) -> list[str]:
    """The dbt nodes whose results a watcher task's log shows: a model's tests, or its own node."""
    unique_id = task.model_unique_id
    return _tests_by_node().get(unique_id, []) if getattr(task, "is_test_sensor", False) else [unique_id]


def _log_dbt_results(context: Mapping[str, Any], succeeded: bool) -> None:
    task = context["task"]
    producer = getattr(task, "producer_task_id", None)
    if not getattr(task, "model_unique_id", None) or not producer:
        return
    for uid, event in node_events(context["ti"], producer, _watched_nodes(task)).items():
        status = event.get("status")
        if succeeded and status not in DBT_SUCCESS_STATUSES:
            # The task succeeded although the build's result was not a success: it ran dbt for its
            # node itself (a retry or a cleared task), and that run's output is in this log above.
            logger.info("dbt result of %s: run again in this task (the build's result was %s)", uid, status)
            continue
        logger.info("%s", dbt_result_line(uid, event))


def wait_in_triggerer(group: DbtTaskGroup) -> list[str]:
    """Make every watcher node task of the group wait in the triggerer (include/dbt_watcher.py),
    and add the task that emits the Asset events of what the build made, right after the producer.

    Returns the ids of the node tasks changed.
    """
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import AssetAlias

    changed, built_nodes, producer = [], [], None
    for task in list(group.iter_tasks()):
        if not isinstance(task, BaseConsumerSensor) or not task.model_unique_id:
            continue
        producer = group.dag.get_task(task.producer_task_id)
        if not task.is_test_sensor:
            built_nodes.append(task.model_unique_id)
        defer_to_node_result_trigger(task, _watched_nodes(task))
        if DBT_WATCHER_TASKS == "triggerer":
            start_in_triggerer(task, _watched_nodes(task))
        task.emit_datasets = False  # a task ended in the triggerer emits nothing: emit_built_assets does
        changed.append(task.task_id)
    if producer is not None:
        alias = f"{group.dag.dag_id}__{group.group_id}__built_assets"
        producer >> PythonOperator(
            task_id="emit_built_assets",
            task_group=group,
            python_callable=emit_built_assets,
            op_kwargs={"alias": alias, "producer_task_id": producer.task_id, "unique_ids": sorted(built_nodes)},
            outlets=[AssetAlias(alias)],
            trigger_rule="all_done",  # a failed node fails the build; the nodes it made still get their event
        )
    return changed


def log_dbt_result(context: Mapping[str, Any], *_: Any) -> None:
    """Write this node's own dbt result into its task's log, from what the watcher producer published.

    Cosmos' sensors log a node's dbt message only when it failed; an operator reading a node's task
    log should see its status, timing and dbt's message (rows, the failing rows of a test) either way.
    The node's compiled SQL is in the task's *Rendered Template* (`compiled_sql`).
    """
    _log_dbt_results(context, succeeded=True)


def log_dbt_failure(context: Mapping[str, Any]) -> None:
    """On failure, before the alert: every watched node's result as the build reported it."""
    _log_dbt_results(context, succeeded=False)


def operator_args() -> dict[str, Any]:
    """What every task of the group gets: the watcher's sensors their poke settings, and a log line
    with their node's dbt result (on failure before the alert)."""
    from include.alerts import failure_callbacks

    args: dict[str, Any] = {}
    if DBT_EXECUTION_MODE == "watcher":
        args.update(WATCHER_SENSOR_ARGS)
        args["post_execute"] = log_dbt_result
        args["on_failure_callback"] = [log_dbt_failure, *failure_callbacks()]
    return args


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


# DBT_SELECT: dbt selectors (space-separated) to render part of the project; empty for all of it.
DBT_SELECT = os.environ.get("DBT_SELECT", "").split()


def transform_task_group(group_id: str = "dbt", select: list[str] | None = None) -> DbtTaskGroup:
    """The dbt project as one Cosmos task group (in watcher mode, one `dbt build` for all of it).

    Raises DbtSelectionError, at DAG parse time, when a selector matches no node: Cosmos would
    otherwise render an empty group and log only "Total filtered nodes: 0".
    """
    select = DBT_SELECT if select is None else select
    config = render_config()
    config.select = list(select)
    group = DbtTaskGroup(
        group_id=group_id,
        project_config=project_config,
        profile_config=profile_config,
        execution_config=execution_config,
        render_config=config,
        operator_args=operator_args(),
        on_warning_callback=log_stale_sources,
    )
    graph = group.dbt_graph
    empty = [selector for selector in select if not select_nodes(DBT_PROJECT_DIR, graph.nodes, select=[selector])]
    if empty or not graph.filtered_nodes:
        what = f"selector {', '.join(map(repr, empty))}" if empty else "the whole project"
        raise DbtSelectionError(
            f"{what} matches no node of the dbt project {DBT_PROJECT_NAME} in {DBT_MANIFEST}: "
            "fix the selector (DBT_SELECT, dbt's syntax as Cosmos reads it: `source:<source>.<table>`) "
            "or run `make manifest` after changing dbt/"
        )
    if DBT_EXECUTION_MODE == "watcher":
        for task in group.iter_tasks():
            if isinstance(task, DbtProducerWatcherOperator):
                # Node tasks in the triggerer read the published results; a worker reads a node's own keys.
                queue_xcom_pushes(task, successes_published_only=DBT_WATCHER_TASKS == "triggerer")
                count_tests_for_their_owners(task)
            elif isinstance(task, BaseConsumerSensor) and task.model_unique_id:
                say_what_dbt_found(task, _watched_nodes(task))
        if DBT_WATCHER_TASKS != "worker":
            wait_in_triggerer(group)
    return group


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
