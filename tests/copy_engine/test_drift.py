"""Schema drift: added, dropped and widened columns, and a type change that is refused."""

from __future__ import annotations

import pytest

from include.copy_engine import SchemaConflictError, TableConfig, sync_table

TABLE = TableConfig(name="items", source="public.items", mode="incremental", cursor_column="changed_at",
                    lookback="1 day")


def make_items(pair):
    pair.run(pair.source, "create table public.items (id int primary key, label varchar(10) not null, "
             "qty integer, changed_at timestamptz not null default '2024-01-01')")
    pair.run(pair.source, "insert into public.items (id, label, qty) values (1, 'a', 1), (2, 'b', 2)")
    sync_table(pair.source, pair.target, TABLE)


def target_types(pair):
    return pair.rows(pair.target, "select attname, format_type(atttypid, atttypmod), attnotnull from pg_attribute "
                     "where attrelid = 'raw.items'::regclass and attnum > 0 and not attisdropped order by attnum")


def test_new_source_column_is_added(pair):
    make_items(pair)
    pair.run(pair.source, "alter table public.items add column price numeric(10,2)")
    pair.run(pair.source, "update public.items set price = 9.99, changed_at = '2024-02-01' where id = 1")

    report = sync_table(pair.source, pair.target, TABLE)

    assert report.schema_changes == ["added column price numeric(10,2)"]
    assert (report.rows_inserted, report.rows_updated) == (0, 1)
    assert pair.rows(pair.target, "select id, price::text from raw.items order by id") == [(1, "9.99"), (2, None)]


def test_dropped_source_column_is_kept_and_filled_with_null(pair):
    make_items(pair)
    pair.run(pair.source, "alter table public.items drop column label")
    pair.run(pair.source, "update public.items set qty = 10, changed_at = '2024-02-01' where id = 1")

    report = sync_table(pair.source, pair.target, TABLE)

    assert report.schema_changes == ["column label is no longer in the source: kept in the target, filled with NULL"]
    assert report.validation.match is True
    # Both rows are re-read through the look-back window and written with NULL in the dropped column.
    assert (report.rows_read, report.rows_updated) == (2, 2)
    assert pair.rows(pair.target, "select id, label, qty from raw.items order by id") == [(1, None, 10), (2, None, 2)]
    assert ("label", "character varying(10)", False) in target_types(pair)


def test_safe_widening_is_applied(pair):
    make_items(pair)
    pair.run(pair.source, "alter table public.items alter column qty type bigint, "
             "alter column label type varchar(50)")
    pair.run(pair.source, "update public.items set qty = 5000000000, changed_at = '2024-02-01' where id = 2")

    report = sync_table(pair.source, pair.target, TABLE)

    assert report.schema_changes == ["widened column label from character varying(10) to character varying(50)",
                                     "widened column qty from integer to bigint"]
    assert pair.scalar(pair.target, "select qty from raw.items where id = 2") == 5000000000
    assert target_types(pair)[1:3] == [("label", "character varying(50)", True), ("qty", "bigint", False)]


def test_narrowing_type_change_is_one_clear_error_and_changes_nothing(pair):
    make_items(pair)
    pair.run(pair.source, "alter table public.items alter column label type integer using 0")

    with pytest.raises(SchemaConflictError) as raised:
        sync_table(pair.source, pair.target, TABLE)

    assert str(raised.value) == (
        "items: column label is character varying(10) in the target raw.items but integer in the source, which "
        "is not a safe widening; change the target column by hand or drop the target table to reload it")
    assert raised.value.report.attempts == 1
    assert pair.rows(pair.target, "select id, label from raw.items order by id") == [(1, "a"), (2, "b")]
