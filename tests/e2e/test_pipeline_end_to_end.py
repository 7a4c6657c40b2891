"""The whole pipeline with a real Airflow: ingestion by hand, the transform by Asset events only.

Runs once with the warehouse on the embedded PostgreSQL 18 and once on the machine's PostgreSQL 15.
"""

from __future__ import annotations

from collections import Counter

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from include.local_stack import airflow, runner
from include.local_stack.settings import SOURCE_CONN_ID, WAREHOUSE_CONN_ID

pytestmark = pytest.mark.e2e

# The feed's event codes and the readable types the models give them.
EVENT_TYPES = {"DIV": "dividend", "SD": "split", "CONSD": "consolidation", "BON": "bonus_issue",
               "RTS": "rights_issue", "MRGR": "merger", "DMRGR": "demerger", "CAPRD": "capital_reduction"}  # fmt: skip


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
    assert set(pipeline_run.tables) == {raw_table_uri(stack, "stock_master"), raw_table_uri(stack, "edi_690")}
    assert pipeline_run.tables[raw_table_uri(stack, "stock_master")]["rows_inserted"] == securities
    assert pipeline_run.tables[raw_table_uri(stack, "edi_690")]["rows_inserted"] == events
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
    assert triggered_by == {(raw_table_uri(stack, t), ingest_run) for t in ("stock_master", "edi_690")}
    states = pipeline_run.task_states[runner.TRANSFORM_DAG]
    assert set(states) == {"success"}
    assert states["success"] >= 10, "every dbt node should be its own task"


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
    text = runner.summary(stack.settings, stack.client, pipeline_run, 12.0)
    assert "raw.stock_master" in text and "raw.edi_690" in text
    assert " read      400" in text and " read     4000" in text
    assert "tests:" in text and " 0 failed" in text
    assert f"Airflow UI: {stack.settings.api_url}" in text
    assert "make stop" in text


def test_starting_again_while_up_reuses_the_running_airflow(stack, pipeline_run):
    before = airflow.running_components(stack.settings)
    assert set(before) == set(airflow.COMPONENTS)
    runner.up(stack.settings)
    assert airflow.running_components(stack.settings) == before
