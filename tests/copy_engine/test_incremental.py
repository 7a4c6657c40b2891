"""Incremental sync: upsert by key, watermark in the warehouse, look-back, delete detection."""

from __future__ import annotations

from include.copy_engine import TableConfig, sync_table

from .test_full import make_stock


def stock_table(**overrides):
    settings = dict(name="stock_master", source="public.stock_master", mode="incremental",
                    cursor_column="updated_at", delete_detection="hard")
    settings.update(overrides)
    return TableConfig(**settings)


def test_incremental_run_after_inserts_updates_and_deletes_counts_exactly(pair):
    make_stock(pair, 100)
    table = stock_table()
    first = sync_table(pair.source, pair.target, table)
    assert (first.rows_read, first.rows_inserted, first.rows_updated, first.rows_deleted) == (100, 100, 0, 0)
    assert first.watermark_before is None
    assert first.watermark_after == "2024-06-01 01:40:00+00"

    pair.run(pair.source, "insert into public.stock_master (security_id, ticker, updated_at) "
             "select i, 'N' || i, timestamptz '2024-07-01 00:00+00' from generate_series(101, 103) as i")
    pair.run(pair.source, "update public.stock_master set ticker = 'UPD', updated_at = '2024-07-02 00:00+00' "
             "where security_id in (5, 6)")
    pair.run(pair.source, "delete from public.stock_master where security_id in (1, 2, 3, 4)")
    xmin_before = pair.scalar(pair.target, "select xmin::text from raw.stock_master where security_id = 50")

    second = sync_table(pair.source, pair.target, table)

    assert (second.rows_read, second.rows_inserted, second.rows_updated, second.rows_deleted) == (5, 3, 2, 4)
    assert second.watermark_before == "2024-06-01 01:40:00+00"
    assert second.watermark_after == "2024-07-02 00:00:00+00"
    assert second.validation.match is True
    assert pair.scalar(pair.target, "select count(*) from raw.stock_master") == 99
    assert pair.rows(pair.target, "select ticker from raw.stock_master where security_id in (5, 6)") == [
        ("UPD",), ("UPD",)]
    assert pair.scalar(pair.target, "select xmin::text from raw.stock_master where security_id = 50") == xmin_before

    idle = sync_table(pair.source, pair.target, table)
    assert (idle.rows_read, idle.rows_inserted, idle.rows_updated, idle.rows_deleted) == (0, 0, 0, 0)
    assert idle.watermark_after == idle.watermark_before == "2024-07-02 00:00:00+00"

    state = pair.rows(pair.target, "select watermark, cursor_column from _copy_engine.sync_state "
                      "where target_table = 'raw.stock_master'")
    assert state == [("2024-07-02 00:00:00+00", "updated_at")]
    runs = pair.rows(pair.target, "select status, rows_read, rows_inserted, rows_updated, rows_deleted, "
                     "watermark_before, watermark_after, validation_match from _copy_engine.sync_runs order by run_id")
    assert runs == [
        ("success", 100, 100, 0, 0, None, "2024-06-01 01:40:00+00", True),
        ("success", 5, 3, 2, 4, "2024-06-01 01:40:00+00", "2024-07-02 00:00:00+00", True),
        ("success", 0, 0, 0, 0, "2024-07-02 00:00:00+00", "2024-07-02 00:00:00+00", True),
    ]


def test_lookback_catches_late_rows_and_unchanged_rows_are_not_counted(pair):
    make_stock(pair, 10)
    table = stock_table(lookback="1 day", delete_detection="none")
    sync_table(pair.source, pair.target, table)
    # A row committed late with an updated_at before the watermark, inside the look-back window.
    pair.run(pair.source, "insert into public.stock_master (security_id, ticker, updated_at) "
             "values (500, 'LATE', timestamptz '2024-06-01 00:00+00')")

    report = sync_table(pair.source, pair.target, table)

    # All 11 rows are within a day of the watermark and re-read; only the late one is written.
    assert (report.rows_read, report.rows_inserted, report.rows_updated) == (11, 1, 0)
    assert pair.scalar(pair.target, "select ticker from raw.stock_master where security_id = 500") == "LATE"


def test_several_versions_of_a_key_resolve_to_the_latest(pair):
    pair.run(pair.source, "create table public.price_feed (security_id bigint, price numeric(12,4), "
             "changed_at timestamptz)")
    pair.run(pair.source, "insert into public.price_feed values (1, 10, '2024-01-01'), (1, 11, '2024-01-03'), "
             "(1, 12, '2024-01-02'), (2, 20, '2024-01-01')")
    table = TableConfig(name="prices", source="public.price_feed", target="raw.prices", mode="incremental",
                        cursor_column="changed_at", primary_key=("security_id",), validate=False,
                        select="select security_id, price, changed_at from public.price_feed")

    report = sync_table(pair.source, pair.target, table)

    assert (report.rows_read, report.rows_inserted, report.rows_updated) == (4, 2, 0)
    assert pair.rows(pair.target, "select security_id, price::text from raw.prices order by 1") == [
        (1, "11.0000"), (2, "20.0000")]


def test_soft_delete_marks_rows_and_a_returning_row_is_unmarked(pair):
    make_stock(pair, 5)
    table = stock_table(delete_detection="soft")
    sync_table(pair.source, pair.target, table)
    pair.run(pair.source, "delete from public.stock_master where security_id = 2")

    report = sync_table(pair.source, pair.target, table)

    assert report.rows_deleted == 1
    assert report.validation.match is True
    assert pair.rows(pair.target, "select security_id from raw.stock_master where _deleted_at is not null") == [(2,)]
    assert pair.scalar(pair.target, "select count(*) from raw.stock_master") == 5
    assert sync_table(pair.source, pair.target, table).rows_deleted == 0

    pair.run(pair.source, "insert into public.stock_master (security_id, ticker, updated_at) "
             "values (2, 'BACK', '2025-01-01')")
    back = sync_table(pair.source, pair.target, table)
    assert (back.rows_inserted, back.rows_updated, back.rows_deleted) == (0, 1, 0)
    assert pair.rows(pair.target, "select ticker, _deleted_at from raw.stock_master where security_id = 2") == [
        ("BACK", None)]


def test_custom_where_select_and_count(pair):
    make_stock(pair, 20)
    table = TableConfig(name="stock_even", source="public.stock_master", target="raw.stock_even",
                        where="security_id % 2 = 0 and ticker like 'T%'",
                        count_query="select count(*) from public.stock_master where security_id % 2 = 0")

    report = sync_table(pair.source, pair.target, table)

    assert report.rows_read == 10
    assert report.validation.match is True
    assert report.validation.source_rows == 10
    assert pair.scalar(pair.target, "select sum(security_id) from raw.stock_even") == sum(range(2, 21, 2))


def test_delete_detection_with_a_composite_text_key(pair):
    pair.run(pair.source, "create table public.listings (mic text, ticker text, name text, changed_at int, "
             "primary key (mic, ticker))")
    pair.run(pair.source, "insert into public.listings select 'X' || (i % 3), 'T' || i, 'n', 1 "
             "from generate_series(1, 3000) as i")
    table = TableConfig(name="listings", source="public.listings", mode="incremental", cursor_column="changed_at",
                        delete_detection="hard")
    sync_table(pair.source, pair.target, table)
    pair.run(pair.source, "delete from public.listings where ticker in ('T7', 'T1500', 'T2999')")

    report = sync_table(pair.source, pair.target, table)

    assert (report.rows_read, report.rows_deleted) == (0, 3)
    assert report.validation.match is True
    assert pair.scalar(pair.target, "select count(*) from raw.listings") == 2997
