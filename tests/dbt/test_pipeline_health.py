"""The pipeline-health mart reflects the copy engine's runs just made: successes and failures."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from include.copy_engine import CopyEngineError, SourceError, SyncReport, TableConfig, sync_table
from include.demo_data import generate, tick
from tests.conftest import PostgresServer
from tests.dbt.conftest import fetch, run_dbt

STOCK_MASTER = TableConfig(name="stock_master", source="public.stock_master", target="raw.stock_master",
                           mode="incremental", cursor_column="updated_at", delete_detection="hard")
EDI_690 = TableConfig(name="edi_690", source="public.edi_690", target="raw.edi_690",
                      mode="incremental", cursor_column="changed_at", delete_detection="hard")
# The events copied in full too: its runs count keys added and removed, and rows replaced.
EVENTS_FULL = TableConfig(name="edi_690_full", source="public.edi_690", target="raw.edi_690_full")
EVENT_KEYS = "select event_id from public.edi_690"


def _failed_run(source: str, warehouse: str, table: TableConfig) -> SyncReport:
    with pytest.raises(CopyEngineError) as raised:
        sync_table(source, warehouse, table)
    return raised.value.report


@pytest.fixture
def runs(postgres_server: PostgresServer) -> tuple[str, dict[str, list[SyncReport]]]:
    """Two ingestions around a tick, a full copy of an unchanged source, then two failing runs; the
    reports per target table."""
    source = postgres_server.new_database("health_source")
    warehouse = postgres_server.new_database("health_warehouse")
    try:
        generate(source, securities=200, events=1500, seed=3)
        reports: dict[str, list[SyncReport]] = {"raw.stock_master": [], "raw.edi_690": [], "raw.edi_690_full": [],
                                                "raw.no_such_table": []}
        for table in (STOCK_MASTER, EDI_690, EVENTS_FULL):
            reports[table.target].append(sync_table(source, warehouse, table))
        keys_before_tick = {row["event_id"] for row in fetch(source, EVENT_KEYS)}
        tick(source, seed=4)
        with psycopg.connect(source, autocommit=True) as conn:  # and a few events deleted for good
            conn.execute("delete from public.edi_690 where event_id in (7, 70, 700)")
        keys_after_tick = {row["event_id"] for row in fetch(source, EVENT_KEYS)}
        for table in (STOCK_MASTER, EDI_690, EVENTS_FULL, EVENTS_FULL):
            reports[table.target].append(sync_table(source, warehouse, table))
        # A custom condition naming a column the source lacks fails edi_690's third run.
        unknown_column = EDI_690.with_overrides(where="no_such_column > 0")
        reports["raw.edi_690"].append(_failed_run(source, warehouse, unknown_column))
        reports["raw.no_such_table"].append(_failed_run(
            source, warehouse, TableConfig(name="no_such_table", source="public.no_such_table")))
        yield warehouse, reports, (keys_before_tick, keys_after_tick)
    finally:
        postgres_server.drop_database(source)
        postgres_server.drop_database(warehouse)


def test_pipeline_health_shows_last_success_failures_and_rows_moved(runs, tmp_path: Path) -> None:
    warehouse, reports, (keys_before_tick, keys_after_tick) = runs
    run_dbt(["build", "--select", "+pipeline_health"], dsn=warehouse, work_dir=tmp_path)
    health = {row["target_table"]: row for row in fetch(warehouse, "select * from marts.pipeline_health")}

    assert set(health) == set(reports)
    for target, table_reports in reports.items():
        row = health[target]
        successes = [report for report in table_reports if report.status == "success"]
        last = table_reports[-1]
        assert row["runs"] == len(table_reports), target
        assert row["failed_runs"] == row["failed_runs_last_24h"] == len(table_reports) - len(successes), target
        assert row["last_run_status"] == last.status, target
        assert row["last_error"] == (last.error if last.status == "failed" else None), target
        assert row["rows_changed_total"] == sum(
            r.rows_inserted + r.rows_updated + r.rows_deleted for r in successes), target
        if not successes:
            assert row["last_success_at"] is None and row["last_success_rows_read"] is None
            continue
        success = successes[-1]
        assert row["last_success_at"] == success.finished_at, target
        assert (row["last_success_mode"], row["last_success_rows_read"], row["last_success_rows_inserted"],
                row["last_success_rows_updated"], row["last_success_rows_deleted"], row["last_success_rows_replaced"],
                row["last_success_watermark"], row["last_success_validation_match"]) == (
            success.mode, success.rows_read, success.rows_inserted, success.rows_updated, success.rows_deleted,
            success.rows_replaced, success.watermark_after, True), target
        assert row["max_success_duration_seconds"] == pytest.approx(max(r.duration_s for r in successes)), target

    # The figures the assertions above compare are not all zero: a first load, then the tick's changes.
    stock_master = reports["raw.stock_master"]
    assert stock_master[0].rows_inserted == 200 and stock_master[1].rows_read < 200
    assert stock_master[1].rows_updated + stock_master[1].rows_inserted + stock_master[1].rows_deleted > 0
    # The full copies against what the target held: a first load, the tick's new and deleted events
    # (the other events written again in place), then a run of an unchanged source: no change.
    first, after_tick, unchanged = reports["raw.edi_690_full"]
    added, removed = keys_after_tick - keys_before_tick, keys_before_tick - keys_after_tick
    assert added and removed
    assert (first.rows_inserted, first.rows_updated, first.rows_deleted, first.rows_replaced) == (1500, 0, 0, 0)
    assert (after_tick.rows_inserted, after_tick.rows_updated, after_tick.rows_deleted, after_tick.rows_replaced) == (
        len(added), 0, len(removed), 1500 - len(removed))
    assert (unchanged.rows_read, unchanged.rows_inserted, unchanged.rows_updated, unchanged.rows_deleted,
            unchanged.rows_replaced) == (len(keys_after_tick), 0, 0, 0, len(keys_after_tick))
    assert f"inserted 0, updated 0, deleted 0, replaced {len(keys_after_tick)} in " in unchanged.summary()
    assert health["raw.edi_690_full"]["rows_changed_total"] == 1500 + len(added) + len(removed)
    assert health["raw.edi_690"]["last_run_status"] == "failed"
    assert "no_such_column" in health["raw.edi_690"]["last_error"]
    assert health["raw.edi_690"]["last_success_at"] == reports["raw.edi_690"][1].finished_at
    assert reports["raw.no_such_table"][0].error_type == SourceError.__name__
    assert (health["raw.no_such_table"]["runs"], health["raw.no_such_table"]["rows_changed_total"]) == (1, 0)
    assert "public.no_such_table" in health["raw.no_such_table"]["last_error"]

