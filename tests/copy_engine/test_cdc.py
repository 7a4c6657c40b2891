"""Change data capture (`mode: cdc`) on servers running with wal_level = logical.

PostgreSQL 18 is a private embedded server and PostgreSQL 15 a private cluster of the machine's
binaries (/usr/lib/postgresql/15/bin), both switched to wal_level = logical with ALTER SYSTEM and a
restart; the machine's shared PostgreSQL 15 (wal_level = replica) is only read, for the message
that names the missing setting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from include.copy_engine import (
    SourceError,
    SyncReport,
    TableConfig,
    _cdc,
    drop_unconfigured_replication,
    parse_config,
    sync_table,
)
from include.dbt_project import dbt_arguments
from include.ingestion import asset_event_extra
from include.local_stack.postgres import EmbeddedPostgres, free_port
from tests.conftest import PostgresServer
from tests.copy_engine.conftest import Pair
from tests.copy_engine.test_types import Wide, binary_only, build_wide, change_every_row
from tests.dbt.conftest import DBT, DBT_PROJECT, dbt_env, fetch, run_dbt

ROOT = Path(__file__).resolve().parents[2]
PG15_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass(frozen=True)
class SystemPostgres(EmbeddedPostgres):
    """A private cluster of the PostgreSQL binaries installed on the machine, on its own port."""

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PG15_BIN / program), *args], check=True, capture_output=True, text=True,
                              timeout=timeout, user=self._run_as, cwd="/")


def logical(name: str, server: EmbeddedPostgres) -> Iterator[PostgresServer]:
    """Start the server, switch it to wal_level = logical (ALTER SYSTEM and a restart), stop it afterwards."""
    server.start()
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("alter system set wal_level = logical")
        server.stop()
        server.start()
        yield PostgresServer(name, server.dsn())
    finally:
        server.stop()


@pytest.fixture(scope="module")
def logical_pg18(server_dirs: Callable[[str], Path]) -> Iterator[PostgresServer]:
    yield from logical("pg18", EmbeddedPostgres(server_dirs("pg18-cdc") / "data", free_port(), throwaway=True))


@pytest.fixture(scope="module")
def logical_pg15(server_dirs: Callable[[str], Path]) -> Iterator[PostgresServer]:
    yield from logical("pg15", SystemPostgres(server_dirs("pg15-cdc") / "data", free_port(), throwaway=True))


def new_pair(server: PostgresServer) -> Pair:
    """Source and target databases; the source commits synchronously (the throwaway server does not).

    Decoding reads flushed WAL only, so an asynchronous commit reaches the slot a moment later
    and would arrive in the run after the one the test makes.
    """
    pair = Pair(server, server.new_database("src"), server.new_database("dst"))
    name = psycopg.conninfo.conninfo_to_dict(pair.source)["dbname"]
    pair.run(server.admin_dsn, f"alter database {name} set synchronous_commit = on")
    return pair


def drop_pair(pair: Pair) -> None:
    pair.run(pair.source, "select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                          "where database = current_database()")
    pair.server.drop_database(pair.source)
    pair.server.drop_database(pair.target)


@pytest.fixture
def pg18_pair(logical_pg18: PostgresServer) -> Iterator[Pair]:
    pair = new_pair(logical_pg18)
    yield pair
    drop_pair(pair)


@pytest.fixture(params=["logical_pg18", "logical_pg15"])
def cdc_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    pair = new_pair(request.getfixturevalue(request.param))
    yield pair
    drop_pair(pair)


TABLE = TableConfig(name="items", source="public.items", target="raw.items", mode="cdc", retries=0)
_CREATE = """
create table items (id int primary key, name text, qty int, big text);
alter table items alter column big set storage external;
insert into items select g, 'item ' || g, g, case when g % 10 = 0 then repeat(md5(g::text), 200) end
from generate_series(1, 100) as g;
"""


def first_copy(pair: Pair) -> SyncReport:
    """The 100-row items table at the source, copied by a first CDC run."""
    pair.run(pair.source, _CREATE)
    return sync_table(pair.source, pair.target, TABLE)


def checksum(dsn: str, table: str) -> tuple[int, str]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"select count(*), md5(coalesce(string_agg(t::text, '|' order by id), '')) "  # noqa: S608
                           f"from {table} as t").fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def assert_same(pair: Pair) -> None:
    assert checksum(pair.target, "raw.items") == checksum(pair.source, "public.items")


def slot_of(pair: Pair) -> dict[str, object] | None:
    rows = pair.rows(pair.source, "select to_jsonb(s) from pg_replication_slots as s where database = "
                                  "current_database()")
    return dict(rows[0][0]) if rows else None  # type: ignore[call-overload]


def small_chunks(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, int, int]]]:
    """Make `_write` stage and apply a few rows per chunk (first 1 byte, then twice the size, at most 400 bytes);
    returns, per `_write`, its chunks' (rows, deletes, rows keeping a TOASTed value)."""
    monkeypatch.setattr(_cdc, "_FIRST_CHUNK", 1)
    monkeypatch.setattr(_cdc, "_CHUNK_GROWTH", 2)
    monkeypatch.setattr(_cdc, "_LARGEST_CHUNK", 400)
    writes: list[list[tuple[int, int, int]]] = []
    stage_rows = _cdc.PgOutputDecoder.stage_rows

    def spy(self: _cdc.PgOutputDecoder, *args: object, **kwargs: object) -> Iterator[_cdc.StageChunk]:
        writes.append([])
        for chunk in stage_rows(self, *args, **kwargs):  # type: ignore[arg-type]
            writes[-1].append((chunk.rows, chunk.deletes, chunk.kept))
            yield chunk

    monkeypatch.setattr(_cdc.PgOutputDecoder, "stage_rows", spy)
    return writes


@pytest.mark.parametrize(("values", "chunks"), [("binary", "one"), ("text", "one"), ("binary", "small"),
                                                ("text", "small")])
def test_inserts_updates_deletes_toast_and_rollbacks_arrive_exactly(
        cdc_pair: Pair, values: str, chunks: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With binary values (the default where binary COPY carries every column) and with text values; the
    changes staged and applied in one chunk (a batch this small) or in many chunks of a few rows."""
    pair = cdc_pair
    caplog.set_level("INFO", logger="include.copy_engine")
    if values == "text":
        monkeypatch.setattr(_cdc, "_binary_types", lambda run: None)
    writes = small_chunks(monkeypatch) if chunks == "small" else None
    first = first_copy(pair)
    assert (first.mode, first.rows_inserted, first.validation.match) == ("cdc", 100, True)
    assert first.watermark_before is None and first.watermark_after
    assert slot_of(pair) is not None
    assert_same(pair)

    # Inserts, updates leaving the TOASTed column unchanged and changing it, deletes, one key updated
    # many times, a row inserted and deleted, and a transaction rolled back.
    pair.run(pair.source, "insert into items select g, 'new ' || g, g, null from generate_series(101, 110) as g")
    pair.run(pair.source, "update items set qty = qty + 1000 where id <= 10 or id = 20")
    pair.run(pair.source, "update items set big = repeat(md5('changed' || id), 300) where id in (30, 40)")
    pair.run(pair.source, "delete from items where id between 51 and 56")
    for step in range(50):
        pair.run(pair.source, "update items set qty = %s where id = 60", (step,))
    pair.run(pair.source, "insert into items values (500, 'short-lived', 1, null)")
    pair.run(pair.source, "delete from items where id = 500")
    with psycopg.connect(pair.source) as conn:
        conn.execute("insert into items values (600, 'rolled back', 1, null)")
        conn.execute("update items set name = 'rolled back' where id = 1")
        conn.rollback()
    second = sync_table(pair.source, pair.target, TABLE)
    assert (second.rows_inserted, second.rows_updated, second.rows_deleted) == (10, 14, 6)
    if writes is not None:
        # 31 keys: 10 inserted, 14 updated (3 of them, 10, 20 and 60, leaving their TOASTed value unchanged),
        # 7 deleted (500 among them, which the target never had); the deleted keys staged first.
        chunked = writes[-1]
        assert len(chunked) > 5 and sum(rows for rows, _, _ in chunked) == 31
        assert sum(deletes for _, deletes, _ in chunked) == 7 and sum(kept for _, _, kept in chunked) == 3
        with_deletes = [number for number, (_, deletes, _) in enumerate(chunked) if deletes]
        assert with_deletes == list(range(len(with_deletes)))
        assert all(rows == deletes for rows, deletes, _ in chunked[:len(with_deletes) - 1])
    assert second.watermark_before == first.watermark_after
    assert _cdc.lsn_int(second.watermark_after or "0/0") > _cdc.lsn_int(first.watermark_after or "0/0")
    assert_same(pair)
    audit = pair.rows(pair.target, "select mode, rows_inserted, rows_updated, rows_deleted, watermark_before, "
                                   "watermark_after from _copy_engine.sync_runs order by run_id desc limit 1")
    assert audit == [("cdc", 10, 14, 6, first.watermark_after, second.watermark_after)]
    assert "[cdc] success" in second.summary() and "deleted 6" in second.summary()
    assert second.summary().endswith("not validated")
    extra = asset_event_extra(second)
    assert (extra["mode"], extra["rows_updated"], extra["watermark_after"]) == ("cdc", 14, second.watermark_after)
    assert extra["slot_retained_wal_bytes"] == second.slot_retained_wal_bytes > 0

    # Within one batch: an insert then an update leaving its TOASTed value unchanged, a key moved with
    # its TOASTed value unchanged, a TOASTed row's other column changed, then a truncate-free quiet run.
    pair.run(pair.source, "insert into items values (700, 'toasted', 1, repeat(md5('700'), 300))")
    pair.run(pair.source, "update items set qty = 2 where id = 700")
    pair.run(pair.source, "update items set id = 1070, name = 'moved' where id = 70")
    pair.run(pair.source, "update items set name = 'renamed' where id = 80")
    third = sync_table(pair.source, pair.target, TABLE)
    assert (third.rows_inserted, third.rows_updated, third.rows_deleted) == (2, 1, 1)
    assert_same(pair)
    assert ("key(s) to write (binary values)" in caplog.text) == (values == "binary")
    quiet = sync_table(pair.source, pair.target, TABLE)
    assert (quiet.rows_read, quiet.rows_inserted, quiet.rows_updated, quiet.rows_deleted) == (0, 0, 0, 0)
    assert_same(pair)
    confirmed = slot_of(pair)
    assert confirmed is not None and confirmed["confirmed_flush_lsn"] == quiet.watermark_after


def test_without_pipeline_mode_the_chunks_are_applied_one_after_the_other(
        pg18_pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A libpq before 14 has no pipeline mode: the same chunks, their statements sent one by one."""
    pair = pg18_pair
    monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: False))
    writes = small_chunks(monkeypatch)
    first_copy(pair)
    pair.run(pair.source, "update items set qty = qty + 1 where id <= 30; delete from items where id > 95;"
                          "insert into items values (300, 'new', 1, null)")
    report = sync_table(pair.source, pair.target, TABLE)
    assert (report.rows_inserted, report.rows_updated, report.rows_deleted) == (1, 30, 5)
    assert len(writes[-1]) > 5 and sum(rows for rows, _, _ in writes[-1]) == 36
    assert_same(pair)


def test_a_crash_between_commit_and_confirmation_replays_without_duplicates(
        cdc_pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = cdc_pair
    first_copy(pair)
    pair.run(pair.source, "update items set qty = qty + 1 where id <= 20")
    pair.run(pair.source, "insert into items values (200, 'new', 1, null)")

    def crash(*_: object) -> None:
        raise RuntimeError("killed after the commit")

    monkeypatch.setattr(_cdc, "confirm_position", crash)
    with pytest.raises(RuntimeError):
        sync_table(pair.source, pair.target, TABLE)
    monkeypatch.undo()
    assert_same(pair)  # the target committed; the slot was not told
    pair.run(pair.source, "update items set qty = qty + 1 where id <= 5")
    again = sync_table(pair.source, pair.target, TABLE)
    assert (again.rows_inserted, again.rows_updated, again.rows_deleted) == (0, 5, 0)
    assert_same(pair)


def test_sigkill_anywhere_leaves_old_or_new_state_and_the_next_run_converges(pg18_pair: Pair) -> None:
    pair = pg18_pair
    pair.run(pair.source, "create table items (id int primary key, name text, qty int, big text);"
                          "insert into items select g, 'item ' || g, g, null from generate_series(1, 20000) as g")
    sync_table(pair.source, pair.target, TABLE)
    environment = {**os.environ, "SOURCE_DATABASE_URL": pair.source, "WAREHOUSE_DATABASE_URL": pair.target}
    command = [sys.executable, "-m", "include.copy_engine", "sync", "--source", pair.source, "--target",
               pair.target, "--table", "public.items", "--target-table", "raw.items", "--mode", "cdc",
               "--no-validate"]

    def change(round_number: int) -> None:
        pair.run(pair.source, "update items set qty = qty + %s where id %% 3 = %s", (round_number, round_number % 3))
        pair.run(pair.source, "delete from items where id %% 97 = %s", (round_number,))
        pair.run(pair.source, "insert into items select g, 'round', %s, null from generate_series(%s, %s) as g",
                 (round_number, 100000 + round_number * 1000, 100000 + round_number * 1000 + 499))

    change(0)
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, env=environment, check=True, capture_output=True)
    full_run = time.monotonic() - started
    assert_same(pair)
    outcomes = []
    for round_number, fraction in enumerate((0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2), 1):
        old = checksum(pair.target, "raw.items")
        change(round_number)
        new = checksum(pair.source, "public.items")
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(full_run * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        after_kill = checksum(pair.target, "raw.items")
        assert after_kill in (old, new), f"round {round_number}: the target is neither the old nor the new state"
        outcomes.append("new" if after_kill == new else "old")
        report = sync_table(pair.source, pair.target, TABLE)
        assert_same(pair)
        if after_kill == new:
            assert (report.rows_inserted, report.rows_updated, report.rows_deleted) == (0, 0, 0)
    assert "old" in outcomes, outcomes  # some kills landed before the commit


def test_a_dropped_slot_is_named_and_the_table_copied_again(cdc_pair: Pair) -> None:
    pair = cdc_pair
    first_copy(pair)
    slot = slot_of(pair)
    assert slot is not None
    pair.run(pair.source, "select pg_drop_replication_slot(%s)", (slot["slot_name"],))
    pair.run(pair.source, "delete from items where id <= 3")
    report = sync_table(pair.source, pair.target, TABLE)
    assert any("no longer exists on the source (dropped)" in note for note in report.notes), report.notes
    assert "copied in full again" in report.summary()
    assert slot_of(pair) is not None
    assert_same(pair)


def test_an_invalidated_slot_is_named_and_the_table_copied_again(cdc_pair: Pair) -> None:
    pair = cdc_pair
    first_copy(pair)
    pair.run(pair.source, "update items set qty = -1 where id = 1")
    admin = pair.server.admin_dsn
    pair.run(admin, "alter system set max_slot_wal_keep_size = '1MB'")
    pair.run(admin, "select pg_reload_conf()")
    try:
        for _ in range(4):
            pair.run(pair.source, "create table if not exists filler (x int); insert into filler values (1)")
            pair.run(pair.source, "select pg_switch_wal()")
        pair.run(admin, "checkpoint")
        slot = slot_of(pair)
        assert slot is not None and slot["wal_status"] == "lost", slot
    finally:
        pair.run(admin, "alter system reset max_slot_wal_keep_size")
        pair.run(admin, "select pg_reload_conf()")
    report = sync_table(pair.source, pair.target, TABLE)
    assert any("was invalidated on the source" in note for note in report.notes), report.notes
    assert report.rows_read == 100
    assert_same(pair)
    slot = slot_of(pair)
    assert slot is not None and slot["wal_status"] != "lost"


def test_a_new_source_column_copies_again_and_a_dropped_one_is_kept(cdc_pair: Pair) -> None:
    pair = cdc_pair
    first_copy(pair)
    pair.run(pair.source, "alter table items add column color text default 'red'")
    added = sync_table(pair.source, pair.target, TABLE)
    assert any("new column(s) color" in note for note in added.notes)
    assert "added column color text" in added.schema_changes
    assert_same(pair)
    pair.run(pair.source, "alter table items drop column color; update items set qty = 0 where id = 5")
    dropped = sync_table(pair.source, pair.target, TABLE)
    assert (dropped.rows_updated, dropped.notes) == (1, [])
    assert pair.rows(pair.target, "select qty, color from raw.items where id in (5, 6) order by id") == [
        (0, None), (6, "red")]


def test_missing_requirements_are_named_together_and_nothing_is_created(pg15: PostgresServer) -> None:
    """The machine's PostgreSQL 15 runs with wal_level = replica: read only, nothing changes on it."""
    source, target = pg15.new_database("src"), pg15.new_database("dst")
    role = f"cdc_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("create table plain (id int, name text)")
            conn.execute(f"create role {role} login")
            conn.execute(f"grant select on plain to {role}")
        as_role = source.replace("postgres@", f"{role}@")
        table = TableConfig(name="plain", source="public.plain", mode="cdc", primary_key=("id",), retries=0)
        with pytest.raises(SourceError) as raised:
            sync_table(as_role, target, table)
        message = str(raised.value)
        assert "nothing was created" in message
        assert "wal_level is replica: set wal_level = logical" in message and "rds.logical_replication" in message
        assert f"ALTER ROLE {role} REPLICATION" in message
        assert "CREATE PUBLICATION" in message
        assert "has no primary key" in message and "REPLICA IDENTITY FULL" in message
        with psycopg.connect(source) as conn:
            assert conn.execute("select count(*) from pg_publication").fetchone() == (0,)
            assert conn.execute("select count(*) from pg_replication_slots where database = current_database()"
                                ).fetchone() == (0,)
        with psycopg.connect(target) as conn:
            assert conn.execute("select to_regclass('raw.plain')").fetchone() == (None,)
    finally:
        pg15.drop_database(source)
        pg15.drop_database(target)
        with psycopg.connect(pg15.admin_dsn, autocommit=True) as conn:
            conn.execute(f"drop role if exists {role}")


def test_the_slot_of_a_table_taken_out_of_the_configuration_is_dropped(pg18_pair: Pair) -> None:
    pair = pg18_pair
    pair.run(pair.source, _CREATE + "create table others (id int primary key)")
    sync_table(pair.source, pair.target, TABLE)
    kept = TableConfig(name="others", source="public.others", target="raw.others", mode="cdc")
    sync_table(pair.source, pair.target, kept)
    config = parse_config({"tables": [{"name": "others", "source": "public.others", "target": "raw.others",
                                       "mode": "cdc"}]})
    listed = drop_unconfigured_replication(pair.source, pair.target, config, dry_run=True)
    assert len(listed) == 1 and listed[0].startswith("raw.items")
    assert len(pair.rows(pair.source, "select 1 from pg_replication_slots where database = current_database()")) == 2
    result = subprocess.run(
        [sys.executable, "-m", "include.copy_engine", "drop-replication", "--source", pair.source, "--target",
         pair.target, "--config", str(_write_config(config_path := Path(pair.target.rsplit("/", 1)[1] + ".yml")))],
        cwd=ROOT, capture_output=True, text=True, check=False)
    config_path.unlink()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["dropped"] == listed
    slots = pair.rows(pair.source, "select slot_name from pg_replication_slots where database = current_database()")
    publications = pair.rows(pair.source, "select pubname from pg_publication")
    assert len(slots) == 1 and slots == publications and "others" in str(slots[0][0])


def _write_config(path: Path) -> Path:
    path.write_text("tables:\n  - {name: others, source: public.others, target: raw.others, mode: cdc}\n")
    return path.resolve()


def test_config_refuses_what_cdc_cannot_do() -> None:
    with pytest.raises(Exception, match="takes no select or where"):
        TableConfig(name="t", mode="cdc", where="id > 1")
    with pytest.raises(Exception, match="delete_detection soft is not supported"):
        TableConfig(name="t", mode="cdc", delete_detection="soft")
    with pytest.raises(Exception, match="remove parallel"):
        TableConfig(name="t", mode="cdc", parallel=4)


def test_pipeline_health_shows_the_slots_wal_and_flags_it_past_the_limit(pg18_pair: Pair, tmp_path: Path) -> None:
    pair = pg18_pair
    first_copy(pair)
    pair.run(pair.source, "update items set qty = 0")
    report = sync_table(pair.source, pair.target, TABLE)
    assert report.slot_retained_wal_bytes is not None and report.slot_retained_wal_bytes > 0
    assert report.slot_lag_bytes is not None and 0 <= report.slot_lag_bytes <= report.slot_retained_wal_bytes
    run_dbt(["build", "--select", "stg_sync_runs", "pipeline_health"], dsn=pair.target, work_dir=tmp_path)
    [health] = fetch(pair.target, "select * from marts.pipeline_health")
    assert (health["slot_retained_wal_bytes"], health["slot_lag_bytes"], health["is_slot_wal_over_limit"]) == (
        report.slot_retained_wal_bytes, report.slot_lag_bytes, False)
    over = subprocess.run(
        [str(DBT), "build", "--select", "pipeline_health", "--vars", "{cdc_slot_wal_alert_bytes: 0}",
         *dbt_arguments(DBT_PROJECT, tmp_path / "profiles"),
         "--target-path", str(tmp_path / "target"), "--log-path", str(tmp_path / "logs")],
        env=dbt_env(pair.target, tmp_path), capture_output=True, text=True, cwd=tmp_path, check=False)
    assert over.returncode != 0 and "is_slot_wal_over_limit" in over.stdout, over.stdout[-3000:]


def test_replica_identity_full_with_a_configured_key_and_a_truncate(cdc_pair: Pair) -> None:
    pair = cdc_pair
    pair.run(pair.source, "create table items (id int not null, name text, qty int, big text);"
                          "alter table items replica identity full;"
                          "insert into items select g, 'item ' || g, g, null from generate_series(1, 50) as g")
    table = TABLE.with_overrides(primary_key=("id",))
    sync_table(pair.source, pair.target, table)
    pair.run(pair.source, "update items set qty = -qty where id <= 5; delete from items where id > 45;"
                          "update items set id = 100 where id = 10")
    changed = sync_table(pair.source, pair.target, table)
    assert (changed.rows_inserted, changed.rows_updated, changed.rows_deleted) == (1, 5, 6)
    assert_same(pair)
    pair.run(pair.source, "truncate items; insert into items values (7, 'after truncate', 1, null)")
    truncated = sync_table(pair.source, pair.target, table)
    assert (truncated.rows_inserted, truncated.rows_deleted) == (1, 45)
    assert_same(pair)


@pytest.mark.parametrize("chunks", ["one", "small"])
def test_stored_generated_columns_are_computed_for_the_changed_rows(
        cdc_pair: Pair, chunks: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pgoutput does not send generated columns: the target computes them by the source's expressions
    (in each chunk of the stage, when it comes in several)."""
    pair = cdc_pair
    writes = small_chunks(monkeypatch) if chunks == "small" else None
    pair.run(pair.source, "create table items (id int primary key, name text, qty int, price numeric(10, 2),"
                          " total numeric generated always as (qty * price) stored,"
                          " label text generated always as (upper(name) || '#' || id) stored);"
                          "insert into items (id, name, qty, price)"
                          " select g, 'item ' || g, g, g / 4.0 from generate_series(1, 50) as g")
    first = sync_table(pair.source, pair.target, TABLE)
    assert (first.rows_inserted, first.validation.match) == (50, True)
    assert_same(pair)
    pair.run(pair.source, "insert into items (id, name, qty, price) values (51, 'new', 3, 1.5), (52, 'brief', 1, 1);"
                          "update items set qty = qty + 1 where id <= 5;"
                          "update items set name = 'renamed' where id = 6;"
                          "update items set id = 100 where id = 7; delete from items where id in (8, 52);"
                          "update items set price = price where id = 9")  # fmt: skip
    changed = sync_table(pair.source, pair.target, TABLE)
    # 51 and 100 (7's new key) inserted; 1-6 updated (9 kept its values); 7 and 8 deleted, 52 never arrived.
    assert (changed.rows_inserted, changed.rows_updated, changed.rows_deleted) == (2, 6, 2)
    assert writes is None or len(writes[-1]) > 3
    assert_same(pair)
    assert pair.rows(pair.target, "select total, label from raw.items where id in (1, 100) order by id") == [
        (Decimal("0.50"), "ITEM 1#1"), (Decimal("12.25"), "ITEM 7#100")]


def test_a_table_switched_from_cdc_to_incremental_keeps_its_slot_for_drop_replication(pg18_pair: Pair) -> None:
    pair = pg18_pair
    first_copy(pair)
    pair.run(pair.source, "update items set qty = 1000 where id = 1")
    incremental = TABLE.with_overrides(mode="incremental", cursor_column="qty")
    report = sync_table(pair.source, pair.target, incremental)
    assert report.watermark_before is None and report.watermark_after == "1000"  # not the slot's position
    assert_same(pair)
    config = parse_config({"tables": [{"name": "items", "source": "public.items", "target": "raw.items",
                                       "mode": "incremental", "cursor_column": "qty"}]})
    assert len(drop_unconfigured_replication(pair.source, pair.target, config)) == 1
    assert slot_of(pair) is None
    assert pair.rows(pair.target, "select watermark, replication_slot from _copy_engine.sync_state") == [
        ("1000", None)]
    back = sync_table(pair.source, pair.target, TABLE)  # back to cdc: a new slot and a full copy
    assert back.watermark_before is None and slot_of(pair) is not None
    assert_same(pair)


def test_a_latin1_source_arrives_exactly(logical_pg18: PostgresServer) -> None:
    """pgoutput converts values to the session's encoding (UTF8): nothing is read in the wrong one."""
    server = logical_pg18
    name = f"src_latin1_{uuid.uuid4().hex[:8]}"
    pair = Pair(server, server.admin_dsn.rsplit("/", 1)[0] + f"/{name}", server.new_database("dst"))
    pair.run(server.admin_dsn, f"create database {name} encoding 'LATIN1' locale 'C' template template0")
    pair.run(server.admin_dsn, f"alter database {name} set synchronous_commit = on")
    try:
        pair.run(pair.source, "create table items (id int primary key, name text, qty int, big text);"
                              "insert into items values (1, 'café', 1, null), (2, 'ñandú', 2, null)")
        # Validation hashes each side's text in its own encoding, so it cannot compare LATIN1 with UTF8.
        table = TABLE.with_overrides(validate=False)
        sync_table(pair.source, pair.target, table)
        pair.run(pair.source, "update items set name = 'über ÿ' where id = 1;"
                              "insert into items values (3, 'Ø', 3, null)")
        report = sync_table(pair.source, pair.target, table)
        assert (report.rows_inserted, report.rows_updated) == (1, 1)
        query = "select id, name from {} order by id"
        assert pair.rows(pair.target, query.format("raw.items")) == pair.rows(pair.source, query.format("items")) == [
            (1, "über ÿ"), (2, "ñandú"), (3, "Ø")]
    finally:
        drop_pair(pair)


def test_a_replication_role_uses_the_publication_the_owner_created(pg18_pair: Pair) -> None:
    pair = pg18_pair
    role = f"cdc_{uuid.uuid4().hex[:8]}"
    pair.run(pair.source, _CREATE)
    target_database = psycopg.conninfo.conninfo_to_dict(pair.target)["dbname"]
    publication = _cdc.replication_name("raw.items", str(target_database))
    pair.run(pair.source, f"create publication {publication} for table items")
    pair.run(pair.source, f"create role {role} login replication; grant select on items to {role}")
    try:
        as_role = pair.source.replace("postgres@", f"{role}@")
        sync_table(as_role, pair.target, TABLE)
        pair.run(pair.source, "update items set qty = -7 where id = 7")
        report = sync_table(as_role, pair.target, TABLE)
        assert report.rows_updated == 1
        assert_same(pair)
    finally:
        pair.run(pair.source, "select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                              "where database = current_database()")
        pair.run(pair.source, f"drop publication {publication}; drop owned by {role}; drop role {role}")


@pytest.mark.parametrize("values", ["binary", "text"])
def test_every_catalog_type_arrives_exactly(cdc_pair: Pair, values: str, caplog: pytest.LogCaptureFixture) -> None:
    """The wide table of test_types (a column of every catalog type, its array, enums, ranges, ...) through
    CDC: with binary values where binary COPY carries every column, else with text values."""
    pair = cdc_pair
    caplog.set_level("INFO", logger="include.copy_engine")
    wide = build_wide(pair)
    if values == "binary":
        wide = binary_only(pair, wide)
        # A domain column makes the changes arrive as text (the stage would check its constraints).
        domains = {str(name) for (name,) in pair.rows(pair.source, "select a.attname from pg_attribute as a join "
                                                                   "pg_type as t on t.oid = a.atttypid where "
                                                                   "a.attrelid = 'public.wide'::regclass and "
                                                                   "t.typtype = 'd'")}
        assert {"u_positive_price", "u_int_list"} <= domains
        for name in domains:
            pair.run(pair.source, sql.SQL("alter table public.wide drop column {}").format(sql.Identifier(name)))
        wide = Wide([c for c in wide.columns if c.name not in domains], wide.rows)
    else:
        # pgoutput sends xml without a default declaration (<?xml version="1.0"?>): the run restores the text
        # the source stores, which the dump below compares (xml through ::text, arrays through ::text[]).
        assert {"c_xml", "a_xml"} <= {c.name for c in wide.columns}
    table = TableConfig(name="wide", source="public.wide", target="raw.wide", mode="cdc", validate=False)
    first = sync_table(pair.source, pair.target, table)
    assert first.rows_inserted == wide.rows
    change_every_row(pair, wide)
    second = sync_table(pair.source, pair.target, table)
    assert (second.rows_inserted, second.rows_updated, second.rows_deleted) == (1, wide.rows - 1, 1)
    assert ("key(s) to write (binary values)" in caplog.text) == (values == "binary")
    # The read starts with binary values before the columns are known; a table that needs text reads again.
    assert ("reading the changes again with text values" in caplog.text) == (values == "text")
    target, source = wide.dump(pair, pair.target, "raw.wide"), wide.dump(pair, pair.source, "public.wide")
    differing = [(c.name, t[i + 1], s[i + 1]) for t, s in zip(target, source, strict=True)
                 for i, c in enumerate(wide.columns) if t[i + 1] != s[i + 1]]
    assert differing == []
    quiet = sync_table(pair.source, pair.target, table)
    assert (quiet.rows_inserted, quiet.rows_updated, quiet.rows_deleted) == (0, 0, 0)


def test_a_column_type_changed_within_the_changes_reads_them_again_as_text(
        cdc_pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """Binary values of the changes before an ALTER are in the old type: the run reads them all as text."""
    pair = cdc_pair
    caplog.set_level("INFO", logger="include.copy_engine")
    first_copy(pair)
    pair.run(pair.source, "update items set qty = qty + 1 where id <= 3")
    pair.run(pair.source, "alter table items alter column qty type bigint")
    pair.run(pair.source, "update items set qty = 5000000000 where id = 4")
    report = sync_table(pair.source, pair.target, TABLE)
    assert (report.rows_inserted, report.rows_updated, report.rows_deleted) == (0, 4, 0)
    assert "reading the changes again with text values" in caplog.text
    assert_same(pair)
    pair.run(pair.source, "update items set qty = 6000000000 where id = 5")
    caplog.clear()
    again = sync_table(pair.source, pair.target, TABLE)
    assert again.rows_updated == 1 and "key(s) to write (binary values)" in caplog.text
    assert_same(pair)


def test_a_slow_slot_read_outlasts_the_warehouses_idle_transaction_timeout(
        pg18_pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target's transaction is open (its side prepared while a thread reads the slot) during the read."""
    pair = pg18_pair
    first_copy(pair)
    target_database = psycopg.conninfo.conninfo_to_dict(pair.target)["dbname"]
    pair.run(pair.server.admin_dsn, f"alter database {target_database} set idle_in_transaction_session_timeout = 300")
    pair.run(pair.source, "update items set qty = -qty where id <= 3")
    read_changes = _cdc.read_changes

    def slow(*args: object, **kwargs: object) -> Iterator[list[bytes]]:
        time.sleep(1.0)
        yield from read_changes(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_cdc, "read_changes", slow)
    report = sync_table(pair.source, pair.target, TABLE)
    assert report.rows_updated == 3
    assert_same(pair)
