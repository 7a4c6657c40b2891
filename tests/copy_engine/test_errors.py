"""Each kind of bad input fails at once with a message that names the table and what to do."""

from __future__ import annotations

import pytest

from include.copy_engine import (
    ConfigError,
    ConnectionFailedError,
    ConnectionRejectedError,
    MissingPrimaryKeyError,
    SourceError,
    TableConfig,
    TransientError,
    load_config,
    sync_table,
)
from include.local_stack.postgres import free_port

from .test_full import make_stock


def test_unknown_source_table(pair):
    with pytest.raises(SourceError) as raised:
        sync_table(pair.source, pair.target, TableConfig(name="nope", source="public.nope"))
    assert str(raised.value) == (
        "nope: source table public.nope does not exist; check `source` in the configuration")
    assert raised.value.report is not None and raised.value.report.status == "failed"
    assert raised.value.report.attempts == 1
    runs = pair.rows(pair.target, "select table_name, status, error from _copy_engine.sync_runs")
    assert runs == [("nope", "failed", str(raised.value))]


def test_incremental_table_without_primary_key(pair):
    pair.run(pair.source, "create table public.events (id int, changed_at timestamptz)")
    table = TableConfig(name="events", source="public.events", mode="incremental", cursor_column="changed_at")
    with pytest.raises(MissingPrimaryKeyError, match="mode incremental needs a primary key and public.events "
                       "has none; set primary_key"):
        sync_table(pair.source, pair.target, table)


def test_a_failed_run_reports_nothing_it_rolled_back(pair):
    pair.run(pair.source, "create type public.mood as enum ('ok', 'sad')")
    pair.run(pair.source, "create table public.events (id int primary key, mood public.mood, changed_at int)")
    pair.run(pair.source, "insert into public.events select i, 'ok', i from generate_series(1, 50) as i")
    audit = "select status, rows_read, rows_inserted, rows_deleted, rows_replaced, schema_changes from " \
            "_copy_engine.sync_runs order by run_id"
    # A cursor column the source lacks: refused before anything is written.
    no_cursor = TableConfig(name="events", source="public.events", mode="incremental", cursor_column="updated_at")
    with pytest.raises(SourceError, match=r"^events: cursor_column updated_at is not a source column "
                                          r"\(id, mood, changed_at\)$") as raised:
        sync_table(pair.source, pair.target, no_cursor)
    report = raised.value.report
    assert (report.rows_read, report.rows_inserted, report.schema_changes) == (0, 0, [])
    assert "schema change" not in report.summary()
    assert pair.scalar(pair.target, "select to_regclass('raw.events') is null") is True

    # A failure after the rows were loaded (the custom select repeats a key): the table it created and the
    # rows it loaded are rolled back, and so are they in the report; the enum type it created commits on its
    # own, so it is reported.
    repeating = TableConfig(name="events", source="public.events", primary_key=("id",),
                            select="select id % 10 as id, mood, changed_at from public.events")
    with pytest.raises(SourceError, match="the source rows repeat a primary key value") as raised:
        sync_table(pair.source, pair.target, repeating)
    report = raised.value.report
    assert (report.status, report.rows_read, report.rows_inserted, report.rows_deleted, report.rows_replaced,
            report.schema_changes) == ("failed", 0, 0, 0, 0, ["created enum type public.mood"])
    assert pair.scalar(pair.target, "select to_regclass('raw.events') is null") is True
    assert pair.rows(pair.target, audit) == [
        ("failed", 0, 0, 0, 0, []), ("failed", 0, 0, 0, 0, ["created enum type public.mood"])]


def test_unknown_column_in_custom_sql(pair):
    make_stock(pair, 3)
    for settings in ({"where": "no_such_column > 1"}, {"select": "select no_such_column from public.stock_master"}):
        table = TableConfig(name="stock_master", **settings)
        with pytest.raises(SourceError) as raised:
            sync_table(pair.source, pair.target, table)
        assert str(raised.value) == (
            'stock_master: the custom select/where does not run on the source: column "no_such_column" does '
            "not exist; fix it in the configuration")
    assert pair.scalar(pair.target, "select to_regclass('raw.stock_master')") is None


def test_unreachable_server_is_transient_and_masks_the_password(pair):
    port = free_port()
    source = f"postgresql://reader:s3cret@127.0.0.1:{port}/src"
    table = TableConfig(name="stock_master", retries=1, retry_backoff_s=0.01)
    with pytest.raises(ConnectionFailedError) as raised:
        sync_table(source, pair.target, table)
    assert isinstance(raised.value, TransientError)
    message = str(raised.value)
    assert message.startswith(f"stock_master: cannot connect to the source database "
                              f"postgresql://reader:***@127.0.0.1:{port}/src (")
    assert "s3cret" not in message and "s3cret" not in str(raised.value.report.to_dict())
    assert raised.value.report.attempts == 2


def test_bad_yaml_and_bad_settings(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("tables:\n  - name: x\n    mode: [full\n")
    with pytest.raises(ConfigError, match=r"bad.yml is not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yml"
    wrong.write_text("tables:\n  - name: x\n    mode: sometimes\n")
    with pytest.raises(ConfigError, match=r"^x: mode must be one of full, incremental, cdc, not 'sometimes'$"):
        load_config(wrong)
    unknown = tmp_path / "unknown.yml"
    unknown.write_text("tables:\n  - name: x\n    cursor: updated_at\n")
    with pytest.raises(ConfigError, match=r"^x: unknown setting\(s\) cursor; known: "):
        load_config(unknown)
    with pytest.raises(ConfigError, match="mode incremental needs cursor_column"):
        TableConfig(name="x", mode="incremental")
    # The spellings of before 0.1 are gone: each fails with a message that names the one to use.
    with pytest.raises(ConfigError, match=r"^x: unknown setting\(s\) large; known: .*parallel"):
        TableConfig.from_mapping({"name": "x", "large": True})
    with pytest.raises(ConfigError, match=r"^x: parallel must be a whole number of key ranges, at least 1 "
                                          r"\(such as parallel: 4\), not \{'workers': 2\}$"):
        TableConfig.from_mapping({"name": "x", "parallel": {"workers": 2}})
    with pytest.raises(ConfigError, match=r"^x: parallel must be .* not 0$"):
        TableConfig(name="x", parallel=0)
    with pytest.raises(ConfigError, match=r"cannot read the configuration file .*missing.yml"):
        load_config(tmp_path / "missing.yml")


def test_demo_configuration():
    config = load_config("include/config/tables.yml")
    assert config.names == ["stock_master", "edi_690", "exchanges"]
    stock = config.table("stock_master")
    assert (stock.source, stock.target, stock.mode, stock.cursor_column, stock.delete_detection, stock.validate) == (
        "public.stock_master", "raw.stock_master", "incremental", "updated_at", "hard", True)
    events = config.table("edi_690")
    assert (events.target, events.cursor_column, events.delete_detection) == ("raw.edi_690", "changed_at", "hard")
    exchanges = config.table("exchanges")
    assert (exchanges.source, exchanges.target, exchanges.mode, exchanges.cursor_column) == (
        "public.exchanges", "raw.exchanges", "cdc", None)
    with pytest.raises(ConfigError, match="no table named 'nope' in include/config/tables.yml; configured: "
                       "stock_master, edi_690, exchanges"):
        config.table("nope")
    assert TableConfig(name="x", source="public.x").target == "raw.x"


def test_unknown_database_is_terminal(pair):
    missing = pair.target.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(ConnectionRejectedError) as raised:
        sync_table(pair.source, missing, TableConfig(name="stock_master"))
    assert str(raised.value).startswith(
        f"stock_master: the target database {missing} refused the connection (")
    assert 'database "no_such_database" does not exist' in str(raised.value)
    assert raised.value.report.attempts == 1
