"""`make run`: set everything up, run ingestion, wait for the Asset-triggered transform, summarise."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from include.local_stack import airflow, celery
from include.local_stack.postgres import EmbeddedPostgres, create_database
from include.local_stack.settings import (
    SOURCE_CONN_ID,
    WAREHOUSE_CONN_ID,
    StackSettings,
    load_airflow_settings,
    mask_password,
)

logger = logging.getLogger(__name__)

INGEST_DAG = "ingest_raw_tables"
TRANSFORM_DAG = "transform_dbt"
# The profile and target of the profile Cosmos builds (include/dbt_config.py's ProfileConfig).
DBT_PROFILE = "warehouse"
DBT_TARGET = "airflow"


class StackError(RuntimeError):
    """Set-up cannot go on; the message names what is wrong and what to do."""


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
    server = embedded_postgres(settings).start()
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


def ensure_demo_data(settings: StackSettings) -> dict[str, Any] | None:
    """Generate the demo source tables the first time; later runs copy what is there."""
    from include.demo_data import generate

    url = settings.database_url(SOURCE_CONN_ID)
    with psycopg.connect(url) as conn:
        present = conn.execute("select to_regclass('public.stock_master') is not null").fetchone()[0]
    if present:
        return None
    # Anchored to the wall clock, so that dbt's source freshness reflects this run.
    return generate(
        url,
        securities=settings.demo_securities,
        events=settings.demo_events,
        seed=settings.demo_seed,
        now=datetime.now(UTC),
    )


def dbt_environment(settings: StackSettings) -> dict[str, str]:
    params = psycopg.conninfo.conninfo_to_dict(settings.database_url(WAREHOUSE_CONN_ID))
    env = dict(os.environ)
    env.update(
        DBT_HOST=params.get("host", "127.0.0.1"),
        DBT_PORT=str(params.get("port", 5432)),
        DBT_USER=params.get("user", "postgres"),
        DBT_PASSWORD=params.get("password", ""),
        DBT_DBNAME=params.get("dbname", "warehouse"),
    )
    return env


def build_manifest(settings: StackSettings) -> Path:
    """`dbt parse` writes dbt/target/manifest.json, which Cosmos renders the transform DAG from.

    Parsed into a scratch folder and moved into place in one rename: a DAG file parsed meanwhile
    reads the old manifest or the new one, never half of one.
    """
    project = settings.root / "dbt"
    manifest = project / "target" / "manifest.json"
    # dbt reuses a saved parse only for the same profile, target and warehouse address (not the
    # password); the stamp says which address this one was made for.
    stamp = project / "target" / "parsed_for.txt"
    params = psycopg.conninfo.conninfo_to_dict(settings.database_url(WAREHOUSE_CONN_ID))
    parsed_for = f"{DBT_PROFILE}/{DBT_TARGET} {params.get('user')}@{params.get('host')}:{params.get('port')}/" \
                 f"{params.get('dbname')}"
    generated = {project / "target", project / "logs"}
    sources = [p for p in project.rglob("*") if p.is_file() and not any(p.is_relative_to(g) for g in generated)]
    if (manifest.exists() and stamp.exists() and stamp.read_text() == parsed_for
            and all(p.stat().st_mtime <= manifest.stat().st_mtime for p in sources)):
        return manifest
    manifest.parent.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".parse-", dir=manifest.parent))
    try:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("dbt")), "parse", "--project-dir", str(project),
             "--profiles-dir", str(project), "--profile", DBT_PROFILE, "--target", DBT_TARGET,
             "--target-path", str(scratch), "--log-path", str(scratch)],
            env=dbt_environment(settings), capture_output=True, text=True, cwd=project,
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"`dbt parse` failed, so the transform DAG cannot be rendered:\n{result.stdout[-3000:]}")
        # Cosmos hands the partial-parse state to each task's dbt, which then skips a full parse.
        os.replace(scratch / "partial_parse.msgpack", manifest.parent / "partial_parse.msgpack")
        os.replace(scratch / "manifest.json", manifest)
        stamp.write_text(parsed_for)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def check_broker(settings: StackSettings) -> None:
    """On the CeleryExecutor, the broker must answer before anything starts."""
    if settings.celery is not None:
        try:
            celery.check_broker(settings.celery)
        except celery.CeleryStackError as error:
            raise StackError(str(error)) from None


def start_airflow(settings: StackSettings) -> airflow.AirflowClient:
    if not airflow.running_components(settings):
        airflow.migrate_database(settings)
    airflow.start(settings)
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


def trigger_pipeline(client: airflow.AirflowClient, timeout: float = 900) -> PipelineRun:
    """Trigger ingestion by hand; the transform must follow from the Asset events alone."""
    started = time.monotonic()
    airflow.wait_for_dags(client, [INGEST_DAG, TRANSFORM_DAG])
    known_transforms = {r["dag_run_id"] for r in airflow.dag_runs(client, TRANSFORM_DAG)}
    run_id = f"make_run__{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
    client.post(f"/api/v2/dags/{INGEST_DAG}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
    ingest = airflow.wait_for_run(client, INGEST_DAG, run_id, timeout)
    if ingest["state"] != "success":
        raise StackError(f"Ingestion run {run_id} failed: {failed_tasks(client, INGEST_DAG, run_id)}")
    transform = airflow.wait_for_new_run(
        client, TRANSFORM_DAG, known_transforms, "asset_triggered", timeout - (time.monotonic() - started)
    )
    events = client.get(f"/api/v2/assets/events?source_dag_id={INGEST_DAG}&source_run_id={run_id}&limit=100")
    tables = {event["uri"]: event.get("extra") or {} for event in events["asset_events"]}
    run = PipelineRun(ingest=ingest, transform=transform, tables=tables, seconds=time.monotonic() - started)
    for dag_id, dag_run in ((INGEST_DAG, ingest), (TRANSFORM_DAG, transform)):
        run.task_states[dag_id] = Counter(
            ti["state"] for ti in airflow.task_instances(client, dag_id, dag_run["dag_run_id"])
        )
    if transform["state"] != "success":
        raise StackError(
            f"The transform run {transform['dag_run_id']} failed: "
            f"{failed_tasks(client, TRANSFORM_DAG, transform['dag_run_id'])}"
        )
    return run


def task_label(ti: dict[str, Any]) -> str:
    """A task instance as the UI names it: `task_id`, or `task_id[table]` for a mapped one."""
    if ti["map_index"] < 0:
        return ti["task_id"]
    return f"{ti['task_id']}[{ti.get('rendered_map_index') or ti['map_index']}]"


def failed_tasks(client: airflow.AirflowClient, dag_id: str, run_id: str) -> str:
    failed = [
        task_label(ti)
        for ti in airflow.task_instances(client, dag_id, run_id)
        if ti["state"] in ("failed", "upstream_failed")
    ]
    return ", ".join(failed) or "no failed task recorded"


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


def transform_task_counts(client: airflow.AirflowClient, run_id: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for ti in airflow.task_instances(client, TRANSFORM_DAG, run_id):
        kind = dbt_task_kind(ti["task_id"])
        if kind:
            counts[f"{kind}_{ti['state']}"] += 1
    return dict(counts)


def summary(settings: StackSettings, client: airflow.AirflowClient, run: PipelineRun, total_seconds: float) -> str:
    counts = transform_task_counts(client, run.transform["dag_run_id"])
    lines = ["", "Pipeline finished.", "  Tables copied into the warehouse:"]
    for uri, extra in sorted(run.tables.items()):
        table = "/".join(uri.split("/")[-2:]).replace("/", ".")
        lines.append(
            f"    {table:<24} {extra.get('mode', ''):<12} read {extra.get('rows_read', '?'):>8}  "
            f"+{extra.get('rows_inserted', '?')} ~{extra.get('rows_updated', '?')} -{extra.get('rows_deleted', '?')}"
            f"  validation {'ok' if extra.get('validation_match') else extra.get('validation_match')}"
        )
    lines += [
        f"  dbt (run {run.transform['dag_run_id']}, triggered by the raw tables' Asset events):",
        f"    nodes run: {counts.get('nodes_success', 0)} succeeded, {counts.get('nodes_failed', 0)} failed",
        f"    tests:     {counts.get('tests_success', 0)} passed, {counts.get('tests_failed', 0)} failed",
        f"  Time: {total_seconds:.0f} s in all, {run.seconds:.0f} s from trigger to transformed marts.",
        f"  Executor: {settings.celery.describe() if settings.celery else 'LocalExecutor'}.",
        f"  Airflow UI: {settings.api_url}  (login: {airflow.ADMIN_USER} / {airflow.admin_password(settings)})",
        "  Stop everything with `make stop`; `make tick` changes the source, `make run` copies it again.",
    ]
    return "\n".join(lines)


def run(settings: StackSettings) -> str:
    started = time.monotonic()
    with exclusive(settings):
        check_broker(settings)
        start_databases(settings)
        generated = ensure_demo_data(settings)
        if generated:
            logger.info("generated demo source data: %s", generated)
        build_manifest(settings)
        client = start_airflow(settings)
    pipeline = trigger_pipeline(client)
    return summary(settings, client, pipeline, time.monotonic() - started)


def up(settings: StackSettings) -> airflow.AirflowClient:
    with exclusive(settings):
        check_broker(settings)
        start_databases(settings)
        ensure_demo_data(settings)
        build_manifest(settings)
        return start_airflow(settings)


def stop(settings: StackSettings) -> list[str]:
    with exclusive(settings):
        stopped = airflow.stop(settings)
        server = embedded_postgres(settings)
        if server.is_running():
            server.stop()
            stopped.append("embedded PostgreSQL")
    return stopped
