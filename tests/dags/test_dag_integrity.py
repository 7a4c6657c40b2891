"""Every DAG file imports, states what operators rely on, and parses fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, timedelta
from pathlib import Path

import pytest

from tests.dags.conftest import DAGS_FOLDER, PROJECT_ROOT, airflow_test_environment

EXPECTED_DAGS = {"ingest_raw_tables", "transform_dbt", "dbt_docs"}


def demo_in_use() -> bool:
    from include.local_stack.runner import demo_in_use

    return demo_in_use()


def demo_dbt_project() -> bool:
    from include.dbt_project import project_name

    return project_name() == "postgres_analytics"


# The example consumer exists only when the dbt project builds its mart (the demo's does).
def consumer_expected() -> bool:
    from include.dbt_project import load_manifest, relation_in_manifest

    return relation_in_manifest(load_manifest(), "marts.fact_events")


demo_only = pytest.mark.skipif("not demo_in_use()", reason="asserts the demo's tables; your own are configured")


def test_every_dag_file_imports_without_error(dag_bag):
    assert dag_bag.import_errors == {}
    expected = EXPECTED_DAGS | ({"report_corporate_actions"} if consumer_expected() else set())
    assert set(dag_bag.dag_ids) == expected


def test_dag_states_tags_retries_doc_and_schedule_basics(dag_bag):
    for dag in dag_bag.dags.values():
        _states_the_basics(dag)


def _states_the_basics(dag):
    dag_id = dag.dag_id
    assert dag.tags, f"{dag_id} has no tags"
    assert dag.doc_md and len(dag.doc_md) > 100, f"{dag_id} has no Markdown doc"
    assert dag.catchup is False
    assert dag.start_date.tzinfo is not None and dag.start_date.utcoffset() == UTC.utcoffset(None)
    for task in dag.tasks:
        assert task.retries >= 2, f"{dag_id}.{task.task_id} retries only {task.retries} times"
        assert task.retry_delay == timedelta(seconds=30) and task.retry_exponential_backoff, task.task_id


def test_the_first_retry_delay_is_a_setting_and_a_bad_value_names_it(monkeypatch):
    from include.pipeline import retry_delay

    monkeypatch.setenv("PIPELINE_RETRY_DELAY_S", "2")
    assert retry_delay() == timedelta(seconds=2)
    for bad in ("0", "soon"):
        monkeypatch.setenv("PIPELINE_RETRY_DELAY_S", bad)
        with pytest.raises(ValueError, match=f"PIPELINE_RETRY_DELAY_S='{bad}': give the first retry's delay"):
            retry_delay()


def test_ingestion_maps_one_task_per_configured_table(dag_bag):
    from include.ingestion import configured_tables

    dag = dag_bag.dags["ingest_raw_tables"]
    sync = dag.get_task("sync_table")
    assert sync.map_index_template == "{{ table_name }}"
    assert sync.pool == "source_postgres"
    # Large tables (parallel: N) have a task group of their own instead: see the next test.
    assert sync.op_kwargs_expand_input.value["table_name"] == [t.name for t in configured_tables() if t.parallel == 1]


def test_a_large_table_is_copied_by_key_range_tasks_on_one_snapshot(dag_bag):
    from include.ingestion import configured_tables

    dag = dag_bag.dags["ingest_raw_tables"]
    large = [table.name for table in configured_tables() if table.parallel > 1]
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


@demo_only
def test_the_demo_copies_its_two_tables_one_of_them_by_key_ranges():
    from include.ingestion import configured_tables

    tables = {table.name: table for table in configured_tables()}
    assert set(tables) >= {"stock_master", "edi_690"}
    assert tables["edi_690"].parallel > 1 and tables["stock_master"].parallel == 1


def test_ingestion_runs_on_the_schedule_of_the_table_configuration(dag_bag):
    import yaml

    from include.ingestion import DEFAULT_SCHEDULE, configured_tables
    from include.pipeline import TABLES_CONFIG

    configured = (yaml.safe_load(TABLES_CONFIG.read_text()) or {}).get("schedule", DEFAULT_SCHEDULE)
    expected = None if str(configured).lower() in ("none", "null", "") or not configured_tables() else configured
    assert dag_bag.dags["ingest_raw_tables"].schedule == expected


def test_transform_is_scheduled_on_every_raw_table_asset(dag_bag):
    from include.ingestion import configured_tables
    from include.pipeline import warehouse_table_uri

    dag = dag_bag.dags["transform_dbt"]
    if not configured_tables():  # a dbt-only project: the configuration's schedule instead
        assert type(dag.timetable).__name__ != "AssetTriggeredTimetable"
        return
    condition = dag.timetable.asset_condition
    assert type(condition).__name__ == "AssetAll"
    assert {asset.uri for asset in condition.objects} == {warehouse_table_uri(t.target) for t in configured_tables()}


def test_transform_renders_every_dbt_node_once_and_its_tests_after_it(dag_bag):
    """Generated from the manifest: holds for any dbt project in place of the demo's."""
    from include.dbt_project import load_manifest, task_nodes

    manifest = load_manifest()
    dag = dag_bag.dags["transform_dbt"]
    nodes = task_nodes(manifest, list(dag.task_ids))
    runs = {}
    for task_id, (unique_id, kind) in nodes.items():
        if kind != "test":
            assert unique_id not in runs, f"{unique_id} is rendered twice: {runs[unique_id]} and {task_id}"
            runs[unique_id] = task_id
    expected = {uid for uid, node in manifest["nodes"].items()
                if node["resource_type"] in ("seed", "snapshot", "model")}  # fmt: skip
    assert set(runs) == expected
    tested = {uid for node in manifest["nodes"].values() if node["resource_type"] == "test"
              for uid in node.get("depends_on", {}).get("nodes", []) if uid in expected}  # fmt: skip
    test_tasks = {unique_id: task_id for task_id, (unique_id, kind) in nodes.items() if kind == "test"}
    for unique_id, task_id in test_tasks.items():
        assert runs[unique_id] in dag.get_task(task_id).get_flat_relative_ids(upstream=True), (
            f"the tests of {unique_id} ({task_id}) do not wait for it")
    assert set(test_tasks) <= tested and test_tasks, "tests are not rendered as tasks after their nodes"
    # dbt's graph orders the tasks: a node's task waits for the tasks of the nodes it depends on.
    for unique_id, task_id in runs.items():
        upstream = dag.get_task(task_id).get_flat_relative_ids(upstream=True)
        for parent in manifest["nodes"][unique_id].get("depends_on", {}).get("nodes", []):
            if parent in runs:
                assert runs[parent] in upstream, f"{task_id} does not wait for {runs[parent]}"


def _manifest() -> dict:
    from include.dbt_project import load_manifest

    return load_manifest()


def test_transform_renders_every_dbt_node_once_in_one_group_by_folder_after_its_upstream(dag_bag):
    """Generated from the manifest: every snapshot, seed and model is one task, in the task group of its
    folder, downstream of the tasks of the nodes it reads; each model's tests are a task right after it."""
    from include.dbt_config import DBT_EXECUTION_MODE, DBT_WATCHER_TASKS

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
        for parent in node["depends_on"].get("nodes", []):
            if parent in task_of:
                assert task_of[parent] in upstream, f"{uid} does not wait for {parent}"
        tested = any(uid in t["depends_on"].get("nodes", []) for t in _manifest()["nodes"].values()
                     if t["resource_type"] == "test")  # fmt: skip
        if tested and task_of[uid].endswith(f".{task_of[uid].rsplit('.', 1)[-1]}"):
            test_task = task_of[uid].rsplit(".", 1)[0] + ".test"
            assert dag.get_task(test_task).upstream_task_ids == {task_of[uid]}
    if DBT_EXECUTION_MODE == "watcher":
        producers = [t for t in dag.task_ids if t.endswith("dbt_producer_watcher")]
        assert producers == ["dbt.dbt_producer_watcher"], "one dbt build for the whole project"
        sensor = dag.get_task(task_of[next(iter(nodes))])
        assert (sensor.poke_interval, sensor.deferrable) == (1, DBT_WATCHER_TASKS != "worker")
        assert sensor.start_from_trigger is (DBT_WATCHER_TASKS == "triggerer")


def test_watcher_node_tasks_wait_in_the_triggerer_and_one_task_emits_the_built_assets(dag_bag):
    """Generated from the manifest: every node task of the watcher group defers to our trigger, built
    from the very arguments Cosmos gives its own, watching its node (a model's tests: each of its
    tests); one task after the producer emits the Asset of every built node, and no node task does."""
    from airflow.sdk.exceptions import TaskDeferred
    from cosmos.operators._watcher.triggerer import WatcherTrigger

    from include.dbt_config import DBT_EXECUTION_MODE, DBT_WATCHER_TASKS, test_owners
    from include.dbt_watcher import TRIGGER_CLASS

    if DBT_EXECUTION_MODE != "watcher" or DBT_WATCHER_TASKS == "worker":
        pytest.skip("the node tasks wait in the triggerer only in watcher mode, unless DBT_WATCHER_TASKS=worker")
    from airflow.serialization.serialized_objects import BaseSerialization, DagSerialization

    dag = dag_bag.dags["transform_dbt"]
    nodes = _manifest()["nodes"]
    node_tasks = [t for t in dag.tasks if getattr(t, "model_unique_id", None)]
    # What the scheduler reads: the serialized DAG starts each node task as our trigger.
    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert len(node_tasks) >= len([n for n in nodes.values() if n["resource_type"] in ("model", "snapshot", "seed")])
    for task in node_tasks:
        assert (task.deferrable, task.poke_interval, task.emit_datasets) == (True, 1, False), task.task_id
        # Wrapped to say what dbt found on failure, under their own names: Airflow resumes a deferred
        # task by the method name it deferred with.
        assert (task.execute.__name__, task.execute_complete.__name__) == ("execute", "execute_complete")
        assert "dbt_watcher" in task.execute_complete.__code__.co_filename, task.task_id
        cosmos_trigger = WatcherTrigger(model_unique_id=task.model_unique_id, producer_task_id=task.producer_task_id,
                                        dag_id=dag.dag_id, run_id="a_run", map_index=-1, poke_interval=1,
                                        is_test_sensor=task.is_test_sensor)  # fmt: skip
        with pytest.raises(TaskDeferred) as deferred:
            task.defer(trigger=cosmos_trigger, method_name="execute_complete")
        trigger_class, kwargs = deferred.value.trigger.serialize()
        assert trigger_class == TRIGGER_CLASS
        assert {k: v for k, v in kwargs.items() if k not in ("watched", "success_callback")} == (
            cosmos_trigger.serialize()[1])
        # No success callback: the triggerer ends it without a callback request (include/triggerer_setup.py).
        assert kwargs["success_callback"] is False, task.task_id
        # Started by the scheduler in the triggerer with the same arguments, but for the run: the
        # trigger takes it from the task instance the triggerer hands it.
        scheduled = serialized.get_task(task.task_id)
        assert scheduled.start_from_trigger is (DBT_WATCHER_TASKS == "triggerer"), task.task_id
        if DBT_WATCHER_TASKS == "triggerer":
            start = scheduled.start_trigger_args
            assert (start.trigger_cls, start.next_method) == (TRIGGER_CLASS, "execute_complete")
            assert BaseSerialization.deserialize(start.trigger_kwargs) == {
                k: v for k, v in kwargs.items() if k not in ("dag_id", "run_id", "map_index")}
        if task.task_id.endswith(".test"):
            tests = sorted(uid for uid, n in nodes.items()
                           if n["resource_type"] == "test" and task.model_unique_id in test_owners(n))
            assert kwargs["watched"] == tests and tests, task.task_id
        else:
            assert kwargs["watched"] == [task.model_unique_id]
    producer = dag.get_task("dbt.dbt_producer_watcher")
    for model, tests in producer.tests_per_model.items():  # the producer counts the same tests per model
        assert tests == [t for t in tests if model in test_owners(nodes[t])], model
    assert vars(producer)["execute"].__name__ == "execute_with_queued_pushes"  # its node results: QueuedXComPushes
    emitter = dag.get_task("dbt.emit_built_assets")
    assert emitter.upstream_task_ids == {"dbt.dbt_producer_watcher"}
    assert emitter.trigger_rule == "all_done"
    assert [type(o).__name__ for o in emitter.outlets] == ["AssetAlias"]
    built = {uid for uid, n in nodes.items() if n["resource_type"] in ("model", "snapshot", "seed")}
    assert built <= set(emitter.op_kwargs["unique_ids"])


def test_a_test_of_several_models_counts_for_the_one_that_reads_the_others():
    """Generated from the manifest: a test's owners are among its parents, none of them upstream of
    another parent; a generic test between two models that do not read each other counts for the
    model it is defined on. So dim_securities' tests never wait for the facts that refer to it."""
    from include.dbt_config import _ancestors, test_owners

    nodes, ancestors = _manifest()["nodes"], _ancestors()
    tests = {uid: n for uid, n in nodes.items() if n["resource_type"] == "test"}
    several = {uid: n for uid, n in tests.items() if len(set(n["depends_on"]["nodes"])) > 1}
    assert several, "the demo project has tests of two models (relationships, singular tests)"
    for uid, test in tests.items():
        parents, owners = set(test["depends_on"]["nodes"]), test_owners(test)
        assert owners and set(owners) <= parents, uid
        assert not any(owner in ancestors.get(other, ()) for owner in owners for other in parents), uid
        if len(parents) > 1 and test.get("attached_node"):
            assert owners == [test["attached_node"]] or test["attached_node"] in ancestors.get(owners[0], ()), uid
    dim = "model.postgres_analytics.dim_securities"
    assert not [uid for uid, t in several.items() if dim in test_owners(t) and uid.split(".")[2].startswith("fact")]


def test_sources_with_freshness_are_checked_from_the_manifest(dag_bag):
    dag = dag_bag.dags["transform_dbt"]
    from include.dbt_project import sources_with_freshness

    fresh = sources_with_freshness(_manifest())  # a threshold with a count, not dbt's empty default
    rendered = [t for t in dag.task_ids if t.endswith(("source", "_source"))]
    assert len(rendered) == len(fresh)  # none when no source has a threshold (the demo's raw ones have)
    if demo_dbt_project():
        assert fresh


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

    if not consumer_expected():
        assert "report_corporate_actions" not in dag_bag.dags  # skipped: nothing builds its mart
        return
    dag = dag_bag.dags["report_corporate_actions"]
    assert [asset.uri for asset in dag.timetable.asset_condition.objects] == [warehouse_table_uri("marts.fact_events")]
