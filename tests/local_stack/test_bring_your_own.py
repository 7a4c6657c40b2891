"""Your own servers, settings and dbt project: the profile dbt gets, and what `make run` checks
before anything starts (one line each), against real servers and real dbt."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
import yaml

from include import dbt_project
from include.local_stack import airflow, preflight, runner
from include.local_stack.airflow import airflow_connection_uri, airflow_environment
from include.local_stack.postgres import EmbeddedPostgres, free_port
from include.local_stack.settings import StackError, StackSettings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OTHER_PROJECT = PROJECT_ROOT / "tests" / "fixtures" / "other_dbt_project"


# --- the dbt profile: built from the DSN the copy engine uses ----------------------------------


def test_a_url_without_password_gives_dbt_no_password_and_libpq_does_the_rest():
    params = {"host": "db.example", "port": "6543", "user": "loader", "dbname": "dwh"}
    output = dbt_project.profile_output(params, "{{ env_var('X') }}")
    assert output == {"type": "postgres", "host": "db.example", "port": 6543, "user": "loader", "dbname": "dwh",
                      "password": "", "schema": "analytics", "threads": 4}  # fmt: skip


def test_a_password_goes_through_an_environment_variable_and_ssl_settings_into_the_profile():
    params = {"host": "h", "user": "u", "dbname": "d", "password": "s3cret", "sslmode": "verify-full",
              "sslrootcert": "/ca.pem", "sslcert": "/c.pem", "sslkey": "/c.key", "passfile": "/p",
              "options": "-c search_path=x"}  # fmt: skip
    output = dbt_project.profile_output(params, "{{ env_var('X') }}")
    assert output["password"] == "{{ env_var('X') }}" and "s3cret" not in yaml.safe_dump(output)
    assert (output["sslmode"], output["sslrootcert"], output["sslcert"], output["sslkey"]) == (
        "verify-full", "/ca.pem", "/c.pem", "/c.key")
    assert dbt_project.libpq_environment(params) == {"PGPASSFILE": "/p", "PGOPTIONS": "-c search_path=x"}


def test_a_setting_dbt_cannot_pass_on_is_named():
    with pytest.raises(dbt_project.DbtProjectProblem, match="sets hostaddr, which dbt-postgres cannot pass on"):
        dbt_project.profile_output({"host": "h", "user": "u", "dbname": "d", "hostaddr": "10.0.0.1"}, None)
    with pytest.raises(dbt_project.DbtProjectProblem, match="has no user; dbt needs them"):
        dbt_project.profile_output({"host": "h", "dbname": "d"}, None)


def test_the_airflow_connection_keeps_libpq_settings_and_the_tasks_dsn_reads_them_back(tmp_path):
    dsn = "postgresql://loader@db.example:6543/dwh?sslmode=require&passfile=%2Fsecrets%2Fpgpass"
    uri = airflow_connection_uri(dsn)
    assert uri == "postgres://loader@db.example:6543/dwh?passfile=%2Fsecrets%2Fpgpass&sslmode=require"
    script = textwrap.dedent("""
        from include.pipeline import database_dsn
        from include.dbt_config import WarehouseProfileMapping
        mapping = WarehouseProfileMapping(conn_id="warehouse_postgres")
        print("DSN", database_dsn("warehouse_postgres"))
        print("PROFILE", sorted(mapping.profile.items()))
        print("ENV", sorted(mapping.env_vars.items()))
        try:
            WarehouseProfileMapping(conn_id="no_such_connection").profile
        except Exception as error:
            print("MISSING", type(error).__name__, error)
    """)
    env = {**os.environ, "AIRFLOW_CONN_WAREHOUSE_POSTGRES": uri, "AIRFLOW_HOME": str(tmp_path),
           "PYTHONPATH": str(PROJECT_ROOT)}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.stdout.splitlines() if " " in line}
    assert lines["DSN"] == ("host=db.example port=6543 dbname=dwh user=loader "
                            "application_name=airflow:warehouse_postgres sslmode=require passfile=/secrets/pgpass")
    assert "('password', '')" in lines["PROFILE"] and "('sslmode', 'require')" in lines["PROFILE"]
    assert lines["ENV"] == "[('PGPASSFILE', '/secrets/pgpass')]"
    # A configuration error fails the task at once: AirflowFailException is never retried.
    assert lines["MISSING"].startswith(
        "AirflowFailException Airflow connection 'no_such_connection' cannot be read (AirflowNotFoundException")
    assert "AIRFLOW_CONN_NO_SUCH_CONNECTION" in lines["MISSING"]


@pytest.fixture(scope="module")
def password_server(server_dirs):
    """An embedded PostgreSQL that asks for a password, as a real warehouse does."""
    server = EmbeddedPostgres(server_dirs("byo-password") / "data", free_port(), password="right-Passw0rd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_dbt_connects_with_a_password_a_pgpass_file_or_trust_and_names_a_wrong_password(
        password_server, pg15, tmp_path):  # fmt: skip
    port = password_server.port
    dbt_project.check_dbt_connection(f"postgresql://postgres:right-Passw0rd@127.0.0.1:{port}/postgres", OTHER_PROJECT)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:*:postgres:right-Passw0rd\n")
    pgpass.chmod(0o600)
    dbt_project.check_dbt_connection(f"postgresql://postgres@127.0.0.1:{port}/postgres?passfile={pgpass}",
                                     OTHER_PROJECT)  # fmt: skip
    dbt_project.check_dbt_connection(pg15.admin_dsn, OTHER_PROJECT)  # trust: no password at all
    with pytest.raises(dbt_project.DbtProjectProblem) as raised:
        dbt_project.check_dbt_connection(f"postgresql://postgres:wrong@127.0.0.1:{port}/postgres", OTHER_PROJECT)
    assert str(raised.value) == (
        'dbt cannot connect to the warehouse: password authentication failed for user "postgres"')


def test_a_wrong_warehouse_password_stops_make_run_before_airflow_starts(password_server, tmp_path):
    settings = StackSettings(data_dir=tmp_path / "data", postgres_port=free_port(), api_port=free_port(),
                             warehouse_url=f"postgresql://postgres:wrong@127.0.0.1:{password_server.port}/postgres")
    try:
        with pytest.raises(StackError) as raised:
            runner.prepare(settings)
        assert not airflow.running_components(settings)
    finally:
        runner.stop(settings)
    message = str(raised.value)
    assert message.startswith("Connection 'warehouse_postgres' (")
    assert 'password authentication failed for user "postgres"' in message
    assert "WAREHOUSE_DATABASE_URL" in message and "wrong" not in message


# --- pre-flight: one line each, before anything starts ----------------------------------------


def test_a_port_held_by_another_program_is_named_with_its_setting(tmp_path):
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        taken = other_program.getsockname()[1]
        settings = StackSettings(data_dir=tmp_path / "data", api_port=taken, postgres_port=free_port())
        with pytest.raises(StackError) as raised:
            runner.prepare(settings)
        assert str(raised.value).startswith(
            f"Port {taken} (AIRFLOW_API_PORT, for the Airflow api-server) is already in use by another program")
        settings = StackSettings(data_dir=tmp_path / "data", api_port=free_port(), postgres_port=taken)
        with pytest.raises(StackError, match=f"^Port {taken} \\(LOCAL_POSTGRES_PORT, for the embedded PostgreSQL\\)"):
            runner.prepare(settings)
    assert not (tmp_path / "data" / "postgres").exists(), "nothing may start before the checks"


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("PIPELINE_ENVIRONMENT", "prod", "Configuration: PIPELINE_ENVIRONMENT='prod' but include/config/prod/tables.yml "
                                     "does not exist; create it (the format is in docs/copy_engine.md) or unset "
                                     "PIPELINE_ENVIRONMENT"),
    ("PIPELINE_SCHEDULE", "every day", "Configuration: PIPELINE_SCHEDULE is 'every day': give a cron expression "
                                       "(e.g. '0 6 * * *'), one of @hourly, @daily, @weekly, @monthly, @quarterly, "
                                       "@yearly, or none"),
])  # fmt: skip
def test_a_configuration_error_is_one_line_before_anything_starts(tmp_path, monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    settings = StackSettings(data_dir=tmp_path / "data", api_port=free_port(), postgres_port=free_port())
    with pytest.raises(StackError) as raised:
        runner.prepare(settings)
    assert str(raised.value) == expected
    assert not (tmp_path / "data" / "postgres").exists()


def test_a_dag_file_that_would_not_import_is_one_line_before_airflow_starts(tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    for name in ("one.py", "two.py"):
        (dags / name).write_text("from airflow.sdk import dag\nraise ValueError('layer marts selects no dbt node')\n")
    (dags / "fine.py").write_text("from airflow.sdk import dag\n")
    settings = StackSettings(data_dir=tmp_path / "data")
    with pytest.raises(StackError) as raised:
        preflight.check_dag_files(airflow_environment(settings), dags)
    assert str(raised.value) == ("A DAG file does not import, so Airflow was not started:\n"
                                 "  one.py, two.py: ValueError: layer marts selects no dbt node")  # fmt: skip


def test_a_running_airflow_is_restarted_when_a_setting_or_the_code_it_imports_changed(tmp_path, monkeypatch):
    settings = StackSettings(data_dir=tmp_path / "data")
    run_dir = tmp_path / "run"
    monkeypatch.delenv("DBT_EXECUTION_MODE", raising=False)
    started = preflight.fingerprint(airflow_environment(settings), PROJECT_ROOT)
    preflight.record_fingerprint(run_dir, started)
    unchanged = preflight.fingerprint(airflow_environment(settings), PROJECT_ROOT)
    assert preflight.changed_since_start(run_dir, unchanged) == []
    monkeypatch.setenv("DBT_EXECUTION_MODE", "watcher")
    other = StackSettings(data_dir=tmp_path / "data", dbt_project_dir=OTHER_PROJECT)
    now = preflight.fingerprint(airflow_environment(other), PROJECT_ROOT)
    assert preflight.changed_since_start(run_dir, now) == [
        "AIRFLOW__COSMOS__DBT_DOCS_PROJECTS", "DBT_EXECUTION_MODE", "DBT_PROJECT_DIR"]
    assert preflight.started_with(run_dir, airflow_environment(other), "AIRFLOW__API__PORT")
    assert preflight.changed_since_start(tmp_path / "never", now) == ["its settings (not recorded when it started)"]


def test_demo_data_is_never_written_to_a_source_whose_tables_are_not_the_demos(tmp_path, monkeypatch, pg15):
    from include import pipeline

    config = tmp_path / "config"
    (config / "mine").mkdir(parents=True)
    (config / "mine" / "tables.yml").write_text(
        "schedule: '0 6 * * *'\ntables:\n  - name: orders\n    source: sales.orders\n    target: raw.orders\n")
    monkeypatch.setattr(pipeline, "CONFIG_DIR", config)
    monkeypatch.setattr(pipeline, "PROJECT_ROOT", tmp_path)
    monkeypatch.setenv("PIPELINE_ENVIRONMENT", "mine")
    monkeypatch.setattr(pipeline, "TABLES_CONFIG", pipeline.tables_config_path())
    source = pg15.new_database("byo_source")
    try:
        settings = StackSettings(data_dir=tmp_path / "data", source_url=source)
        assert runner.demo_in_use() is False
        assert runner.ensure_demo_data(settings) is None
        with psycopg.connect(source) as conn:
            assert conn.execute("select count(*) from pg_tables where schemaname = 'public'").fetchone()[0] == 0
        assert preflight.check_tables_config() == 1
        from include.ingestion import pipeline_schedule

        monkeypatch.delenv("PIPELINE_SCHEDULE", raising=False)
        assert pipeline_schedule(pipeline.TABLES_CONFIG) == "0 6 * * *"
    finally:
        pg15.drop_database(source)


def test_the_docs_key_and_the_summary_follow_the_project_in_use(tmp_path):
    manifest = dbt_project.build_manifest("postgresql://nobody@127.0.0.1:9/nowhere", OTHER_PROJECT)
    settings = StackSettings(data_dir=tmp_path / "data", dbt_project_dir=OTHER_PROJECT)
    env = airflow_environment(settings)
    assert env["DBT_PROJECT_DIR"] == str(OTHER_PROJECT)
    assert yaml.safe_load(env["AIRFLOW__COSMOS__DBT_DOCS_PROJECTS"]) == {
        "shop_analytics": {"dir": str(tmp_path / "data" / "dbt_docs"), "name": "dbt Docs (shop_analytics)"}}
    counts = dbt_project.node_counts(dbt_project.load_manifest(manifest))
    assert counts == {"seed": 2, "snapshot": 1, "model": 5, "test": 11}
    assert dbt_project.describe_counts(counts) == "2 seeds, 1 snapshot, 5 models, 11 tests"
    assert dbt_project.sources_with_freshness(dbt_project.load_manifest(manifest)) == []


def test_the_transform_follows_the_raw_tables_or_for_a_dbt_only_project_the_schedule(tmp_path, monkeypatch):
    from include import ingestion
    from include.pipeline import warehouse_table_uri

    monkeypatch.delenv("PIPELINE_SCHEDULE", raising=False)
    config = tmp_path / "tables.yml"
    monkeypatch.setattr(ingestion, "TABLES_CONFIG", config)
    config.write_text("schedule: '@hourly'\ntables: []\n")
    assert (ingestion.transform_schedule(), ingestion.ingestion_schedule()) == ("@hourly", None)
    config.write_text("tables:\n  - {name: orders, source: sales.orders, target: raw.orders}\n"
                      "  - {name: items, source: sales.items, target: raw.items}\n")  # fmt: skip
    assert [asset.uri for asset in ingestion.transform_schedule()] == [
        warehouse_table_uri("raw.orders"), warehouse_table_uri("raw.items")]
    assert ingestion.ingestion_schedule() == ingestion.DEFAULT_SCHEDULE == "@daily"
    config.write_text("schedule: none\ntables: []\n")
    assert ingestion.transform_schedule() is None
    monkeypatch.setenv("PIPELINE_SCHEDULE", "0 6 * * 1-5")
    assert ingestion.transform_schedule() == "0 6 * * 1-5"
