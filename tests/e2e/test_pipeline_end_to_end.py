"""The whole pipeline with a real Airflow: ingestion by hand, the transform by Asset events only.

Runs once with the warehouse on the embedded PostgreSQL 18 and once on the machine's PostgreSQL 15,
in the order an operator lives it: a first load, a batch of changes at the source and a second,
incremental ingestion, then a table that fails, its alert, and the recovery by clearing its task.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from include.dbt_watcher import sql_page_key
from include.demo_data import tick
from include.local_stack import airflow, runner
from include.local_stack.runner import task_label
from include.local_stack.settings import SOURCE_CONN_ID, WAREHOUSE_CONN_ID
from tests.e2e.conftest import node_lines_in_triggerer_log, published_results_not_found, read_triggerer_log

pytestmark = pytest.mark.e2e

# The feed's event codes and the readable types the models give them.
EVENT_TYPES = {"DIV": "dividend", "SD": "split", "CONSD": "consolidation", "BON": "bonus_issue",
               "RTS": "rights_issue", "MRGR": "merger", "DMRGR": "demerger", "CAPRD": "capital_reduction"}  # fmt: skip
KEYS = {"stock_master": "security_id", "edi_690": "event_id", "exchanges": "mic"}
# exchanges is `mode: cdc`: the embedded source (wal_level logical) syncs it so; PostgreSQL 15 at
# wal_level replica, a server of your own, gets it copied in full (PIPELINE_CDC_FALLBACK, set by the stack).
EXCHANGES_MODE = {True: "cdc", False: "full"}


@pytest.fixture(scope="module")
def pipeline_run(stack):
    try:
        return runner.trigger_pipeline(stack.client, timeout=900)
    except Exception:
        print(failure_report(stack))
        raise


def failure_report(stack) -> str:
    """The tails of the component logs and of every task log, for a failure in CI."""
    logs = stack.settings.airflow_home / "logs"
    parts = []
    for path in sorted(logs.rglob("*.log")):
        text = path.read_text(errors="replace")
        if path.parent == logs or "error" in text.lower():
            parts.append(f"==== {path.relative_to(logs)}\n{text[-3000:]}")
    return "\n".join(parts)


def task_log(logs, task_id: str, awaited: str, timeout: float = 30.0) -> str:
    """A task's log files under a run's `logs`, read again until they hold `awaited` or `timeout` passed.

    The triggerer writes a trigger's log lines as its runner sends them, and may record the trigger's
    event (so end the task, and the run) before the last of them is written.
    """
    deadline = time.monotonic() + timeout
    while True:
        paths = sorted((logs / f"task_id={task_id}").rglob("*.log"))
        text = "".join(path.read_text(errors="replace") for path in paths)
        if awaited in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def raw_table_uri(stack, table: str) -> str:
    """The Asset URI the DAGs must use: where the stack's warehouse really is."""
    params = conninfo_to_dict(stack.settings.database_url(WAREHOUSE_CONN_ID))
    return f"postgres://{params['host']}:{params['port']}/{params['dbname']}/raw/{table}"


def source_rows(stack, query: str) -> list[tuple]:
    with psycopg.connect(stack.settings.database_url(SOURCE_CONN_ID)) as conn:
        return conn.execute(query).fetchall()


def warehouse_rows(stack, query: str) -> list[tuple]:
    with psycopg.connect(stack.settings.database_url(WAREHOUSE_CONN_ID)) as conn:
        return conn.execute(query).fetchall()


def test_ingestion_copies_every_table_and_reports_it_on_the_assets(stack, pipeline_run):
    assert pipeline_run.ingest["state"] == "success"
    assert pipeline_run.ingest["run_type"] == "manual"
    securities = source_rows(stack, "select count(*) from public.stock_master")[0][0]
    events = source_rows(stack, "select count(*) from public.edi_690")[0][0]
    assert (securities, events) == (400, 4000)
    assert set(pipeline_run.tables) == {raw_table_uri(stack, table) for table in KEYS}
    assert pipeline_run.tables[raw_table_uri(stack, "stock_master")]["rows_inserted"] == securities
    assert pipeline_run.tables[raw_table_uri(stack, "edi_690")]["rows_inserted"] == events
    # The venues: by CDC where the source decodes changes (the embedded server), else in full, saying why.
    venues = pipeline_run.tables[raw_table_uri(stack, "exchanges")]
    assert (venues["mode"], venues["rows_inserted"]) == (EXCHANGES_MODE[stack.settings.source_url is None], 12)
    if stack.settings.source_url is not None:
        assert venues["notes"] == ["copied in full, not by CDC: the source's wal_level is replica (set wal_level = "
                                   "logical on the source and restart it to sync by CDC; PIPELINE_CDC_FALLBACK=full "
                                   "allowed the full copy)"]
    assert all(extra["validation_match"] is True for extra in pipeline_run.tables.values())
    assert warehouse_rows(stack, "select count(*) from raw.stock_master")[0][0] == securities
    assert warehouse_rows(stack, "select count(*) from raw.edi_690")[0][0] == events


def test_transform_was_triggered_by_the_raw_assets_and_succeeded(stack, pipeline_run):
    transform = pipeline_run.transform
    assert transform["run_type"] == "asset_triggered"
    assert transform["state"] == "success"
    run_id = transform["dag_run_id"]
    events = stack.client.get(f"/api/v2/dags/{runner.TRANSFORM_DAG}/dagRuns/{run_id}/upstreamAssetEvents")
    triggered_by = {(event["uri"], event["source_run_id"]) for event in events["asset_events"]}
    ingest_run = pipeline_run.ingest["dag_run_id"]
    assert triggered_by == {(raw_table_uri(stack, t), ingest_run) for t in KEYS}
    states = pipeline_run.task_states[runner.TRANSFORM_DAG]
    assert set(states) == {"success"}
    assert states["success"] >= 10, "every dbt node should be its own task"


def test_dbt_tasks_reuse_the_parse_saved_with_the_manifest(stack, pipeline_run):
    """A task that had to parse the project again would spend seconds on it (a profile mismatch)."""
    logs = stack.settings.airflow_home / "logs" / f"dag_id={runner.TRANSFORM_DAG}"
    texts = {path: path.read_text(errors="replace") for path in logs.rglob("*.log")}
    assert len(texts) >= 10
    reparsed = sorted(str(path.relative_to(logs)) for path, text in texts.items()
                      if "Unable to do partial parsing because" in text and "saved manifest not found" not in text)
    assert reparsed == []


def test_the_transform_ran_one_dbt_build_and_each_node_task_logs_its_own_result(stack, pipeline_run):
    """Default (watcher) mode: one producer ran dbt; every node's task log has that node's dbt result."""
    run_id = pipeline_run.transform["dag_run_id"]
    tasks = {ti["task_id"]: ti for ti in airflow.task_instances(stack.client, runner.TRANSFORM_DAG, run_id)}
    assert [t for t in tasks if t.endswith("dbt_producer_watcher")] == ["dbt.dbt_producer_watcher"]
    logs = stack.settings.airflow_home / "logs" / f"dag_id={runner.TRANSFORM_DAG}" / f"run_id={run_id}"
    text = task_log(logs, "dbt.models.marts.fact_events.run", "compiled SQL of model.postgres_analytics.fact_events:")
    assert "dbt result of model.postgres_analytics.fact_events: success" in text
    assert "SELECT" in text.split("dbt result of model.postgres_analytics.fact_events: success")[1][:300]  # rows
    assert "Cloning project" not in text, "a node task ran dbt itself instead of reading the producer's result"
    assert "compiled SQL of model.postgres_analytics.fact_events:" in text  # sent before its status was published
    unreported = [path.parent.name for path in logs.rglob("*.log")
                  if "no status reported" in path.read_text(errors="replace")]
    assert unreported == [], "node tasks logged a result without its dbt event (read before it was published)"
    assert "from" in text.split("compiled SQL of model.postgres_analytics.fact_events:")[1][:3000].lower()
    producer_log = "".join(p.read_text(errors="replace")
                           for p in (logs / "task_id=dbt.dbt_producer_watcher").rglob("*.log"))
    pushes = re.search(r"node results published: (\d+) XCom pushes .*?(\d+) successes only published", producer_log)
    assert pushes, "the producer did not log what it published"
    sent, published_only = map(int, pushes.groups())
    # Each success (2 snapshots, 10 models, their tests) is published only; the compiled SQL goes in pages.
    assert published_only >= 40 and sent < published_only, producer_log[-2000:]
    xcoms = stack.client.get(f"/api/v2/dags/{runner.TRANSFORM_DAG}/dagRuns/{run_id}/taskInstances/"
                             f"dbt.dbt_producer_watcher/xcomEntries?limit=1000")["xcom_entries"]
    keys = {entry["key"] for entry in xcoms}
    assert [key for key in keys if "__" in key] == [], "a node's result or compiled SQL was sent on its own"
    assert sql_page_key(0) in keys, sorted(keys)
    emitter = (logs / "task_id=dbt.emit_built_assets").rglob("*.log")
    emitter_log = "".join(path.read_text(errors="replace") for path in emitter)
    assert "(0 result(s) read alone, not published)" in emitter_log  # one read of the published results
    test_log = task_log(logs, "dbt.models.marts.fact_events.test",
                        "dbt result of test.postgres_analytics.unique_fact_events_event_id")
    assert "dbt result of test.postgres_analytics.unique_fact_events_event_id" in test_log


def test_node_tasks_ended_in_the_triggerer_sent_the_dag_processor_no_callback_request(stack, pipeline_run):
    """Airflow sends one for every task a trigger ends; ours have no success callback to run."""
    run_id = pipeline_run.transform["dag_run_id"]
    logs = stack.settings.airflow_home / "logs" / f"dag_id={runner.TRANSFORM_DAG}" / f"run_id={run_id}"
    ended_in_triggerer = [path.parent.name for path in logs.rglob("*.log")
                          if "waiting for the dbt result of" in (text := path.read_text(errors="replace"))
                          and "dbt result of" in text.split("waiting for the dbt result of", 1)[1]]  # fmt: skip
    assert ended_in_triggerer, "no node task waited in the triggerer"
    triggerer_log = (stack.settings.airflow_home / "logs" / "triggerer.log").read_text(errors="replace")
    requests = [line for line in triggerer_log.splitlines() if "Sending callback" in line and run_id in line]
    assert requests == []


def test_node_triggers_started_without_deserializing_the_dag(stack, pipeline_run):
    """Airflow deserializes the whole DAG for every trigger of a start_from_trigger task, and logs
    so; a node task's trigger is started from a DAG bag without DAGs (include/triggerer_setup.py)."""
    triggerer_log = read_triggerer_log(stack)
    deserialized = [line for line in triggerer_log.splitlines() if "Start from trigger enabled for task" in line]
    assert deserialized == []


def test_a_trigger_that_fired_and_stopped_is_not_fetched_again_as_a_new_one(stack, pipeline_run):
    """Until the cleanup deletes its row, Airflow took it for a new trigger on every assignment round
    and logged this line each time (include/triggerer_setup.py: _skip_ended_triggers)."""
    triggerer_log = read_triggerer_log(stack)
    refetched = [line for line in triggerer_log.splitlines() if "TaskInstance of Trigger is None" in line]
    assert refetched == [], f"{len(refetched)} ended triggers fetched again, the first: {refetched[:1]}"


def test_every_line_a_node_trigger_logged_went_to_its_tasks_log(stack, pipeline_run):
    """Not to the triggerer's own log, where Airflow writes a finished trigger's late lines
    (include/triggerer_setup.py: write_trigger_logs_before_closing)."""
    assert node_lines_in_triggerer_log(stack) == []


def test_no_trigger_read_the_published_results_before_the_producer_sent_them(stack, pipeline_run):
    """Airflow logs such a read, a 404, as an error in the triggerer; it counts them first."""
    not_found = published_results_not_found(stack)
    assert not_found == [], f"{len(not_found)} reads before the first push, the first: {not_found[:1]}"


def test_the_scheduler_and_the_dag_processor_parsed_the_dags_once_before_forking(stack, pipeline_run):
    """Task processes and the dag-processor's parses reuse that parse (config/airflow_local_settings.py)."""
    logs = stack.settings.airflow_home / "logs"
    scheduler = (logs / "scheduler.log").read_text(errors="replace")
    dag_processor = (logs / "dag-processor.log").read_text(errors="replace")
    assert re.search(r"preloaded dbt and [1-9]\d* DAGs for forked processes", scheduler)
    assert re.search(r"preloaded [1-9]\d* DAGs for forked processes", dag_processor)
    assert "could not preload" not in scheduler + dag_processor


def test_marts_hold_the_values_computed_from_the_source(stack, pipeline_run):
    events = source_rows(stack, "select event_id, event_code, security_id, action_flag from public.edi_690")
    live = {event_id for event_id, _, _, flag in events if flag not in ("D", "C")}
    fact_ids = {row[0] for row in warehouse_rows(stack, "select event_id from marts.fact_events")}
    assert fact_ids == live
    live_per_code = Counter(code for event_id, code, _, flag in events if flag not in ("D", "C"))
    assert sum(live_per_code.values()) == len(live)

    securities = dict(source_rows(stack, "select security_id, ticker from public.stock_master"))
    current = dict(warehouse_rows(stack, "select security_id, ticker from marts.dim_securities where is_current"))
    assert current == securities


def test_the_example_consumer_is_triggered_by_the_asset_cosmos_emits_for_fact_events(stack, pipeline_run):
    run = airflow.wait_for_new_run(stack.client, "report_corporate_actions", set(), "asset_triggered", timeout=300)
    assert run["state"] == "success"
    run_id = run["dag_run_id"]
    events = stack.client.get(f"/api/v2/dags/report_corporate_actions/dagRuns/{run_id}/upstreamAssetEvents")
    uris = {event["uri"] for event in events["asset_events"]}
    params = conninfo_to_dict(stack.settings.database_url(WAREHOUSE_CONN_ID))
    assert uris == {f"postgres://{params['host']}:{params['port']}/{params['dbname']}/marts/fact_events"}
    xcom = stack.client.get(
        f"/api/v2/dags/report_corporate_actions/dagRuns/{run_id}/taskInstances/count_live_events_by_type"
        "/xcomEntries/return_value"
    )
    live_codes = source_rows(stack, "select event_code from public.edi_690 where action_flag not in ('D', 'C')")
    assert xcom["value"] == dict(Counter(EVENT_TYPES[code] for (code,) in live_codes))


def test_summary_names_tables_nodes_tests_and_the_ui(stack, pipeline_run):
    from include.dbt_project import load_manifest, node_counts

    text = runner.summary(stack.settings, stack.client, pipeline_run, 12.0)
    assert "raw.stock_master" in text and "raw.edi_690" in text and "raw.exchanges" in text
    assert " read      400" in text and " read     4000" in text
    counts = node_counts(load_manifest())
    assert f"    snapshots  {counts['snapshot']} succeeded, 0 failed (of {counts['snapshot']})" in text
    assert f"    models     {counts['model']} succeeded, 0 failed (of {counts['model']})" in text
    assert f"test tasks passed, 0 failed ({counts['test']} tests)" in text
    assert f"Airflow UI: {stack.settings.api_url}" in text
    assert "make stop" in text and "make tick" in text  # the demo is in use


def test_starting_again_while_up_reuses_the_running_airflow(stack, pipeline_run):
    before = airflow.running_components(stack.settings)
    assert set(before) == set(airflow.COMPONENTS)
    runner.up(stack.settings)
    assert airflow.running_components(stack.settings) == before


# --- a batch of changes at the source, then a second ingestion ----------------------------------
# The rest of the story runs on the PostgreSQL 18 stack only: what it adds is Airflow's behaviour
# (Assets, alerts, clearing), which the warehouse's server version does not change, and it costs
# about six minutes a stack. Both servers' engine and dbt behaviour is covered in tests/copy_engine
# and tests/dbt.
on_pg18_stack = pytest.mark.parametrize("stack", ["pg18"], indirect=True)


def table_digest(dsn: str, table: str, key: str) -> tuple[int, str]:
    """Row count and an md5 over every row's text, in key order: equal digests mean equal tables."""
    query = sql.SQL("select count(*), md5(string_agg(t::text, '|' order by {})) from {} as t").format(
        sql.Identifier(key), sql.Identifier(*table.split(".")))
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchone()


def assert_warehouse_equals_source(stack) -> None:
    for table, key in KEYS.items():
        source = table_digest(stack.settings.database_url(SOURCE_CONN_ID), f"public.{table}", key)
        assert table_digest(stack.settings.database_url(WAREHOUSE_CONN_ID), f"raw.{table}", key) == source, table


@pytest.fixture(scope="module")
def second_run(stack, pipeline_run):
    tick(stack.settings.database_url(SOURCE_CONN_ID), seed=11, now=datetime.now(UTC))
    try:
        return runner.trigger_pipeline(stack.client, timeout=900)
    except Exception:
        print(failure_report(stack))
        raise


@on_pg18_stack
def test_the_second_ingestion_copies_only_the_changes(stack, pipeline_run, second_run):
    for table in ("stock_master", "edi_690"):
        first, second = pipeline_run.tables[raw_table_uri(stack, table)], second_run.tables[raw_table_uri(stack, table)]
        total = source_rows(stack, f"select count(*) from public.{table}")[0][0]
        assert second["watermark_before"] == first["watermark_after"], table
        assert second["watermark_after"] > first["watermark_after"], table
        assert 0 < second["rows_read"] < total / 5, table
        assert second["rows_updated"] > 0 and second["validation_match"] is True, table
    # The venues by CDC: exactly the tick's two new, two changed and one removed venue, up to a later position.
    first, second = pipeline_run.tables[raw_table_uri(stack, "exchanges")], second_run.tables[
        raw_table_uri(stack, "exchanges")]
    assert (second["mode"], second["rows_inserted"], second["rows_updated"], second["rows_deleted"]) == ("cdc", 2, 2, 1)
    assert second["watermark_before"] == first["watermark_after"] != second["watermark_after"]
    assert second["validation_match"] is None  # changes have no source snapshot to compare with
    assert_warehouse_equals_source(stack)


@on_pg18_stack
def test_the_second_transform_follows_the_second_ingestion_and_keeps_history(stack, second_run):
    transform = second_run.transform
    assert (transform["run_type"], transform["state"]) == ("asset_triggered", "success")
    events = stack.client.get(
        f"/api/v2/dags/{runner.TRANSFORM_DAG}/dagRuns/{transform['dag_run_id']}/upstreamAssetEvents")
    assert {event["source_run_id"] for event in events["asset_events"]} == {second_run.ingest["dag_run_id"]}

    changed_securities = second_run.tables[raw_table_uri(stack, "stock_master")]["rows_updated"]
    closed = warehouse_rows(stack, "select count(distinct security_id) from snapshots.snp_stock_master "
                                   "where dbt_valid_to is not null")[0][0]
    second_versions = warehouse_rows(stack, "select count(*) from marts.dim_securities where version_number = 2")[0][0]
    assert closed == second_versions == changed_securities > 0
    changed_events = warehouse_rows(stack, "select count(distinct event_id) from snapshots.snp_edi_690 "
                                           "where dbt_valid_to is not null")[0][0]
    assert changed_events == second_run.tables[raw_table_uri(stack, "edi_690")]["rows_updated"] > 0


@on_pg18_stack
def test_pipeline_health_shows_both_runs_of_every_table(stack, second_run):
    health = {row[0]: row[1:] for row in warehouse_rows(
        stack, "select target_table, runs, failed_runs, last_run_status, last_success_rows_read, "
               "last_success_rows_inserted, last_success_rows_updated, last_success_rows_deleted, "
               "last_success_watermark from marts.pipeline_health")}
    assert set(health) == {f"raw.{table}" for table in KEYS}
    for table in KEYS:
        extra = second_run.tables[raw_table_uri(stack, table)]
        assert health[f"raw.{table}"] == (
            2, 0, "success", extra["rows_read"], extra["rows_inserted"], extra["rows_updated"],
            extra["rows_deleted"], extra["watermark_after"]), table


# --- a table that fails, its alert, and the recovery --------------------------------------------


@dataclass
class FailureAndRecovery:
    run_id: str
    failed_run: dict
    failed_tasks: dict[str, int]  # "task_id[table]" -> try number
    alerts: list[str]
    transforms_while_failed: set[str]
    recovered_run: dict
    recovered_tries: dict[str, int]
    transform_after_recovery: dict


@pytest.fixture(scope="module")
def failure_and_recovery(stack, second_run, slack_receiver) -> FailureAndRecovery:
    """stock_master vanishes at the source during an ingestion; then it is back and the failed
    task is cleared, as the runbook says."""
    client, source = stack.client, stack.settings.database_url(SOURCE_CONN_ID)
    known_transforms = {run["dag_run_id"] for run in airflow.dag_runs(client, runner.TRANSFORM_DAG)}
    alerts_before = len(slack_receiver.bodies)
    run_id = f"e2e_failure__{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("alter table public.stock_master rename to stock_master_away")
    try:
        client.post(f"/api/v2/dags/{runner.INGEST_DAG}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
        failed_run = airflow.wait_for_run(client, runner.INGEST_DAG, run_id, timeout=600)
    finally:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("alter table public.stock_master_away rename to stock_master")
    failed_tasks = {task_label(ti): ti["try_number"] for ti in airflow.task_instances(client, runner.INGEST_DAG, run_id)
                    if ti["state"] in ("failed", "upstream_failed")}
    time.sleep(20)  # long enough for the scheduler to have started a transform, had the condition been met
    transforms_while_failed = {run["dag_run_id"] for run in airflow.dag_runs(client, runner.TRANSFORM_DAG)}
    alerts = [body["json"]["text"] for body in slack_receiver.bodies[alerts_before:]]

    client.post(f"/api/v2/dags/{runner.INGEST_DAG}/clearTaskInstances",
                {"dry_run": False, "dag_run_id": run_id, "only_failed": True, "reset_dag_runs": True})
    recovered_run = airflow.wait_for_run(client, runner.INGEST_DAG, run_id, timeout=600)
    ingest_tasks = airflow.task_instances(client, runner.INGEST_DAG, run_id)
    recovered_tries = {task_label(ti): ti["try_number"] for ti in ingest_tasks if task_label(ti) in failed_tasks}
    transform = airflow.wait_for_new_run(client, runner.TRANSFORM_DAG, known_transforms, "asset_triggered", 600)
    return FailureAndRecovery(run_id, failed_run, failed_tasks, alerts, transforms_while_failed - known_transforms,
                              recovered_run, recovered_tries, transform)


@on_pg18_stack
def test_a_failing_table_fails_its_task_alerts_and_does_not_trigger_the_transform(stack, failure_and_recovery):
    failure = failure_and_recovery
    assert failure.failed_run["state"] == "failed"
    # Only the missing table's task failed, at once (a missing table is not retried); the others loaded.
    assert failure.failed_tasks == {"sync_table[stock_master]": 1}
    [alert] = failure.alerts
    assert alert.splitlines()[0] == "Task failed: ingest_raw_tables.sync_table [stock_master], try 1"
    assert "stock_master: source table public.stock_master does not exist" in alert
    assert f"/dags/ingest_raw_tables/runs/{failure.run_id}/" in alert
    assert failure.transforms_while_failed == set()


@on_pg18_stack
def test_clearing_the_failed_task_recovers_without_gaps_or_duplicates(stack, failure_and_recovery):
    failure = failure_and_recovery
    assert failure.recovered_run["state"] == "success"
    assert failure.recovered_tries == {"sync_table[stock_master]": 2}
    transform = failure.transform_after_recovery
    assert transform["state"] == "success"
    events = stack.client.get(
        f"/api/v2/dags/{runner.TRANSFORM_DAG}/dagRuns/{transform['dag_run_id']}/upstreamAssetEvents")
    assert {event["source_run_id"] for event in events["asset_events"]} == {failure.run_id}
    assert_warehouse_equals_source(stack)
    health = dict(warehouse_rows(stack, "select target_table, (runs, failed_runs, last_run_status)::text "
                                        "from marts.pipeline_health"))
    assert health == {"raw.stock_master": "(4,1,success)", "raw.edi_690": "(3,0,success)",
                      "raw.exchanges": "(3,0,success)"}


# --- a bad row makes one model's test fail; fixing it and clearing the task completes the run ----

STG_EVENTS_TEST = "dbt.models.staging.stg_edi_690.test"


@dataclass
class FailingTest:
    run_id: str
    failed_run: dict
    failed_states: dict[str, str]
    alerts: list[str]
    recovered_run: dict
    recovered_states: dict[str, str]


@pytest.fixture(scope="module")
def failing_test(stack, failure_and_recovery, slack_receiver) -> FailingTest:
    """One raw event gets an action flag dbt's accepted_values test on stg_edi_690 rejects; the
    transform runs; then the row is put back and the failed test task is cleared, as the runbook says."""
    client, warehouse = stack.client, stack.settings.database_url(WAREHOUSE_CONN_ID)
    with psycopg.connect(warehouse, autocommit=True) as conn:
        event_id, flag = conn.execute(
            "select event_id, action_flag from raw.edi_690 where action_flag = 'I' order by event_id limit 1"
        ).fetchone()
        conn.execute("update raw.edi_690 set action_flag = 'X' where event_id = %s", (event_id,))
    alerts_before = len(slack_receiver.bodies)
    run_id = f"e2e_bad_row__{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
    try:
        client.post(f"/api/v2/dags/{runner.TRANSFORM_DAG}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
        failed_run = airflow.wait_for_run(client, runner.TRANSFORM_DAG, run_id, timeout=900)
        failed_states = {ti["task_id"]: ti["state"]
                         for ti in airflow.task_instances(client, runner.TRANSFORM_DAG, run_id)}  # fmt: skip
        alerts = [body["json"]["text"] for body in slack_receiver.bodies[alerts_before:]]
    finally:
        with psycopg.connect(warehouse, autocommit=True) as conn:
            conn.execute("update raw.edi_690 set action_flag = %s where event_id = %s", (flag, event_id))
    client.post(f"/api/v2/dags/{runner.TRANSFORM_DAG}/clearTaskInstances",
                {"dry_run": False, "dag_run_id": run_id, "task_ids": [STG_EVENTS_TEST], "include_downstream": True,
                 "only_failed": False, "reset_dag_runs": True})  # fmt: skip
    recovered_run = airflow.wait_for_run(client, runner.TRANSFORM_DAG, run_id, timeout=900)
    recovered_states = {ti["task_id"]: ti["state"]
                        for ti in airflow.task_instances(client, runner.TRANSFORM_DAG, run_id)}  # fmt: skip
    return FailingTest(run_id, failed_run, failed_states, alerts, recovered_run, recovered_states)


def _downstream_of(stack, task_id: str) -> set[str]:
    tasks = {t["task_id"]: t for t in stack.client.get(f"/api/v2/dags/{runner.TRANSFORM_DAG}/tasks")["tasks"]}
    found, todo = set(), [task_id]
    while todo:
        for child in tasks[todo.pop()]["downstream_task_ids"]:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@on_pg18_stack
def test_a_failing_dbt_test_fails_its_own_task_stops_its_dependents_and_alerts(stack, failing_test):
    states = failing_test.failed_states
    assert failing_test.failed_run["state"] == "failed"
    assert states[STG_EVENTS_TEST] == "failed"
    dependents = _downstream_of(stack, STG_EVENTS_TEST) - {"dbt.dbt_producer_watcher_done"}
    assert {"dbt.models.marts.fact_events.run", "dbt.models.intermediate.int_event_summary.run"} <= dependents
    assert {states[task] for task in dependents} == {"upstream_failed"}
    # What does not read stg_edi_690 ran and passed.
    assert states["dbt.models.marts.dim_securities.test"] == states["dbt.models.staging.stg_stock_master.test"] == (
        "success")
    node_failures = [t for t, state in states.items() if state == "failed" and runner.dbt_task_kind(t)]
    assert node_failures == [STG_EVENTS_TEST]
    [alert] = [a for a in failing_test.alerts if STG_EVENTS_TEST in a]
    assert alert.splitlines()[0].startswith(f"Task failed: {runner.TRANSFORM_DAG}.{STG_EVENTS_TEST}")
    # The error names the failing test (and so its model) and what dbt found.
    assert "accepted_values_stg_edi_690_action_flag" in alert and "Got 1 result" in alert


@on_pg18_stack
def test_clearing_the_failed_test_after_the_fix_completes_the_run_with_right_marts(stack, failing_test):
    assert failing_test.recovered_run["state"] == "success"
    states = failing_test.recovered_states
    assert {states[t] for t in _downstream_of(stack, STG_EVENTS_TEST) | {STG_EVENTS_TEST}} == {"success"}
    events = source_rows(stack, "select event_id, action_flag from public.edi_690")
    live = {event_id for event_id, flag in events if flag not in ("D", "C")}
    assert {row[0] for row in warehouse_rows(stack, "select event_id from marts.fact_events")} == live

