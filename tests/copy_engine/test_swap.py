"""A parallel full copy swaps its loaded table in for the target and keeps what depends on the target;
what a swap would lose makes it write the rows in place instead."""

from __future__ import annotations

import logging
import threading
import uuid

import psycopg
import pytest

from include.copy_engine import (
    TableConfig,
    copy_range,
    finish_parallel_copy,
    hold_snapshot,
    plan_parallel_copy,
    sync_table,
)
from include.copy_engine._swap import swap_blockers
from tests.copy_engine.test_full import make_stock

ORDERED = "select * from {} order by security_id"
SERIAL = TableConfig(name="stock_master", source="public.stock_master")
PARALLEL = TableConfig(name="stock_master", source="public.stock_master", parallel=2, validation_ranges=4)

TABLE_OID = "select 'raw.stock_master'::regclass::oid"
ACL = "select relacl::text from pg_class where oid = 'raw.stock_master'::regclass"
COMMENTS = ("select obj_description('raw.stock_master'::regclass, 'pg_class'), "
            "col_description('raw.stock_master'::regclass, 3)")
COLUMN_SETTINGS = ("select attname, attstattarget, array(select o from unnest(attoptions) as o "
                   "where o like 'n\\_distinct%')::text from pg_attribute "  # the PG15 here adds its own key
                   "where attrelid = 'raw.stock_master'::regclass and attnum > 0 order by attnum")
TRIGGER = """
create function raw.touch() returns trigger language plpgsql as $$ begin return new; end $$;
create trigger stock_touch before update on raw.stock_master for each row execute function raw.touch()"""


@pytest.fixture
def reader_role(pair):
    """A role that may read the raw table (roles are per server, so its name is unique)."""
    name = f"reader_{uuid.uuid4().hex[:8]}"
    pair.run(pair.target, f"create role {name}")
    yield name
    pair.run(pair.target, f"drop owned by {name}")
    pair.run(pair.target, f"drop role {name}")


def loaded_once_with_changes(pair):
    """raw.stock_master loaded by a serial sync; then the source loses 100 rows and changes one."""
    make_stock(pair, 1000)
    sync_table(pair.source, pair.target, SERIAL)
    pair.run(pair.source, "delete from public.stock_master where security_id > 900")
    pair.run(pair.source, "update public.stock_master set ticker = 'CHANGED' where security_id = 20")


def test_the_swap_keeps_views_grants_comments_owner_and_key_name(pair, reader_role):
    loaded_once_with_changes(pair)
    pair.run(pair.target, "create view public.stg_stock as select security_id, ticker from raw.stock_master")
    pair.run(pair.target, "create view public.stock_count as select count(*) as n from public.stg_stock")
    pair.run(pair.target, "create view public.active_stock with (security_barrier = true) as "
                          "select * from raw.stock_master where status = 'active' with local check option")
    pair.run(pair.target, f"grant select, insert on raw.stock_master to {reader_role}")
    pair.run(pair.target, f"grant select on raw.stock_master to {reader_role}")
    pair.run(pair.target, f"grant usage on schema raw to {reader_role}")
    pair.run(pair.target, "comment on table raw.stock_master is 'securities, copied from the source'")
    pair.run(pair.target, "comment on column raw.stock_master.ticker is 'exchange ticker'")
    pair.run(pair.target, "alter table raw.stock_master alter column ticker set statistics 500, "
                          "alter column ticker set (n_distinct = -0.5)")
    views = "select relname, oid, reloptions::text from pg_class where relname in " \
            "('stg_stock', 'stock_count', 'active_stock') order by 1"
    before = {query: pair.rows(pair.target, query) for query in (views, ACL, COMMENTS, COLUMN_SETTINGS)}
    old_oid = pair.scalar(pair.target, TABLE_OID)

    report = sync_table(pair.source, pair.target, PARALLEL)

    assert (report.status, report.workers, report.rows_read, report.rows_inserted, report.rows_deleted,
            report.rows_replaced) == ("success", 2, 900, 0, 100, 900)
    assert report.validation.match is True
    assert pair.scalar(pair.target, TABLE_OID) != old_oid  # a new table took the name
    assert pair.rows(pair.target, ORDERED.format("raw.stock_master")) == pair.rows(
        pair.source, ORDERED.format("public.stock_master"))
    assert {query: pair.rows(pair.target, query) for query in (views, ACL, COMMENTS, COLUMN_SETTINGS)} == before
    assert pair.scalar(pair.target, "select n from public.stock_count") == 900
    assert pair.scalar(pair.target, "select ticker from public.stg_stock where security_id = 20") == "CHANGED"
    assert pair.scalar(pair.target, "select count(*) from public.active_stock") == 900
    assert pair.rows(pair.target, "select pg_get_userbyid(relowner) = current_user from pg_class "
                     "where oid = 'raw.stock_master'::regclass") == [(True,)]
    assert pair.rows(pair.target, "select conname from pg_constraint where conrelid = 'raw.stock_master'::regclass "
                     "and contype = 'p'") == [("stock_master_pkey",)]
    assert pair.rows(pair.target, "select relname from pg_class where relnamespace in ('raw'::regnamespace, "
                     "'_copy_engine'::regnamespace) and relkind = 'r' and relname not in ('sync_runs', "
                     "'sync_state', 'parallel_runs', 'parallel_ranges') order by 1") == [("stock_master",)]
    assert pair.scalar(pair.target, "select count(*) from pg_stats where schemaname = 'raw' "
                       "and tablename = 'stock_master'") == 12  # analyzed before the swap
    with psycopg.connect(pair.target) as conn:
        conn.execute(f"set role {reader_role}")
        assert conn.execute("select count(*) from raw.stock_master").fetchone() == (900,)


def test_a_table_with_a_trigger_is_written_in_place_and_keeps_it(pair, caplog):
    loaded_once_with_changes(pair)
    pair.run(pair.target, TRIGGER)
    old_oid = pair.scalar(pair.target, TABLE_OID)

    with caplog.at_level(logging.INFO, logger="include.copy_engine"):
        report = sync_table(pair.source, pair.target, PARALLEL)

    assert (report.status, report.rows_read, report.rows_inserted, report.rows_deleted, report.rows_replaced) == (
        "success", 900, 0, 100, 900)
    assert pair.scalar(pair.target, TABLE_OID) == old_oid
    assert pair.rows(pair.target, ORDERED.format("raw.stock_master")) == pair.rows(
        pair.source, ORDERED.format("public.stock_master"))
    assert pair.scalar(pair.target, "select count(*) from pg_trigger where tgname = 'stock_touch'") == 1
    assert ("stock_master: the ranges will be written into the target in place, not swapped in: "
            "trigger stock_touch on table raw.stock_master depends on it") in caplog.text


def test_a_blocker_that_appears_during_the_copy_is_seen_under_the_lock(pair, caplog):
    loaded_once_with_changes(pair)
    old_oid = pair.scalar(pair.target, TABLE_OID)
    plan = plan_parallel_copy(pair.source, pair.target, PARALLEL)
    holder = threading.Thread(target=hold_snapshot, args=(pair.source, pair.target, PARALLEL, plan),
                              kwargs={"poll_s": 0.05})
    holder.start()
    for index in range(len(plan["ranges"])):
        copy_range(pair.source, pair.target, PARALLEL, plan, index, wait_s=30, poll_s=0.05)
    pair.run(pair.target, "create materialized view public.stock_snapshot as select * from raw.stock_master")

    with caplog.at_level(logging.INFO, logger="include.copy_engine"):
        report = finish_parallel_copy(pair.source, pair.target, PARALLEL, plan)
    holder.join(timeout=30)

    assert (report.status, report.rows_inserted, report.rows_deleted, report.rows_replaced) == ("success", 0, 100, 900)
    assert pair.scalar(pair.target, TABLE_OID) == old_oid
    assert pair.rows(pair.target, ORDERED.format("raw.stock_master")) == pair.rows(
        pair.source, ORDERED.format("public.stock_master"))
    assert pair.scalar(pair.target, "select count(*) from public.stock_snapshot") == 1000  # not refreshed
    assert ("stock_master: cannot swap the loaded rows in (materialized view public.stock_snapshot depends on it)"
            "; writing them into the target in place") in caplog.text


def test_swap_blockers_name_what_a_new_table_would_lose(pair):
    target = pair.target
    pair.run(target, "create table public.plain (id bigint primary key, note text check (note <> ''), "
                     "at timestamptz default now())")
    pair.run(target, "create table public.keyless (id bigint)")
    pair.run(target, "create table public.busy (id bigint primary key, code text unique, "
                     "n bigint generated always as identity)")
    pair.run(target, "create table public.child (id bigint primary key, busy_id bigint references public.busy)")
    pair.run(target, "create index busy_code_lower on public.busy (lower(code))")
    pair.run(target, "create unlogged table public.scratch (id bigint primary key)")
    pair.run(target, "create statistics public.busy_code_n on code, n from public.busy")

    def blockers(name):
        with psycopg.connect(target) as conn:
            oid = conn.execute("select %s::regclass::oid", (name,)).fetchone()[0]
            return swap_blockers(conn, oid)

    assert blockers("public.plain") == []
    assert blockers("public.keyless") == ["it has no primary key"]
    assert blockers("public.busy") == [
        "a column is an identity column or has its own grants",
        "constraint busy_code_key on table public.busy depends on it",
        "constraint child_busy_id_fkey on table public.child depends on it",
        "index public.busy_code_lower depends on it",
        "statistics object public.busy_code_n depends on it",
    ]
    assert blockers("public.scratch") == ["it is unlogged or temporary"]
