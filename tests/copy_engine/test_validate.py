"""Validation on its own: checksums per key range name the differing ranges and keys."""

from __future__ import annotations

import pytest

from include.copy_engine import TableConfig, ValidationMismatchError, sync_table, validate_table

from .test_full import make_stock


def test_validation_names_differing_ranges_and_keys(pair):
    make_stock(pair, 1000)
    table = TableConfig(name="stock_master", source="public.stock_master", validation_ranges=10)
    sync_table(pair.source, pair.target, table)
    assert validate_table(pair.source, pair.target, table).match is True

    pair.run(pair.target, "update raw.stock_master set name_en = 'tampered' where security_id = 150")
    pair.run(pair.target, "delete from raw.stock_master where security_id = 777")
    result = validate_table(pair.source, pair.target, table)

    assert result.match is False
    assert (result.source_rows, result.target_rows, result.ranges_checked) == (1000, 999, 10)
    assert [(r.lower, r.upper, r.source_rows, r.target_rows) for r in result.differing_ranges] == [
        ("101", "201", 100, 100), ("701", "801", 100, 99)]
    assert result.differing_keys == [["150"], ["777"]]


def test_validation_mismatch_after_a_sync_fails_the_run(pair):
    make_stock(pair, 20)
    pair.run(pair.source, "create table public.feed (id int primary key, v text, changed_at int)")
    pair.run(pair.source, "insert into public.feed select i, 'v', i from generate_series(1, 10) i")
    table = TableConfig(name="feed", source="public.feed", mode="incremental", cursor_column="changed_at")
    sync_table(pair.source, pair.target, table)
    # A write to the raw table outside the engine, on a row the next batch does not touch.
    pair.run(pair.target, "update raw.feed set v = 'edited' where id = 3")
    pair.run(pair.source, "insert into public.feed values (11, 'v', 11)")

    with pytest.raises(ValidationMismatchError, match=r"^feed: validation found 1 differing key range\(s\) "
                       r"\(source 11 rows, target 11\); first differing keys \[\['3'\]\]"):
        sync_table(pair.source, pair.target, table)
    assert pair.rows(pair.target, "select status, rows_inserted, validation_match from _copy_engine.sync_runs "
                     "order by run_id") == [("success", 10, True), ("failed", 1, False)]


def test_composite_text_key_ranges(pair):
    pair.run(pair.source, "create table public.pairs (a text, b int, v numeric, primary key (a, b))")
    pair.run(pair.source, "insert into public.pairs select chr(65 + i % 26), i, i / 7.0 from generate_series(1, 300) i")
    table = TableConfig(name="pairs", source="public.pairs", validation_ranges=5)
    report = sync_table(pair.source, pair.target, table)
    assert report.validation.match is True and report.validation.ranges_checked == 5
    pair.run(pair.target, "update raw.pairs set v = v + 1 where a = 'C' and b = 2")
    result = validate_table(pair.source, pair.target, table)
    assert result.differing_keys == [["C", "2"]]
