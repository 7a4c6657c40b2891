"""The transform's freshness check and the docs task, run for real: the watcher producer's
`dbt source freshness` passes, warns or stops what reads the raw tables by their age (each source's
own task turns red past `error_after`), and `dbt_docs` publishes index, manifest and catalog into
the docs folder, never touching the manifest in dbt/target that the DAG is rendered from.

The tasks run with `dag.test()` in child Python processes, against a throwaway sqlite metadata
database and real PostgreSQL warehouses holding the demo raw tables, each at a different age.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from include.dbt_project import docs_projects_setting, project_name
from include.demo_data import generate
from include.local_stack.airflow import airflow_connection_uri

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = PROJECT_ROOT / "dbt" / "target" / "manifest.json"
DOCS_PROJECT = project_name()
# The age of each raw table's newest change, against warn_after 10 days and error_after 30 days.
AGES = {"fresh": timedelta(hours=1), "stale_warn": timedelta(days=15), "stale_error": timedelta(days=40)}

PROBE_DAG = textwrap.dedent(
    '''
    """The transform's task group for the raw sources and what reads them directly, then the docs."""

    import json
    import os
    import sys
    from datetime import UTC, datetime

    from airflow.sdk import dag

    from include.dbt_config import dbt_docs_task, transform_task_group


    @dag(schedule=None, start_date=datetime(2026, 1, 1, tzinfo=UTC), catchup=False, default_args={"retries": 0})
    def freshness_and_docs_probe():
        # The raw sources and the snapshots reading them: nodes whose tests read no other node.
        group = transform_task_group(select=["source:raw.stock_master", "source:raw.edi_690", "path:snapshots"])
        group >> dbt_docs_task()
        # dag.test() runs one task at a time: a sensor picked before the producer would wait for ever.
        producer = group.dag.get_task("dbt.dbt_producer_watcher")
        for task in group.dag.tasks:
            if task is not producer and not task.upstream_task_ids and hasattr(task, "producer_task_id"):
                producer >> task


    probe = freshness_and_docs_probe()

    if __name__ == "__main__":
        from airflow.utils.db import upgradedb

        upgradedb()
        for scenario in sys.argv[1:]:
            os.environ["AIRFLOW_CONN_WAREHOUSE_POSTGRES"] = os.environ[f"PROBE_{scenario.upper()}_WAREHOUSE"]
            os.environ["AIRFLOW__COSMOS__DBT_DOCS_PROJECTS"] = os.environ[f"PROBE_{scenario.upper()}_DOCS"]
            print(f"PROBE_START {scenario}", flush=True)
            run = probe.test()
            states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
            print("PROBE_RESULT " + json.dumps({"run": str(run.state), "tasks": states}), flush=True)
    '''
)


def age_raw_tables(dsn: str, age: timedelta) -> None:
    """Shift each raw table's change timestamps so that its newest change is `age` old."""
    with psycopg.connect(dsn) as conn:
        for table, column in (("stock_master", "updated_at"), ("edi_690", "changed_at")):
            statement = sql.SQL(
                "update {table} set {column} = {column} + (now() - %s - (select max({column}) from {table}))"
            )
            conn.execute(statement.format(table=sql.Identifier("raw", table), column=sql.Identifier(column)), (age,))


def docs_setting(folder: Path) -> str:
    return docs_projects_setting(DOCS_PROJECT, str(folder))


@pytest.fixture(scope="module", params=["pg18", "pg15"])
def probe_runs(request, tmp_path_factory):
    server = request.getfixturevalue(request.param)
    home = tmp_path_factory.mktemp(f"freshness_{request.param}")
    databases = {}
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW") and key != "PYTHONPATH"}
    for scenario, age in AGES.items():
        dsn = server.new_database(f"fresh_{scenario}")
        databases[scenario] = dsn
        generate(dsn, securities=300, events=3000, schema="raw", now=datetime.now(UTC))
        age_raw_tables(dsn, age)
        # The test servers trust local logins; Cosmos' profile mapping still wants a password.
        params = {"password": "unused", **conninfo_to_dict(dsn)}
        env[f"PROBE_{scenario.upper()}_WAREHOUSE"] = airflow_connection_uri(make_conninfo(**params))
        env[f"PROBE_{scenario.upper()}_DOCS"] = docs_setting(home / f"docs_{scenario}")
    dag_file = home / "dags" / "freshness_and_docs_probe.py"
    dag_file.parent.mkdir()
    dag_file.write_text(PROBE_DAG)
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(dag_file.parent),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__COSMOS__ENABLE_TELEMETRY="False",
        AIRFLOW__COSMOS__CACHE_DIR=str(home / "cosmos_cache"),
        PYTHONPATH=str(PROJECT_ROOT),
    )
    manifest_before = hashlib.sha256(MANIFEST.read_bytes()).hexdigest()
    runs, outputs = {}, []
    try:
        # One process per scenario: Cosmos' profile mapping keeps the connection it read first.
        for scenario in AGES:
            done = subprocess.run(
                [sys.executable, str(dag_file), scenario],
                cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
            )  # fmt: skip
            outputs.append(done.stdout)
            for chunk in done.stdout.split("PROBE_START ")[1:]:
                name, _, output = chunk.partition("\n")
                result = [line for line in output.splitlines() if line.startswith("PROBE_RESULT ")]
                if result:
                    runs[name] = {**json.loads(result[-1].removeprefix("PROBE_RESULT ")), "log": output}
    finally:
        for dsn in databases.values():
            server.drop_database(dsn)
    assert set(runs) == set(AGES), "dag.test() did not finish:\n" + "\n".join(out[-3000:] for out in outputs)
    return {"runs": runs, "home": home, "manifest_before": manifest_before}


def states_by_kind(run: dict) -> dict[str, set[str]]:
    """The run's task states, grouped: the raw sources' tasks, what reads them, the docs."""
    kinds: dict[str, set[str]] = {"sources": set(), "readers": set(), "docs": set()}
    for task_id, state in run["tasks"].items():
        if task_id == "dbt_docs":
            kinds["docs"].add(state)
        elif ".raw_" in task_id:
            kinds["sources"].add(state)
        elif task_id.endswith((".run", ".snapshot", ".test")):
            kinds["readers"].add(state)
    return kinds


def test_fresh_sources_pass_and_the_docs_are_published(probe_runs):
    fresh = probe_runs["runs"]["fresh"]
    assert states_by_kind(fresh) == {"sources": {"success"}, "readers": {"success"}, "docs": {"success"}}, (
        fresh["log"][-4000:])
    assert "is stale" not in fresh["log"]
    docs = probe_runs["home"] / "docs_fresh"
    assert sorted(path.name for path in docs.iterdir()) == ["catalog.json", "index.html", "manifest.json"]
    assert "<html" in (docs / "index.html").read_text()[:2000].lower()
    manifest = json.loads((docs / "manifest.json").read_text())
    assert "model.postgres_analytics.fact_events" in manifest["nodes"]
    catalog = json.loads((docs / "catalog.json").read_text())
    assert {"source.postgres_analytics.raw.stock_master", "source.postgres_analytics.raw.edi_690"} <= set(
        catalog["sources"]
    )


def test_a_source_past_warn_after_warns_and_the_run_goes_on(probe_runs):
    warned = probe_runs["runs"]["stale_warn"]
    assert states_by_kind(warned) == {"sources": {"success"}, "readers": {"success"}, "docs": {"success"}}, (
        warned["log"][-4000:])
    assert "raw.stock_master is stale" in warned["log"]
    assert (probe_runs["home"] / "docs_stale_warn" / "index.html").exists()


def test_a_source_past_error_after_fails_its_task_and_nothing_reading_it_runs(probe_runs):
    failed = probe_runs["runs"]["stale_error"]
    kinds = states_by_kind(failed)
    assert "failed" in kinds["sources"], failed["log"][-4000:]
    assert kinds["readers"] <= {"upstream_failed", "skipped"} and kinds["docs"] == {"upstream_failed"}
    assert failed["run"] == "failed"
    assert not (probe_runs["home"] / "docs_stale_error").exists()


def test_no_task_rewrites_the_manifest_the_dag_is_rendered_from(probe_runs):
    assert hashlib.sha256(MANIFEST.read_bytes()).hexdigest() == probe_runs["manifest_before"]
