"""`make run`: set everything up, run ingestion, wait for the Asset-triggered transform, summarise."""

from __future__ import annotations

import fcntl
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from include import dbt_project
from include.local_stack import airflow, celery, preflight
from include.local_stack.failures import first_failure, task_label
from include.local_stack.postgres import EmbeddedPostgres, create_database
from include.local_stack.settings import (
    SOURCE_CONN_ID,
    WAREHOUSE_CONN_ID,
    StackError,
    StackSettings,
    load_airflow_settings,
    mask_password,
)

logger = logging.getLogger(__name__)

INGEST_DAG = "ingest_raw_tables"
TRANSFORM_DAG = "transform_dbt"
# The demo's source tables: `make run` generates them when the table configuration copies them.
DEMO_SOURCES = ("public.stock_master", "public.edi_690")


@contextmanager
def exclusive(settings: StackSettings) -> Iterator[None]:
    """One `make run` (or `make stop`) at a time per data folder."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with (settings.data_dir / "stack.lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(
                "Another `make run` or `make stop` is working on this project right now; "
                "wait for it to finish (the running Airflow is left alone)."
            ) from None
        yield


def embedded_postgres(settings: StackSettings) -> EmbeddedPostgres:
    return EmbeddedPostgres(settings.pgdata, settings.postgres_port, password=settings.secret("postgres_password"))


def start_databases(settings: StackSettings) -> None:
    """The embedded server (always: it holds Airflow's metadata) and the project's databases."""
    server = embedded_postgres(settings)
    if server.is_running() and server.setting("wal_level") != "logical":
        # Started by an earlier version of the project; CDC needs a restart (Airflow uses the server).
        logger.warning("restarting the embedded PostgreSQL with wal_level = logical (for mode cdc)")
        airflow.stop(settings)
        server.stop()
    server.start()
    create_database(server.dsn(), "airflow")
    for conn_id in (SOURCE_CONN_ID, WAREHOUSE_CONN_ID):
        url = settings.database_url(conn_id)
        if settings.uses_embedded(conn_id):
            create_database(server.dsn(), psycopg.conninfo.conninfo_to_dict(url)["dbname"])
        else:
            try:
                with psycopg.connect(url, connect_timeout=10):
                    pass
            except psycopg.OperationalError as error:
                variable = "SOURCE_DATABASE_URL" if conn_id == SOURCE_CONN_ID else "WAREHOUSE_DATABASE_URL"
                raise StackError(
                    f"Connection '{conn_id}' ({mask_password(url)}, from {variable}) cannot be reached: "
                    f"{str(error).strip().splitlines()[-1]}. Fix {variable} or unset it to use the "
                    "embedded PostgreSQL."
                ) from None


def demo_in_use() -> bool:
    """The table configuration copies the demo's source tables (the template's default content)."""
    from include.copy_engine import load_config
    from include.pipeline import tables_config_path

    return set(DEMO_SOURCES) <= {table.source for table in load_config(tables_config_path()).tables}


def ensure_demo_data(settings: StackSettings) -> dict[str, Any] | None:
    """Generate the demo source tables the first time; later runs copy what is there.

    Only while the table configuration copies the demo's tables: a source of your own is never written to.
    """
    from include.demo_data import ensure_exchanges, generate

    if not demo_in_use():
        return None
    url = settings.database_url(SOURCE_CONN_ID)
    with psycopg.connect(url) as conn:
        present = conn.execute("select to_regclass('public.stock_master') is not null").fetchone()[0]
    if present:
        if ensure_exchanges(url):  # a demo source made before the venues existed
            return {"exchanges": "created"}
        return None
    # Anchored to the wall clock, so that dbt's source freshness reflects this run.
    return generate(
        url,
        securities=settings.demo_securities,
        events=settings.demo_events,
        seed=settings.demo_seed,
        now=datetime.now(UTC),
    )


def build_manifest(settings: StackSettings) -> Path:
    """`dbt parse` of the stack's dbt project, for the stack's warehouse (skipped when current)."""
    try:
        return dbt_project.build_manifest(settings.database_url(WAREHOUSE_CONN_ID), settings.dbt_project_dir)
    except dbt_project.DbtProjectProblem as problem:
        raise StackError(str(problem)) from None


def check_before_airflow(settings: StackSettings) -> None:
    """dbt reaches the warehouse with the profile the tasks will build, and every DAG file imports."""

    def dbt_connects() -> None:
        url = settings.database_url(WAREHOUSE_CONN_ID)
        try:
            dbt_project.check_dbt_connection(url, settings.dbt_project_dir)
        except dbt_project.DbtProjectProblem as problem:
            embedded = settings.uses_embedded(WAREHOUSE_CONN_ID)
            variable = "the embedded server" if embedded else "WAREHOUSE_DATABASE_URL"
            raise StackError(f"Connection '{WAREHOUSE_CONN_ID}' ({mask_password(url)}, from {variable}): {problem}. "
                             "Fix the URL (user, password, sslmode, certificates) and run again.") from None

    preflight.run_together(
        dbt_connects, lambda: preflight.check_dag_files(airflow.airflow_environment(settings), settings.root / "dags"))


def check_broker(settings: StackSettings) -> None:
    """On the CeleryExecutor, the broker must answer before anything starts."""
    if settings.celery is not None:
        try:
            celery.check_broker(settings.celery)
        except celery.CeleryStackError as error:
            raise StackError(str(error)) from None


def start_airflow(settings: StackSettings) -> airflow.AirflowClient:
    """Start Airflow, or reuse the running one; restart it when the project or its settings changed."""
    run_dir = settings.airflow_home / "run"
    current = preflight.fingerprint(airflow.airflow_environment(settings), settings.root)
    if airflow.running_components(settings):
        changed = preflight.changed_since_start(run_dir, current)
        if changed:
            logger.warning("restarting the running Airflow: changed since it started: %s", ", ".join(changed))
            airflow.stop(settings)
    if not airflow.running_components(settings):
        airflow.migrate_database(settings)
    airflow.start(settings)
    preflight.record_fingerprint(run_dir, current)
    client = airflow.wait_until_healthy(settings)
    apply_pools_and_variables(client)
    return client


def apply_pools_and_variables(client: airflow.AirflowClient) -> None:
    """The pools and variables of airflow_settings.yaml, as `astro dev start` would load them."""
    declared = load_airflow_settings()
    for pool in declared["pools"]:
        name, slots, description = pool["pool_name"], int(pool["pool_slot"]), pool.get("pool_description") or ""
        try:
            body = {"pool": name, "slots": slots, "description": description, "include_deferred": False}
            client.patch(f"/api/v2/pools/{name}", body)
        except airflow.AirflowAPIError as error:
            if error.status != 404:
                raise
            client.post("/api/v2/pools", {"name": name, "slots": slots, "description": description})
    for variable in declared["variables"]:
        body = {"key": variable["variable_name"], "value": str(variable.get("variable_value") or "")}
        try:
            client.patch(f"/api/v2/variables/{variable['variable_name']}", body)
        except airflow.AirflowAPIError as error:
            if error.status != 404:
                raise
            client.post("/api/v2/variables", body)


@dataclass
class PipelineRun:
    """What one `make run` did, for the summary and for the end-to-end tests."""

    ingest: dict[str, Any]
    transform: dict[str, Any]
    tables: dict[str, dict[str, Any]]
    task_states: dict[str, Counter[str]] = field(default_factory=dict)
    seconds: float = 0.0


def trigger_pipeline(client: airflow.AirflowClient, timeout: float = 900, logs: Path | None = None,
                     *, ingest: bool = True) -> PipelineRun:
    """Trigger ingestion by hand; the transform must follow from the Asset events alone.

    With no tables to copy (`ingest=False`, a dbt-only project) the transform is triggered by hand.
    """
    started = time.monotonic()
    airflow.wait_for_dags(client, [INGEST_DAG, TRANSFORM_DAG] if ingest else [TRANSFORM_DAG])
    known_transforms = {r["dag_run_id"] for r in airflow.dag_runs(client, TRANSFORM_DAG)}
    run_id = f"make_run__{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
    if ingest:
        client.post(f"/api/v2/dags/{INGEST_DAG}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
        ingest_run = airflow.wait_for_run(client, INGEST_DAG, run_id, timeout)
        if ingest_run["state"] != "success":
            raise StackError(f"Ingestion run {run_id} failed: {failed_tasks(client, INGEST_DAG, run_id, logs)}")
        transform = airflow.wait_for_new_run(
            client, TRANSFORM_DAG, known_transforms, "asset_triggered", timeout - (time.monotonic() - started)
        )
    else:
        ingest_run = {"dag_run_id": None, "state": "skipped", "run_type": "none"}
        client.post(f"/api/v2/dags/{TRANSFORM_DAG}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
        transform = airflow.wait_for_run(client, TRANSFORM_DAG, run_id, timeout)
    ingest = ingest_run
    tables = {}
    if ingest["dag_run_id"]:
        events = client.get(f"/api/v2/assets/events?source_dag_id={INGEST_DAG}&source_run_id={run_id}&limit=100")
        tables = {event["uri"]: event.get("extra") or {} for event in events["asset_events"]}
    run = PipelineRun(ingest=ingest, transform=transform, tables=tables, seconds=time.monotonic() - started)
    for dag_id, dag_run in ((INGEST_DAG, ingest), (TRANSFORM_DAG, transform)):
        if not dag_run["dag_run_id"]:
            continue
        run.task_states[dag_id] = Counter(
            ti["state"] for ti in airflow.task_instances(client, dag_id, dag_run["dag_run_id"])
        )
    if transform["state"] != "success":
        raise StackError(
            f"The transform run {transform['dag_run_id']} failed: "
            f"{failed_tasks(client, TRANSFORM_DAG, transform['dag_run_id'], logs)}"
        )
    return run


__all__ = ["StackError", "task_label"]


def failed_tasks(client: airflow.AirflowClient, dag_id: str, run_id: str, logs: Path | None = None) -> str:
    """The failed tasks, then the first failure's cause (task, error class and message, log path)."""
    instances = list(airflow.task_instances(client, dag_id, run_id))
    failed = [task_label(ti) for ti in instances if ti["state"] in ("failed", "upstream_failed")]
    text = ", ".join(failed) or "no failed task recorded"
    if logs is not None and failed:
        text += "\n  " + first_failure(logs, instances)
    return text


def dbt_task_counts(manifest: dict[str, Any], task_instances: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """Per node type, the states of the tasks that ran the manifest's seeds, snapshots and models,
    and (under `test`) the states of the tasks that ran their tests."""
    counts: dict[str, Counter[str]] = {kind: Counter() for kind in dbt_project.NODE_TYPES}
    nodes = dbt_project.task_nodes(manifest, [ti["task_id"] for ti in task_instances])
    for ti in task_instances:
        found = nodes.get(ti["task_id"])
        if found:
            counts[found[1]][ti["state"]] += 1
    return counts


# The last part of the task id of a task Cosmos renders for a dbt node (`<node>.run`, or `<node>_run`
# for a node without tests); a node's tests are `<node>.test` (or `<name>_test` when detached).
DBT_NODE_TASK_KINDS = ("run", "snapshot", "seed", "source", "build")


def dbt_task_kind(task_id: str) -> str | None:
    """"tests" for a task of dbt tests, "nodes" for a task of one dbt node, None for any other task
    (the watcher's producer, its done marker, log_triggering_events)."""
    last = task_id.rsplit(".", 1)[-1]
    if last == "test" or last.endswith("_test"):
        return "tests"
    if last in DBT_NODE_TASK_KINDS or last.endswith(tuple(f"_{kind}" for kind in DBT_NODE_TASK_KINDS)):
        return "nodes"
    return None


# A CDC run's changes have no source snapshot to compare with: not validated (its first load is).
_VALIDATION = {True: "validation ok", False: "validation MISMATCH", None: "not validated"}


def table_line(uri: str, extra: dict) -> str:
    """One copied table in the summary, from its Asset event's extra (the run report)."""
    table = "/".join(uri.split("/")[-2:]).replace("/", ".")
    match = extra.get("validation_match")
    return (
        f"    {table:<24} {extra.get('mode', ''):<12} read {extra.get('rows_read', '?'):>8}  "
        f"+{extra.get('rows_inserted', '?')} ~{extra.get('rows_updated', '?')} -{extra.get('rows_deleted', '?')}"
        f"  {_VALIDATION.get(match, f'validation {match}')}"
    )


def summary(settings: StackSettings, client: airflow.AirflowClient, run: PipelineRun, total_seconds: float) -> str:
    manifest = dbt_project.load_manifest(dbt_project.manifest_path(settings.dbt_project_dir))
    in_manifest = dbt_project.node_counts(manifest)
    ran = dbt_task_counts(manifest, list(airflow.task_instances(client, TRANSFORM_DAG, run.transform["dag_run_id"])))
    lines = ["", "Pipeline finished."]
    if run.tables:
        lines.append("  Tables copied into the warehouse:")
    for uri, extra in sorted(run.tables.items()):
        lines.append(table_line(uri, extra))
        lines += [f"      note: {note}" for note in extra.get("notes") or []]
    trigger = "triggered by the raw tables' Asset events" if run.tables else "triggered by `make run`"
    lines += [
        f"  dbt project {manifest['metadata']['project_name']} ({dbt_project.describe_counts(in_manifest)}):",
        f"    run {run.transform['dag_run_id']}, {trigger}",
    ]
    for kind in ("seed", "snapshot", "model"):
        if in_manifest[kind]:
            lines.append(f"    {kind + 's':<10} {ran[kind]['success']} succeeded, {ran[kind]['failed']} failed "
                         f"(of {in_manifest[kind]})")  # fmt: skip
    if in_manifest["test"]:
        lines.append(f"    {'tests':<10} {ran['test']['success']} test tasks passed, {ran['test']['failed']} failed "
                     f"({in_manifest['test']} tests)")  # fmt: skip
    lines += [
        f"  Time: {total_seconds:.0f} s in all, {run.seconds:.0f} s from trigger to transformed marts.",
        f"  Executor: {settings.celery.describe() if settings.celery else 'LocalExecutor'}.",
        f"  Airflow UI: {settings.api_url}  (login: {airflow.ADMIN_USER} / {airflow.admin_password(settings)})",
        f"  dbt docs: {settings.api_url}/cosmos/{manifest['metadata']['project_name']}/dbt_docs",
    ]
    if demo_in_use():
        lines.append("  Stop everything with `make stop`; `make tick` changes the source, `make run` copies it again.")
    else:
        lines.append("  Stop everything with `make stop`; `make run` runs the pipeline again.")
    return "\n".join(lines)


def prepare(settings: StackSettings) -> airflow.AirflowClient:
    """Everything before a run: checks first (one line each), then databases, manifest, Airflow."""
    check_broker(settings)
    ours = "api-server" in airflow.running_components(settings) and preflight.started_with(
        settings.airflow_home / "run", airflow.airflow_environment(settings), "AIRFLOW__API__PORT")
    preflight.check_ports(settings, airflow_running=ours, postgres_running=embedded_postgres(settings).is_running())
    preflight.check_tables_config()
    start_databases(settings)
    generated = ensure_demo_data(settings)
    if generated:
        logger.info("generated demo source data: %s", generated)
    build_manifest(settings)
    check_before_airflow(settings)
    return start_airflow(settings)


def run(settings: StackSettings) -> str:
    started = time.monotonic()
    with exclusive(settings):
        client = prepare(settings)
    tables = preflight.check_tables_config()
    pipeline = trigger_pipeline(client, logs=settings.airflow_home / "logs", ingest=tables > 0)
    return summary(settings, client, pipeline, time.monotonic() - started)


def up(settings: StackSettings) -> airflow.AirflowClient:
    with exclusive(settings):
        return prepare(settings)


def stop(settings: StackSettings) -> list[str]:
    with exclusive(settings):
        stopped = airflow.stop(settings)
        server = embedded_postgres(settings)
        if server.is_running():
            server.stop()
            stopped.append("embedded PostgreSQL")
    return stopped
