"""Delete detection: per-range key sums on both sides, then only the differing ranges' keys.

With 5,000 keys the target is split into 256 ranges of about 20 keys, so these tests delete keys in
the open first and last ranges, in adjacent ranges (merged into one span) and in scattered ones,
and check that exactly those keys go and nothing else.
"""

from __future__ import annotations

import psycopg

from include.copy_engine import TableConfig, sync_table
from include.copy_engine._keys import Spans

from .test_full import make_stock

DELETED = [1, 2, 19, 20, 21, 22, 40, 41, 42, 43, 1234, 2500, 3777, 4999, 5000]


def stock_table(**overrides):
    settings = dict(name="stock_master", source="public.stock_master", mode="incremental",
                    cursor_column="updated_at", delete_detection="hard")
    settings.update(overrides)
    return TableConfig(**settings)


def keys(pair, query):
    return [row[0] for row in pair.rows(pair.target, query)]


def test_hard_deletes_at_the_ends_in_adjacent_and_scattered_ranges_are_exact(pair):
    make_stock(pair, 5000)
    table = stock_table()
    sync_table(pair.source, pair.target, table)
    pair.run(pair.source, "delete from public.stock_master where security_id = any(%s)", (DELETED,))
    pair.run(pair.source, "update public.stock_master set ticker = 'UPD', updated_at = '2025-01-01' "
             "where security_id in (3, 18, 4998)")
    pair.run(pair.source, "insert into public.stock_master (security_id, ticker, updated_at) "
             "values (6000, 'NEW', '2025-01-01'), (0, 'LOW', '2025-01-01')")

    report = sync_table(pair.source, pair.target, table)

    assert (report.rows_read, report.rows_inserted, report.rows_updated, report.rows_deleted) == (5, 2, 3, 15)
    assert report.validation.match is True
    remaining = set(keys(pair, "select security_id from raw.stock_master"))
    assert remaining == (set(range(0, 5001)) - set(DELETED)) | {6000}
    assert keys(pair, "select security_id from raw.stock_master where ticker = 'UPD' order by 1") == [3, 18, 4998]

    again = sync_table(pair.source, pair.target, table)
    assert (again.rows_read, again.rows_deleted) == (0, 0)


def test_soft_deletes_in_many_ranges_mark_exactly_the_missing_keys(pair):
    make_stock(pair, 5000)
    table = stock_table(delete_detection="soft")
    assert sync_table(pair.source, pair.target, table).rows_deleted == 0
    pair.run(pair.source, "delete from public.stock_master where security_id = any(%s)", (DELETED,))

    report = sync_table(pair.source, pair.target, table)

    assert (report.rows_read, report.rows_deleted) == (0, 15)
    assert keys(pair, "select security_id from raw.stock_master where _deleted_at is not null order by 1") == DELETED
    assert pair.scalar(pair.target, "select count(*) from raw.stock_master") == 5000
    assert sync_table(pair.source, pair.target, table).rows_deleted == 0


def test_deletes_found_while_the_sync_also_changes_the_target_schema(pair):
    # A new source column is a schema change in the sync's own transaction: the key sums then run
    # in that transaction instead of beside it, and must find the same keys.
    make_stock(pair, 5000)
    table = stock_table()
    sync_table(pair.source, pair.target, table)
    pair.run(pair.source, "alter table public.stock_master add column lot_size integer")
    pair.run(pair.source, "delete from public.stock_master where security_id = any(%s)", (DELETED,))

    report = sync_table(pair.source, pair.target, table)

    assert report.schema_changes == ["added column lot_size integer"]
    assert (report.rows_read, report.rows_deleted) == (0, 15)
    assert report.validation.match is True
    assert set(keys(pair, "select security_id from raw.stock_master")) == set(range(1, 5001)) - set(DELETED)


def test_deletes_of_the_first_and_last_text_keys(pair):
    pair.run(pair.source, "create table public.codes (code text primary key, label text, changed_at int)")
    pair.run(pair.source, "insert into public.codes select 'C' || lpad(i::text, 5, '0'), 'l', 1 "
             "from generate_series(1, 4000) as i")
    table = TableConfig(name="codes", source="public.codes", mode="incremental", cursor_column="changed_at",
                        delete_detection="hard")
    sync_table(pair.source, pair.target, table)
    gone = ["C00001", "C00002", "C01000", "C01001", "C03999", "C04000"]
    pair.run(pair.source, "delete from public.codes where code = any(%s)", (gone,))

    report = sync_table(pair.source, pair.target, table)

    assert (report.rows_read, report.rows_deleted) == (0, 6)
    assert report.validation.match is True
    remaining = set(keys(pair, "select code from raw.codes"))
    assert remaining == {f"C{i:05d}" for i in range(1, 4001)} - set(gone)


def test_spans_merge_adjacent_ranges_and_keep_the_open_ends():
    bounds = ["10", "20", "30", "40"]
    assert Spans.of_ranges("id", "bigint", bounds, [0, 1, 3]).spans == [(None, "20"), ("30", "40")]
    assert Spans.of_ranges("id", "bigint", bounds, [4, 2]).spans == [("20", "30"), ("40", None)]
    assert Spans.of_ranges("id", "bigint", [], [0]).spans == [(None, None)]


def test_when_the_extra_connections_are_refused_the_sync_sums_the_keys_itself(pair, caplog):
    # A role allowed two connections: the sync's own two work, the two beside it are refused, and
    # the deletes are still found exactly, inside the sync's transaction.
    role = f"limited_{pair.target.rsplit('/', 1)[-1]}"
    target_db, source_db = pair.target.rsplit("/", 1)[-1], pair.source.rsplit("/", 1)[-1]
    make_stock(pair, 5000)
    pair.run(pair.target, f'create role "{role}" login connection limit 2')
    try:
        pair.run(pair.target, f'alter database "{target_db}" owner to "{role}"')
        pair.run(pair.source, f'grant select on public.stock_master to "{role}"')
        pair.run(pair.source, f'grant connect on database "{source_db}" to "{role}"')
        source, target = (psycopg.conninfo.make_conninfo(dsn, user=role) for dsn in (pair.source, pair.target))
        table = stock_table()
        sync_table(source, target, table)
        pair.run(pair.source, "delete from public.stock_master where security_id = any(%s)", (DELETED,))

        with caplog.at_level("WARNING", logger="include.copy_engine._sync"):
            report = sync_table(source, target, table)

        assert report.status == "success", report.error
        assert (report.rows_read, report.rows_deleted) == (0, 15)
        assert report.validation.match is True
        assert set(keys(pair, "select security_id from raw.stock_master")) == set(range(1, 5001)) - set(DELETED)
        warnings = [r.getMessage() for r in caplog.records if "keys beside the sync failed" in r.getMessage()]
        assert len(warnings) == 1 and "too many connections" in warnings[0], warnings
    finally:
        pair.run(pair.target, f'alter database "{target_db}" owner to current_user')
        pair.run(pair.source, f'drop owned by "{role}"')
        pair.run(pair.target, f'drop owned by "{role}"')
        pair.run(pair.target, f'drop role "{role}"')
