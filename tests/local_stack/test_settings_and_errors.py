"""The local stack's own behaviour on bad input: clear messages, no second copy of anything."""

from __future__ import annotations

import os

import pytest

from include import pipeline
from include.local_stack import runner
from include.local_stack.airflow import airflow_connection_uri
from include.local_stack.postgres import free_port
from include.local_stack.settings import StackSettings, load_airflow_settings, mask_password
from include.pipeline import ConnectionProblem, check_database


def test_airflow_settings_define_both_connections_and_the_source_pool():
    declared = load_airflow_settings()
    assert {c["conn_id"] for c in declared["connections"]} == {"source_postgres", "warehouse_postgres"}
    assert [p["pool_name"] for p in declared["pools"]] == ["source_postgres"]


def test_passwords_are_masked_and_survive_the_connection_uri():
    dsn = "postgresql://loader:s3cr%2Ft@db.example:6543/warehouse"
    assert "s3cr" not in mask_password(dsn)
    assert "***" in mask_password(dsn)
    assert airflow_connection_uri(dsn) == "postgres://loader:s3cr%2Ft@db.example:6543/warehouse"


def test_unreachable_warehouse_url_names_the_connection_and_the_fix(server_dirs):
    port = free_port()
    settings = StackSettings(
        data_dir=server_dirs("unreachable") / "data",
        postgres_port=free_port(),
        warehouse_url=f"postgresql://loader:hunter2@127.0.0.1:{port}/warehouse",
    )
    try:
        with pytest.raises(runner.StackError) as raised:
            runner.start_databases(settings)
    finally:
        runner.embedded_postgres(settings).stop()
    message = str(raised.value)
    assert "warehouse_postgres" in message and "WAREHOUSE_DATABASE_URL" in message
    assert f"127.0.0.1 port={port}" in message or f":{port}" in message
    assert "hunter2" not in message


def test_check_database_names_the_connection_and_how_to_fix_it():
    port = free_port()
    with pytest.raises(ConnectionProblem) as raised:
        check_database("source_postgres", f"host=127.0.0.1 port={port} dbname=source user=u password=pw")
    message = str(raised.value)
    assert message.startswith(f"Airflow connection 'source_postgres' (u@127.0.0.1:{port}/source) cannot be reached")
    assert "airflow_settings.yaml" in message and "pw" not in message.replace("password", "")


def test_check_database_reports_the_server_version(pg15):
    assert check_database("warehouse_postgres", pg15.admin_dsn).startswith("warehouse_postgres: ")
    assert "(PostgreSQL 15." in check_database("warehouse_postgres", pg15.admin_dsn)


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_the_lock(tmp_path):
    settings = StackSettings(data_dir=tmp_path / "data")
    with runner.exclusive(settings):
        with pytest.raises(runner.StackError, match="Another `make run` or `make stop`"):
            with runner.exclusive(settings):
                pass
    with runner.exclusive(settings):  # released afterwards
        pass


def test_tables_config_is_chosen_per_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(pipeline, "PROJECT_ROOT", tmp_path.parent)
    (tmp_path / "production").mkdir()
    (tmp_path / "production" / "tables.yml").write_text("tables: []\n")
    monkeypatch.delenv(pipeline.ENVIRONMENT_VARIABLE, raising=False)
    assert pipeline.tables_config_path() == tmp_path / "tables.yml"
    monkeypatch.setenv(pipeline.ENVIRONMENT_VARIABLE, "production")
    assert pipeline.tables_config_path() == tmp_path / "production" / "tables.yml"
    monkeypatch.setenv(pipeline.ENVIRONMENT_VARIABLE, "staging")
    with pytest.raises(pipeline.ConfigFileMissing) as raised:
        pipeline.tables_config_path()
    assert str(raised.value) == (
        f"PIPELINE_ENVIRONMENT='staging' but {tmp_path.name}/staging/tables.yml does not exist; "
        "create it (the format is in docs/copy_engine.md) or unset PIPELINE_ENVIRONMENT")


def test_a_changed_project_file_drops_the_project_modules_but_never_main(tmp_path, monkeypatch):
    """The entry script (.venv/bin/airflow) lives inside the project; dropping `__main__` broke dbt."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.spec_from_file_location("local_settings_under_test",
                                                  pipeline.PROJECT_ROOT / "config" / "airflow_local_settings.py")
    settings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(settings)
    project_module = tmp_path / "edited.py"
    project_module.write_text("")
    monkeypatch.setattr(settings, "PROJECT_ROOT", tmp_path.parent)
    main = types.ModuleType("__main__")
    main.__file__ = str(tmp_path / "airflow")  # the entry script, inside the project
    (tmp_path / "airflow").write_text("")
    edited = types.ModuleType("edited")
    edited.__file__ = str(project_module)
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setitem(sys.modules, "edited", edited)
    settings.remember_project_modules()
    assert "edited" in settings._project_modules and "__main__" not in settings._project_modules
    os.utime(project_module, ns=(1, 1))
    settings.forget_changed_project_modules()
    assert "edited" not in sys.modules and sys.modules["__main__"] is main


def test_a_forked_dag_parse_reuses_the_built_dag_until_an_input_or_setting_changes(tmp_path, monkeypatch):
    """The transform DAG's inputs: its file, the manifest and tables.yml (the schedule's Assets)."""
    builds = []

    def build():
        builds.append(object())
        return builds[-1]

    dag_file, manifest, tables = (tmp_path / name for name in ("dag.py", "manifest.json", "tables.yml"))
    dag_file.write_text("")
    manifest.write_text("{}")
    assert pipeline.built_once(build, dag_file, manifest, tables) is builds[0]  # tables.yml not there yet
    assert pipeline.built_once(build, dag_file, manifest, tables) is builds[0] and len(builds) == 1
    tables.write_text("tables: []")
    assert pipeline.built_once(build, dag_file, manifest, tables) is builds[1]
    os.utime(tables, ns=(1, 1))
    assert pipeline.built_once(build, dag_file, manifest, tables) is builds[2]
    monkeypatch.setenv("DBT_WATCHER_TASKS", "worker")
    assert pipeline.built_once(build, dag_file, manifest, tables) is builds[3]
    assert pipeline.built_once(build, dag_file, manifest, tables) is builds[3] and len(builds) == 4


def test_the_summary_says_what_was_validated_for_each_copied_table():
    uri = "postgres://127.0.0.1:55432/warehouse/raw/exchanges"
    cdc = {"mode": "cdc", "rows_read": 5, "rows_inserted": 2, "rows_updated": 2, "rows_deleted": 1,
           "validation_match": None}
    assert runner.table_line(uri, cdc) == (
        "    raw.exchanges            cdc          read        5  +2 ~2 -1  not validated")
    full = {**cdc, "mode": "incremental", "validation_match": True}
    assert runner.table_line(uri, full).endswith("read        5  +2 ~2 -1  validation ok")
    assert runner.table_line(uri, {**full, "validation_match": False}).endswith("  validation MISMATCH")
