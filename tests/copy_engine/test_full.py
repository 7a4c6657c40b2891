"""Full sync: the target ends identical to the source, atomically, with views and key intact."""

from __future__ import annotations

import json

from include.copy_engine import TableConfig, sync_table

STOCK_DDL = """
create table public.stock_master (
    security_id bigint primary key, isin char(12), ticker text, name_en text, name_ko text,
    exchange_mic char(4), currency char(3), security_type text, status text, listing_date date,
    created_at timestamptz, updated_at timestamptz
)"""

STOCK_ROWS = """
insert into public.stock_master
select i, lpad(i::text, 12, 'K'), 'T' || i, 'Name ' || i, '종목 ' || i, 'XKRX', 'KRW', 'equity', 'active',
       date '2020-01-01' + i, timestamptz '2024-01-01 00:00+00' + i * interval '1 minute',
       timestamptz '2024-06-01 00:00+00' + i * interval '1 minute'
from generate_series(1, %s) as i"""


def make_stock(pair, rows=100):
    pair.run(pair.source, STOCK_DDL)
    pair.run(pair.source, STOCK_ROWS, (rows,))


def test_first_full_sync_creates_the_target_with_its_key(pair):
    make_stock(pair, 100)
    table = TableConfig(name="stock_master", source="public.stock_master")

    report = sync_table(pair.source, pair.target, table)

    assert report.status == "success"
    assert (report.rows_read, report.rows_inserted, report.rows_updated, report.rows_deleted) == (100, 100, 0, 0)
    assert report.validation.match is True
    assert report.validation.source_rows == report.validation.target_rows == 100
    assert "created table raw.stock_master" in report.schema_changes
    query = "select * from {} order by security_id"
    assert pair.rows(pair.target, query.format("raw.stock_master")) == pair.rows(
        pair.source, query.format("public.stock_master"))
    key = pair.rows(pair.target, "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid "
                    "and a.attnum = any(i.indkey) where i.indrelid = 'raw.stock_master'::regclass and i.indisprimary")
    assert key == [("security_id",)]
    data = report.to_dict()
    json.dumps(data)
    assert {"status", "table", "rows_read", "rows_inserted", "rows_updated", "rows_deleted", "duration_s"} <= set(data)
    assert data["validation"]["match"] is True
    assert report.summary().startswith("stock_master [full] success: read 100, inserted 100")


def test_a_full_sync_of_an_unchanged_source_reports_no_change_everywhere(pair):
    from include.ingestion import asset_event_extra

    make_stock(pair, 20_005)
    table = TableConfig(name="stock_master", source="public.stock_master")
    sync_table(pair.source, pair.target, table)
    pair.run(pair.target, "update raw.stock_master set ticker = ticker")  # new row versions, same values

    report = sync_table(pair.source, pair.target, table)

    counts = (20_005, 0, 0, 0, 20_005)
    assert (report.rows_read, report.rows_inserted, report.rows_updated, report.rows_deleted,
            report.rows_replaced) == counts
    assert "read 20005, inserted 0, updated 0, deleted 0, replaced 20005 in " in report.summary()
    extra = asset_event_extra(report)
    assert tuple(extra[key] for key in ("rows_read", "rows_inserted", "rows_updated", "rows_deleted",
                                        "rows_replaced")) == counts
    assert pair.rows(pair.target, "select rows_read, rows_inserted, rows_updated, rows_deleted, rows_replaced "
                     "from _copy_engine.sync_runs order by run_id desc limit 1") == [counts]


def test_second_full_sync_replaces_rows_and_keeps_dependent_views(pair):
    make_stock(pair, 50)
    table = TableConfig(name="stock_master", source="public.stock_master")
    sync_table(pair.source, pair.target, table)
    pair.run(pair.target, "create view public.stg_stock as select security_id, ticker from raw.stock_master")
    pair.run(pair.source, "delete from public.stock_master where security_id <= 10")
    pair.run(pair.source, "update public.stock_master set ticker = 'CHANGED' where security_id = 20")
    pair.run(pair.source, "insert into public.stock_master (security_id, ticker) values (1000, 'NEW')")

    report = sync_table(pair.source, pair.target, table)

    # Against what the target held: one key new, ten gone, the other 40 rows written again in place.
    assert (report.rows_read, report.rows_inserted, report.rows_updated, report.rows_deleted,
            report.rows_replaced) == (41, 1, 0, 10, 40)
    assert pair.scalar(pair.target, "select count(*) from public.stg_stock") == 41
    assert pair.scalar(pair.target, "select ticker from public.stg_stock where security_id = 20") == "CHANGED"
    assert pair.scalar(pair.target, "select min(security_id) from raw.stock_master") == 11
    assert pair.scalar(pair.target, "select count(*) from pg_constraint where conrelid = "
                       "'raw.stock_master'::regclass and contype = 'p'") == 1


def test_parallel_full_copy_by_key_ranges_on_one_snapshot(pair):
    make_stock(pair, 1000)
    table = TableConfig(name="stock_master", source="public.stock_master", parallel=3, validation_ranges=4)
    sync_table(pair.source, pair.target, TableConfig(name="stock_master", source="public.stock_master"))
    pair.run(pair.source, "delete from public.stock_master where security_id > 900")

    report = sync_table(pair.source, pair.target, table)

    assert (report.status, report.workers, report.rows_read, report.rows_inserted, report.rows_deleted,
            report.rows_replaced) == ("success", 3, 900, 0, 100, 900)
    assert report.validation.match is True and report.validation.ranges_checked == 4
    query = "select * from {} order by security_id"
    assert pair.rows(pair.target, query.format("raw.stock_master")) == pair.rows(
        pair.source, query.format("public.stock_master"))
    assert pair.scalar(pair.target, "select count(*) from pg_tables where schemaname = '_copy_engine' "
                       "and tablename like 'stage%'") == 0


def test_a_long_copy_logs_its_progress(pair, monkeypatch, caplog):
    # Every 256 kB the engine forwards to the target is a chance to log; with no interval, each is.
    monkeypatch.setattr("include.copy_engine._copy.PROGRESS_EVERY_S", 0.0)
    make_stock(pair, 20_000)
    with caplog.at_level("INFO", logger="include.copy_engine._copy"):
        report = sync_table(pair.source, pair.target, TableConfig(name="stock_master", source="public.stock_master"))
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stock_master: copying, ")]
    rows = [int(message.split(", ")[1].split()[0]) for message in progress]
    assert len(rows) >= 3, progress
    assert rows == sorted(rows) and 0 < rows[0] and rows[-1] <= report.rows_read + 1
    assert all(" MB so far (" in message and " MB/s)" in message for message in progress)


def test_full_sync_writes_frozen_pages_so_the_first_readers_do_not_rewrite_them(pair):
    # COPY FREEZE into the table truncated in the same transaction: every page is all-visible and
    # all-frozen at commit, so dbt's first read sets no hint bits and vacuum has nothing to freeze.
    make_stock(pair, 5000)
    table = TableConfig(name="stock_master", source="public.stock_master", validate=False)
    sync_table(pair.source, pair.target, table)
    sync_table(pair.source, pair.target, table)

    pair.run(pair.target, "create extension if not exists pageinspect")
    pages = pair.scalar(pair.target, "select pg_relation_size('raw.stock_master') / current_setting('block_size')::int")
    # HEAP_XMIN_FROZEN = 0x0300 in t_infomask.
    tuples = pair.rows(pair.target, f"""
        select count(*), count(*) filter (where t_infomask & 768 = 768)
        from generate_series(0, {pages} - 1) as block,
             heap_page_items(get_raw_page('raw.stock_master', block::int)) where lp_flags = 1""")
    assert tuples == [(5000, 5000)]
    pair.run(pair.target, "create extension if not exists pg_visibility")
    all_visible, all_frozen = pair.rows(
        pair.target, "select all_visible, all_frozen from pg_visibility_map_summary('raw.stock_master')")[0]
    assert all_visible == all_frozen > pages // 2


def test_full_sync_into_an_existing_partitioned_table(pair):
    make_stock(pair, 300)
    pair.run(pair.target, "create schema if not exists raw")
    pair.run(pair.target, "create table raw.stock_master (security_id bigint primary key, isin char(12), ticker text, "
             "name_en text, name_ko text, exchange_mic char(4), currency char(3), security_type text, status text, "
             "listing_date date, created_at timestamptz, updated_at timestamptz) partition by range (security_id)")
    pair.run(pair.target, "create table raw.stock_master_low partition of raw.stock_master "
             "for values from (1) to (150)")
    pair.run(pair.target, "create table raw.stock_master_high partition of raw.stock_master "
             "for values from (150) to (maxvalue)")
    table = TableConfig(name="stock_master", source="public.stock_master")

    report = sync_table(pair.source, pair.target, table)
    report = sync_table(pair.source, pair.target, table)

    assert report.status == "success", report.error
    # The source did not change: nothing inserted or deleted, its 300 rows written again in place.
    assert (report.rows_read, report.rows_inserted, report.rows_deleted, report.rows_replaced) == (300, 0, 0, 300)
    assert report.validation.match is True
    assert pair.rows(pair.target, "select count(*) from raw.stock_master_low") == [(149,)]
    query = "select * from {} order by security_id"
    assert pair.rows(pair.target, query.format("raw.stock_master")) == pair.rows(
        pair.source, query.format("public.stock_master"))
