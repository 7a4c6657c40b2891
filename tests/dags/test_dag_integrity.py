"""Every DAG file imports, states what operators rely on, and parses fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import pytest

from tests.dags.conftest import DAGS_FOLDER, PROJECT_ROOT, airflow_test_environment

EXPECTED_DAGS = {"ingest_raw_tables", "transform_dbt", "dbt_docs", "report_corporate_actions"}


def test_every_dag_file_imports_without_error(dag_bag):
    assert dag_bag.import_errors == {}
    assert EXPECTED_DAGS <= set(dag_bag.dag_ids)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_DAGS))
def test_dag_states_tags_retries_doc_and_schedule_basics(dag_bag, dag_id):
    dag = dag_bag.dags[dag_id]
    assert dag.tags, f"{dag_id} has no tags"
    assert dag.doc_md and len(dag.doc_md) > 100, f"{dag_id} has no Markdown doc"
    assert dag.catchup is False
    assert dag.start_date.tzinfo is not None and dag.start_date.utcoffset() == UTC.utcoffset(None)
    for task in dag.tasks:
        assert task.retries >= 2, f"{dag_id}.{task.task_id} retries only {task.retries} times"


def test_ingestion_maps_one_task_per_configured_table(dag_bag):
    from include.ingestion import configured_tables

    dag = dag_bag.dags["ingest_raw_tables"]
    sync = dag.get_task("sync_table")
    assert sync.map_index_template == "{{ table_name }}"
    assert sync.pool == "source_postgres"
    names = [table.name for table in configured_tables()]
    assert set(names) >= {"stock_master", "edi_690"}
    # Large tables (parallel: N) have a task group of their own instead: see the next test.
    assert sync.op_kwargs_expand_input.value["table_name"] == [t.name for t in configured_tables() if t.parallel == 1]


def test_a_large_table_is_copied_by_key_range_tasks_on_one_snapshot(dag_bag):
    from include.ingestion import configured_tables

    dag = dag_bag.dags["ingest_raw_tables"]
    large = [table.name for table in configured_tables() if table.parallel > 1]
    assert "edi_690" in large
    for name in large:
        group = f"sync_{name}"
        plan, hold, ranges, finish = (dag.get_task(f"{group}.{step}")
                                      for step in ("plan", "hold_snapshot", "copy_range", "finish"))
        assert plan.upstream_task_ids == {"check_connections"}
        assert hold.upstream_task_ids == {plan.task_id} and hold.downstream_task_ids == set()
        assert ranges.upstream_task_ids == {plan.task_id}
        assert finish.upstream_task_ids == {plan.task_id, ranges.task_id}
        # Skipped ranges (an incremental run has none) must not skip the finish step.
        assert finish.trigger_rule == "none_failed"
        assert ranges.map_index_template == "{{ key_range }}"
        assert ranges.op_kwargs_expand_input.value["part"].operator is plan
        assert ranges.partial_kwargs["op_kwargs"] == {"table_name": name}
        # The holder waits for the ranges, so it must not wait for a slot of the pool they use.
        assert (plan.pool, ranges.pool, finish.pool) == ("source_postgres",) * 3
        assert hold.pool != "source_postgres" and hold.priority_weight > ranges.priority_weight
        assert [outlet.name for outlet in finish.outlets] == ["raw_tables"]


def test_transform_is_scheduled_on_every_raw_table_asset(dag_bag):
    from include.ingestion import configured_tables
    from include.pipeline import warehouse_table_uri

    dag = dag_bag.dags["transform_dbt"]
    condition = dag.timetable.asset_condition
    assert type(condition).__name__ == "AssetAll"
    assert {asset.uri for asset in condition.objects} == {warehouse_table_uri(t.target) for t in configured_tables()}


def _manifest() -> dict:
    return json.loads((PROJECT_ROOT / "dbt" / "target" / "manifest.json").read_text())


def test_transform_renders_every_dbt_node_once_in_one_group_by_folder_after_its_upstream(dag_bag):
    """Generated from the manifest: every snapshot, seed and model is one task, in the task group of its
    folder, downstream of the tasks of the nodes it reads; each model's tests are a task right after it."""
    from include.dbt_config import DBT_EXECUTION_MODE

    dag = dag_bag.dags["transform_dbt"]
    nodes = {uid: node for uid, node in _manifest()["nodes"].items()
             if node["resource_type"] in ("model", "snapshot", "seed")}  # fmt: skip
    assert nodes
    task_of = {}
    for uid, node in nodes.items():
        folders = ".".join(Path(node["original_file_path"]).parts[:-1])
        kind = {"model": "run"}.get(node["resource_type"], node["resource_type"])
        names = (f"dbt.{folders}.{node['name']}.{kind}", f"dbt.{folders}.{node['name']}_{kind}")
        matching = [t for t in dag.task_ids if t in names]
        assert len(matching) == 1, f"{uid}: {matching}"
        task_of[uid] = matching[0]
    for uid, node in nodes.items():
        task = dag.get_task(task_of[uid])
        upstream = task.get_flat_relative_ids(upstream=True)
        for parent in node["depends_on"]["nodes"]:
            if parent in task_of:
                assert task_of[parent] in upstream, f"{uid} does not wait for {parent}"
        tested = any(uid in t["depends_on"]["nodes"] for t in _manifest()["nodes"].values()
                     if t["resource_type"] == "test")  # fmt: skip
        if tested and task_of[uid].endswith(f".{task_of[uid].rsplit('.', 1)[-1]}"):
            test_task = task_of[uid].rsplit(".", 1)[0] + ".test"
            assert dag.get_task(test_task).upstream_task_ids == {task_of[uid]}
    if DBT_EXECUTION_MODE == "watcher":
        producers = [t for t in dag.task_ids if t.endswith("dbt_producer_watcher")]
        assert producers == ["dbt.dbt_producer_watcher"], "one dbt build for the whole project"
        sensor = dag.get_task(task_of[next(iter(nodes))])
        assert (sensor.poke_interval, sensor.deferrable) == (1, False)


def test_sources_with_freshness_are_checked_from_the_manifest(dag_bag):
    dag = dag_bag.dags["transform_dbt"]
    fresh = [uid for uid, source in _manifest()["sources"].items()
             if any((source.get("freshness") or {}).get(level) for level in ("warn_after", "error_after"))]  # fmt: skip
    rendered = [t for t in dag.task_ids if t.endswith(("source", "_source"))]
    assert len(rendered) == len(fresh) > 0


def test_a_selector_matching_no_node_fails_at_parse_time_naming_it(dag_bag):
    from airflow.sdk import DAG

    from include.dbt_config import DbtSelectionError, transform_task_group

    with pytest.raises(DbtSelectionError, match="'path:models/nowhere'"):
        with DAG("selection_probe", schedule=None):
            transform_task_group(select=["path:models/nowhere"])


def test_docs_follow_every_final_model_of_the_project(dag_bag):
    from include.pipeline import warehouse_table_uri

    nodes = _manifest()["nodes"]
    models = {uid: n for uid, n in nodes.items() if n["resource_type"] == "model"}
    read = {parent for n in models.values() for parent in n["depends_on"]["nodes"]}
    finals = {warehouse_table_uri(f"{n['schema']}.{n['alias']}") for uid, n in models.items() if uid not in read}
    dag = dag_bag.dags["dbt_docs"]
    condition = dag.timetable.asset_condition
    assert type(condition).__name__ == "AssetAll"
    assert {asset.uri for asset in condition.objects} == finals
    assert [task.task_id for task in dag.tasks] == ["dbt_docs"]


def test_parsing_the_dags_folder_takes_under_two_seconds(tmp_path):
    """Measured in a fresh interpreter, Cosmos import included, as the dag-processor sees it."""
    script = (
        "import json, time\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "started = time.perf_counter()\n"
        f"bag = DagBag(dag_folder={str(DAGS_FOLDER)!r})\n"
        "print(json.dumps({'seconds': time.perf_counter() - started, 'dags': len(bag.dags),"
        " 'errors': len(bag.import_errors)}))\n"
    )
    env = dict(os.environ, **airflow_test_environment(tmp_path), PYTHONPATH=str(PROJECT_ROOT))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["errors"] == 0 and measured["dags"] >= len(EXPECTED_DAGS)
    assert measured["seconds"] < 2.0, f"parsing dags/ took {measured['seconds']:.2f}s"


def test_ruff_with_airflow3_rules_passes_on_dags_and_include():
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ruff"), "check", "dags", "include", "config"],
        cwd=PROJECT_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_consumer_waits_for_the_asset_cosmos_emits_for_fact_events(dag_bag):
    from include.pipeline import warehouse_table_uri

    dag = dag_bag.dags["report_corporate_actions"]
    assert [asset.uri for asset in dag.timetable.asset_condition.objects] == [warehouse_table_uri("marts.fact_events")]
