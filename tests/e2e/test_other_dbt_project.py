"""A dbt project of your own in place of the demo's, through a real Airflow.

The project in tests/fixtures/other_dbt_project (seeds, a source without freshness, folders the demo
has not, a snapshot, a test that fails until its data is fixed) runs with DBT_PROJECT_DIR pointing
at it, against the machine's PostgreSQL 15 as source and warehouse, with URLs that carry no password
(trust authentication). Nothing outside the project changes: no code, no profile. Its node tasks wait
in the documented other place, `DBT_WATCHER_TASKS=deferred` (each starts in a worker and defers to the
triggerer while its node runs); the demo's stack covers the default, `triggerer`.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from include import dbt_project
from include.local_stack import airflow, runner
from tests.e2e.conftest import RunningStack, node_lines_in_triggerer_log, published_results_not_found, start_stack

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OTHER_PROJECT = PROJECT_ROOT / "tests" / "fixtures" / "other_dbt_project"
# USD is missing at first: customer_revenue's not_null test on revenue_eur fails until it is added.
RATES = {"GBP": Decimal("1.17"), "EUR": Decimal("1")}
USD_RATE = Decimal("0.92")


@pytest.fixture(scope="module")
def other_stack(server_dirs, pg15):
    source, warehouse = pg15.new_database("byo_source"), pg15.new_database("byo_warehouse")
    with psycopg.connect(warehouse, autocommit=True) as conn:
        conn.execute("create schema fixture")
        conn.execute("create table fixture.exchange_rates (currency_code text primary key, rate_to_eur numeric)")
        for code, rate in RATES.items():
            conn.execute("insert into fixture.exchange_rates values (%s, %s)", (code, rate))
    running = start_stack(server_dirs("stack-other"), warehouse, {"DBT_WATCHER_TASKS": "deferred"}, source,
                          dbt_project_dir=OTHER_PROJECT)
    try:
        yield running
    finally:
        runner.stop(running.settings)
        pg15.drop_database(source)
        pg15.drop_database(warehouse)


@dataclass
class FailedThenFixed:
    failure: str
    run: dict
    task_instances: list[dict]
    cleared: set[str]
    pipeline: runner.PipelineRun


def manifest() -> dict:
    return dbt_project.load_manifest(dbt_project.manifest_path(OTHER_PROJECT))


@pytest.fixture(scope="module")
def failed_then_fixed(other_stack: RunningStack) -> FailedThenFixed:
    client, settings = other_stack.client, other_stack.settings
    logs = settings.airflow_home / "logs"
    known = {run["dag_run_id"] for run in airflow.dag_runs(client, runner.TRANSFORM_DAG)}
    with pytest.raises(runner.StackError) as raised:
        runner.trigger_pipeline(client, timeout=900, logs=logs)
    run = next(r for r in airflow.dag_runs(client, runner.TRANSFORM_DAG) if r["dag_run_id"] not in known)
    run_id = run["dag_run_id"]

    with psycopg.connect(settings.database_url("warehouse_postgres"), autocommit=True) as conn:
        conn.execute("insert into fixture.exchange_rates values ('USD', %s)", (USD_RATE,))
    instances = list(airflow.task_instances(client, runner.TRANSFORM_DAG, run_id))
    nodes = dbt_project.task_nodes(manifest(), [ti["task_id"] for ti in instances])
    revenue = "model.shop_analytics.customer_revenue"
    # The model is a table built before its rate existed: its task runs again, and its tests after it.
    cleared = {task_id for task_id, (unique_id, kind) in nodes.items() if unique_id == revenue and kind != "test"}
    client.post(f"/api/v2/dags/{runner.TRANSFORM_DAG}/clearTaskInstances",
                {"dry_run": False, "dag_run_id": run_id, "task_ids": sorted(cleared), "include_downstream": True,
                 "only_failed": False, "reset_dag_runs": True})  # fmt: skip
    time.sleep(5)
    recovered = airflow.wait_for_run(client, runner.TRANSFORM_DAG, run_id, timeout=900)
    pipeline = runner.PipelineRun(ingest={}, transform=recovered, tables={})
    return FailedThenFixed(str(raised.value), recovered,
                           list(airflow.task_instances(client, runner.TRANSFORM_DAG, run_id)), cleared, pipeline)


def test_a_failing_test_names_its_task_cause_and_log_in_make_runs_message(failed_then_fixed):
    message = failed_then_fixed.failure
    assert message.startswith("The transform run ")
    first = re.search(r"\n  (\S+) failed first: (\w[\w.]*): (.+)\n  log: (\S+)$", message, re.S)
    assert first, message
    task, error_class, _, log = first.groups()
    assert "customer_revenue" in task
    assert error_class and Path(log).is_file()


def test_every_node_ran_as_one_task_in_dbts_order_and_the_run_completed(failed_then_fixed):
    assert failed_then_fixed.run["state"] == "success"
    graph = manifest()
    instances = {ti["task_id"]: ti for ti in failed_then_fixed.task_instances}
    nodes = dbt_project.task_nodes(graph, list(instances))
    ran: dict[str, dict] = {}
    for task_id, (unique_id, kind) in nodes.items():
        if kind != "test":
            assert unique_id not in ran, f"{unique_id} ran as two tasks"
            ran[unique_id] = instances[task_id]
    assert set(ran) == {uid for uid, node in graph["nodes"].items()
                        if node["resource_type"] in ("seed", "snapshot", "model")}  # fmt: skip
    assert {instances[task_id]["state"] for task_id in nodes} == {"success"}
    for task_id, (unique_id, _) in nodes.items():
        if unique_id != "model.shop_analytics.customer_revenue":
            assert instances[task_id]["try_number"] == 1, f"{task_id} ran {instances[task_id]['try_number']} times"
    for unique_id, ti in ran.items():
        for parent in graph["nodes"][unique_id]["depends_on"].get("nodes", []):
            if parent in ran:
                assert ran[parent]["end_date"] <= ti["start_date"], f"{unique_id} started before {parent} ended"
    assert not any(task_id.endswith(("source", "_source")) for task_id in instances), "no source has freshness"


def test_deferred_node_tasks_started_in_a_worker_and_logged_their_dbt_result(other_stack, failed_then_fixed):
    """With DBT_WATCHER_TASKS=triggerer a node task that succeeds never starts in a worker (its log has only a
    trigger part); deferred, each starts in one, and its log has its node's result either way."""
    run_id = failed_then_fixed.run["dag_run_id"]
    logs = other_stack.settings.airflow_home / "logs" / f"dag_id={runner.TRANSFORM_DAG}" / f"run_id={run_id}"
    nodes = dbt_project.task_nodes(manifest(), [ti["task_id"] for ti in failed_then_fixed.task_instances])
    assert len(nodes) >= 5
    for task_id, (unique_id, kind) in nodes.items():
        worker_log = logs / f"task_id={task_id}" / "attempt=1.log"
        assert worker_log.is_file(), f"{task_id} did not start in a worker"
        if kind != "test":
            text = "".join(path.read_text(errors="replace") for path in worker_log.parent.glob("attempt=1.log*"))
            assert f"dbt result of {unique_id}: " in text, f"{task_id}'s log has no dbt result of {unique_id}"
    assert node_lines_in_triggerer_log(other_stack) == []


def test_no_deferred_trigger_read_the_published_results_before_the_producer_sent_them(other_stack, failed_then_fixed):
    """Each starts as its worker defers, the producer's first push a second or more later on two cores."""
    assert published_results_not_found(other_stack) == []


def test_the_marts_hold_the_values_of_the_seeds_and_rates(other_stack, failed_then_fixed):
    rates = {**RATES, "USD": USD_RATE}
    orders = [(1, Decimal("12.50"), "GBP"), (1, Decimal("7.00"), "GBP"), (2, Decimal("30.00"), "USD"),
              (3, Decimal("9.90"), "EUR")]  # fmt: skip
    expected = {}
    for customer, amount, currency in orders:
        count, total = expected.get(customer, (0, Decimal(0)))
        expected[customer] = (count + 1, total + amount * rates[currency])
    with psycopg.connect(other_stack.settings.database_url("warehouse_postgres")) as conn:
        rows = conn.execute("select customer_id, order_count, revenue_eur from shop_reporting.customer_revenue")
        assert {row[0]: (row[1], row[2]) for row in rows} == expected
        history = conn.execute("select count(*) from shop_snapshots.customers_snapshot").fetchone()[0]
        assert history == 3
        securities = conn.execute("select security_count from shop_reporting.security_count").fetchone()[0]
        assert securities == conn.execute("select count(*) from raw.stock_master").fetchone()[0] > 0


def test_the_summary_counts_the_projects_own_nodes(other_stack, failed_then_fixed):
    counts = dbt_project.node_counts(manifest())
    text = runner.summary(other_stack.settings, other_stack.client, failed_then_fixed.pipeline, 1.0)
    assert f"dbt project shop_analytics ({dbt_project.describe_counts(counts)}):" in text
    for kind in ("seed", "snapshot", "model"):
        assert f"    {kind + 's':<10} {counts[kind]} succeeded, 0 failed (of {counts[kind]})" in text
    assert f"0 failed ({counts['test']} tests)" in text
    assert "make tick" in text  # the demo tables are still the ones copied


def test_the_docs_are_served_under_the_projects_name_and_no_consumer_waits_for_a_missing_mart(other_stack,
                                                                                               failed_then_fixed):
    client, settings = other_stack.client, other_stack.settings
    assert "report_corporate_actions" not in {d["dag_id"] for d in client.get("/api/v2/dags?limit=100")["dags"]}
    url = f"{settings.api_url}/cosmos/shop_analytics/manifest.json"
    deadline, served = time.monotonic() + 300, None
    while time.monotonic() < deadline:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {client._token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                served = json.loads(response.read())
            break
        except (urllib.error.URLError, ValueError):
            time.sleep(5)
    assert served is not None, f"{url} served no docs"
    assert served["metadata"]["project_name"] == "shop_analytics"
    assert "model.shop_analytics.customer_revenue" in served["nodes"]
