"""The pipeline on the CeleryExecutor, as Astro and MWAA run it: real workers, a real Redis broker.

Two workers of two slots each, fewer than the large table's holder plus its four ranges: the ranges
run in both workers' processes; one worker is SIGKILLed (with its task processes) while its range
copies, and the range is retried on the other worker; the table ends exact, the transform follows
from the Asset events and the marts equal the values computed in Python. Then a worker with a
single slot, which the holder takes: the run fails with the message the README promises, in
bounded time.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import psycopg
import pytest

from include.ingestion import SlotsExhaustedError
from include.local_stack import airflow, runner
from include.local_stack.celery import CeleryOptions
from include.local_stack.postgres import free_port
from include.local_stack.settings import SOURCE_CONN_ID, WAREHOUSE_CONN_ID, StackSettings
from tests.dbt.conftest import _state as warehouse_state
from tests.dbt.test_marts import _check_marts
from tests.e2e.conftest import E2E_EVENTS, E2E_SECURITIES, FAST_RETRIES, RunningStack
from tests.e2e.test_pipeline_end_to_end import failure_report, raw_table_uri, table_digest, warehouse_rows

pytestmark = pytest.mark.e2e

# Redis on this machine and in CI; a database of its own and a queue per stack keep runs apart.
BROKER_URL = os.environ.get("CELERY_TEST_BROKER_URL", "redis://127.0.0.1:6379/3")
# Where the engine stages a large table's ranges (include/copy_engine/_parallel.py).
STAGE = "_copy_engine.stage_raw_edi_690"
RANGE_TASK = "sync_edi_690.copy_range"


def celery_stack(server_dirs, name: str, workers: int, concurrency: int, extra_env: dict[str, str]) -> RunningStack:
    env = {
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": f"e2e-{name}-{uuid.uuid4().hex[:8]}",
        # A dead worker's task is failed (and retried) 20 s after its last heartbeat.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        **FAST_RETRIES,
        **extra_env,
    }
    settings = StackSettings(data_dir=server_dirs(f"stack-{name}"), postgres_port=free_port(), api_port=free_port(),
                             demo_securities=E2E_SECURITIES, demo_events=E2E_EVENTS, extra_env=env,
                             celery=CeleryOptions(BROKER_URL, workers, concurrency))
    try:
        return RunningStack(settings, runner.up(settings))
    except Exception:
        runner.stop(settings)
        raise


def tries(client, dag_id: str, run_id: str, task_id: str, map_index: int) -> list[dict]:
    path = (f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{task_id}/"
            f"{map_index}/tries")
    return client.get(path)["task_instances"]


@dataclass
class KilledWorkerRun:
    stack: RunningStack
    pipeline: runner.PipelineRun
    victim: str
    survivor: str
    killed_ranges: list[int]
    range_tries: dict[int, list[dict]]


@pytest.fixture(scope="module")
def killed_worker_run(server_dirs):
    stack = celery_stack(server_dirs, "celery", workers=2, concurrency=2, extra_env={})
    client = stack.client
    try:
        airflow.wait_for_dags(client, [runner.INGEST_DAG, runner.TRANSFORM_DAG])
        warehouse = stack.settings.database_url(WAREHOUSE_CONN_ID)
        known_transforms = {r["dag_run_id"] for r in airflow.dag_runs(client, runner.TRANSFORM_DAG)}
        run_id = f"e2e_celery__{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
        with psycopg.connect(warehouse) as blocker:
            client.post(f"/api/v2/dags/{runner.INGEST_DAG}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
            # Once the holder has made the staging table, a lock on it keeps the ranges copying (blocked
            # inside their transaction) for as long as the test needs to kill one of their workers.
            deadline = time.monotonic() + 300
            while blocker.execute("select to_regclass(%s)", (STAGE,)).fetchone()[0] is None:
                blocker.rollback()
                assert time.monotonic() < deadline, "the holder never created the staging table"
                time.sleep(0.05)
            blocker.execute(f"lock table {STAGE} in share mode")
            holder_host, running = None, []
            while time.monotonic() < deadline:
                tis = list(airflow.task_instances(client, runner.INGEST_DAG, run_id))
                holder_host = next(ti["hostname"] for ti in tis if ti["task_id"] == "sync_edi_690.hold_snapshot")
                running = [ti for ti in tis if ti["task_id"] == RANGE_TASK and ti["state"] == "running"
                           and ti["hostname"] and ti["hostname"] != holder_host]
                if holder_host and running:
                    break
                time.sleep(0.5)
            assert running, "no range ran on the worker without the holder"
            victim = running[0]["hostname"].split("@")[0]
            survivor = next(w for w in ("celery-worker-1", "celery-worker-2") if w != victim)
            time.sleep(3)  # the range is inside its copy, waiting for the lock
            tis = list(airflow.task_instances(client, runner.INGEST_DAG, run_id))
            killed_ranges = sorted(ti["map_index"] for ti in tis if ti["task_id"] == RANGE_TASK
                                   and ti["state"] == "running" and ti["hostname"].startswith(f"{victim}@"))
            worker_pid = airflow.running_components(stack.settings)[victim]
            for pid in [worker_pid, *airflow.descendants(worker_pid)]:
                os.kill(pid, signal.SIGKILL)
            blocker.rollback()  # the survivor's ranges go on
        ingest = airflow.wait_for_run(client, runner.INGEST_DAG, run_id, timeout=900)
        assert ingest["state"] == "success", failure_report(stack)
        # As `make run` would: the missing worker is started again, and the transform runs on both.
        airflow.start(stack.settings)
        transform = airflow.wait_for_new_run(client, runner.TRANSFORM_DAG, known_transforms, "asset_triggered", 900)
        events = client.get(f"/api/v2/assets/events?source_dag_id={runner.INGEST_DAG}&source_run_id={run_id}")
        pipeline = runner.PipelineRun(ingest=ingest, transform=transform,
                                      tables={e["uri"]: e.get("extra") or {} for e in events["asset_events"]})
        range_tries = {index: tries(client, runner.INGEST_DAG, run_id, RANGE_TASK, index) for index in range(4)}
        yield KilledWorkerRun(stack, pipeline, victim, survivor, killed_ranges, range_tries)
    except Exception:
        print(failure_report(stack))
        raise
    finally:
        runner.stop(stack.settings)


def test_the_large_tables_ranges_ran_in_both_workers_processes(killed_worker_run):
    first_tries = [attempts[0] for attempts in killed_worker_run.range_tries.values()]
    hosts = {attempt["hostname"].split("@")[0] for attempt in first_tries}
    assert hosts == {"celery-worker-1", "celery-worker-2"}
    assert len({attempt["pid"] for attempt in first_tries}) == 4


def test_the_range_of_the_killed_worker_was_retried_on_the_other_worker(killed_worker_run):
    run = killed_worker_run
    assert run.killed_ranges
    for index in run.killed_ranges:
        attempts = sorted(run.range_tries[index], key=lambda attempt: attempt["try_number"])
        assert [a["try_number"] for a in attempts] == [1, 2], index
        assert attempts[0]["hostname"].startswith(f"{run.victim}@") and attempts[0]["state"] == "failed"
        assert attempts[1]["hostname"].startswith(f"{run.survivor}@") and attempts[1]["state"] == "success"
    untouched = set(range(4)) - set(run.killed_ranges)
    assert all([a["try_number"] for a in run.range_tries[index]] == [1] for index in untouched)


def test_the_table_ends_exact_without_duplicates_and_the_report_says_so(killed_worker_run):
    stack = killed_worker_run.stack
    source, warehouse = (stack.settings.database_url(c) for c in (SOURCE_CONN_ID, WAREHOUSE_CONN_ID))
    for table, key in (("edi_690", "event_id"), ("stock_master", "security_id")):
        assert table_digest(warehouse, f"raw.{table}", key) == table_digest(source, f"public.{table}", key), table
    assert warehouse_rows(stack, "select count(*) - count(distinct event_id) from raw.edi_690") == [(0,)]
    extra = killed_worker_run.pipeline.tables[raw_table_uri(stack, "edi_690")]
    assert (extra["rows_read"], extra["rows_inserted"], extra["validation_match"]) == (4000, 4000, True)
    health = warehouse_rows(stack, "select runs, failed_runs, last_run_status, last_success_rows_read, "
                                   "last_success_rows_inserted from marts.pipeline_health "
                                   "where target_table = 'raw.edi_690'")
    assert health == [(1, 0, "success", 4000, 4000)]


def test_the_transform_follows_on_the_workers_and_the_marts_equal_python(killed_worker_run):
    run = killed_worker_run
    transform = run.pipeline.transform
    assert (transform["run_type"], transform["state"]) == ("asset_triggered", "success")
    tis = list(airflow.task_instances(run.stack.client, runner.TRANSFORM_DAG, transform["dag_run_id"]))
    assert {ti["state"] for ti in tis} == {"success"} and len(tis) >= 10
    # Empty placeholders (no-op nodes) are marked done by the scheduler and run on no worker; in
    # watcher mode node tasks end in the triggerer, unless DBT_WATCHER_TASKS starts them in workers.
    ran = [ti for ti in tis if ti["hostname"]]
    assert ran and {ti["hostname"].split("@")[0] for ti in ran} <= {"celery-worker-1", "celery-worker-2"}
    producers = [ti for ti in ran if ti["task_id"].endswith("dbt_producer_watcher")]
    watcher = os.environ.get("DBT_EXECUTION_MODE", "watcher") == "watcher"
    assert len(producers) == (1 if watcher else 0)
    nodes = [ti for ti in tis if ti["task_id"].startswith("dbt.")
             and not ti["task_id"].endswith(("dbt_producer_watcher", "emit_built_assets"))]
    if watcher and os.environ.get("DBT_WATCHER_TASKS", "triggerer") == "triggerer":
        assert [ti["task_id"] for ti in nodes if ti["hostname"]] == []
    else:
        assert len(ran) >= 10
    state = warehouse_state(run.stack.settings.database_url(WAREHOUSE_CONN_ID), with_tables=True)
    _check_marts(SimpleNamespace(initial=state), "initial")


def test_the_summary_names_the_executor_its_workers_and_the_masked_broker(killed_worker_run):
    run = killed_worker_run
    text = runner.summary(run.stack.settings, run.stack.client, run.pipeline, 1.0)
    assert f"  Executor: CeleryExecutor, 2 workers × 2 slots, broker {BROKER_URL}." in text.splitlines()


def test_a_holder_without_a_slot_for_its_ranges_fails_with_the_promised_message(server_dirs):
    """One worker with one slot: the holder takes it, no range can start. Never a hang."""
    stack = celery_stack(server_dirs, "celery-starved", workers=1, concurrency=1,
                         extra_env={"INGEST_RANGES_START_TIMEOUT_S": "20"})
    client = stack.client
    try:
        airflow.wait_for_dags(client, [runner.INGEST_DAG])
        run_id = f"e2e_starved__{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
        started = time.monotonic()
        client.post(f"/api/v2/dags/{runner.INGEST_DAG}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
        run = airflow.wait_for_run(client, runner.INGEST_DAG, run_id, timeout=400)
        seconds = time.monotonic() - started
        states = {runner.task_label(ti): (ti["state"], ti["try_number"])
                  for ti in airflow.task_instances(client, runner.INGEST_DAG, run_id)}
        logs = stack.settings.airflow_home / "logs" / f"dag_id={runner.INGEST_DAG}" / f"run_id={run_id}"
        holder_log = (logs / "task_id=sync_edi_690.hold_snapshot" / "attempt=1.log").read_text()
        warehouse = stack.settings.database_url(WAREHOUSE_CONN_ID)
        with psycopg.connect(warehouse) as conn:
            raw_rows = conn.execute("select count(*) from raw.edi_690").fetchone()[0]
    except Exception:
        print(failure_report(stack))
        raise
    finally:
        runner.stop(stack.settings)
    assert run["state"] == "failed" and seconds < 300
    assert states["sync_edi_690.hold_snapshot"] == ("failed", 1)
    assert states["sync_table[stock_master]"][0] == "success"
    assert {state for label, (state, _) in states.items() if label.startswith(RANGE_TASK)} == {"failed"}
    promised = str(SlotsExhaustedError("edi_690", 4, timedelta(seconds=20)))
    assert promised in holder_log
    readme = (stack.settings.root / "README.md").read_text()
    assert "none of its 4 copy_range tasks started within" in readme
    assert raw_rows == 0

