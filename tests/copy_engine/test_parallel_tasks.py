"""Parallel copy as separate steps: plan, a snapshot holder, key ranges in other processes, finish.

What an Airflow deployment does with them, without Airflow: the holder and the ranges run in
their own processes or threads and meet only through the warehouse and the exported snapshot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from include.copy_engine import (
    SnapshotReleasedError,
    TableConfig,
    TerminalError,
    TransientError,
    copy_range,
    finish_parallel_copy,
    hold_snapshot,
    plan_parallel_copy,
    sync_table,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]

EVENTS_DDL = """
create table public.events (
    event_id bigint primary key, code text not null, amount numeric(18, 6), changed_at timestamptz not null
)"""

EVENTS_ROWS = """
insert into public.events
select i, 'E' || i, i * 1.5, timestamptz '2026-01-01 00:00+00' + i * interval '1 second'
from generate_series(%s::int, %s::int) as i"""

ORDERED = "select event_id, code, amount::text, changed_at::text from {} order by event_id"

# One step as its own process, as a worker would run it: arguments and result as JSON.
STEP = """
import json, sys
from include.copy_engine import TableConfig, copy_range, hold_snapshot
args = json.loads(sys.argv[1])
table = TableConfig(**args["table"])
if args["step"] == "hold":
    print(json.dumps(hold_snapshot(args["source"], args["target"], table, args["plan"], poll_s=0.05)))
else:
    print(json.dumps(copy_range(args["source"], args["target"], table, args["plan"], args["index"], wait_s=30,
                                poll_s=0.05)))
"""


def make_events(pair, rows):
    pair.run(pair.source, EVENTS_DDL)
    pair.run(pair.source, EVENTS_ROWS, (1, rows))


def full_table(**settings):
    return TableConfig(name="events", source="public.events", target="raw.events", parallel=4,
                       validation_ranges=4, **settings)


def step_process(pair, table_settings, step, plan, index=None):
    args = {"step": step, "source": pair.source, "target": pair.target, "table": table_settings, "plan": plan,
            "index": index}
    return subprocess.Popen([sys.executable, "-c", STEP, json.dumps(args)], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))


def finished(process, timeout=60):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def run_state(pair, run_key):
    return pair.scalar(pair.target, f"select state from _copy_engine.parallel_runs where run_key = '{run_key}'")


def wait_until_held(pair, run_key, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run_state(pair, run_key) == "held":
            return
        time.sleep(0.05)
    raise AssertionError(f"run {run_key} was not held within {timeout}s")


def test_ranges_in_separate_processes_read_one_snapshot_and_the_finish_swaps_atomically(pair):
    make_events(pair, 20_000)
    settings = {"name": "events", "source": "public.events", "target": "raw.events", "parallel": 4,
                "validation_ranges": 4}
    table = TableConfig(**settings)
    expected = pair.rows(pair.source, ORDERED.format("public.events"))

    plan = plan_parallel_copy(pair.source, pair.target, table)
    assert [part["index"] for part in plan["parts"]] == [0, 1, 2, 3]
    assert plan["parts"][0]["label"] == "1/4 event_id […, 5001)"
    holder = step_process(pair, settings, "hold", plan)
    wait_until_held(pair, plan["run_key"])
    # Committed after the snapshot was exported: none of it may reach the target.
    pair.run(pair.source, "update public.events set code = 'CHANGED' where event_id % 100 = 0")
    pair.run(pair.source, "delete from public.events where event_id between 5001 and 5500")
    pair.run(pair.source, EVENTS_ROWS, (20_001, 21_000))
    ranges = [step_process(pair, settings, "range", plan, index) for index in range(4)]
    copied = [finished(process) for process in ranges]
    assert run_state(pair, plan["run_key"]) == "held"

    report = finish_parallel_copy(pair.source, pair.target, table, plan)
    # A retried finish (its worker died after the commit) returns the committed run's report.
    assert finish_parallel_copy(pair.source, pair.target, table, plan).to_dict() == report.to_dict()

    assert finished(holder) == "finished"
    assert sorted(result["rows"] for result in copied) == [5000, 5000, 5000, 5000]
    assert pair.rows(pair.target, ORDERED.format("raw.events")) == expected
    assert pair.scalar(pair.source, "select count(*) from public.events") == 20_500
    assert (report.status, report.workers, report.rows_read, report.rows_inserted, report.rows_deleted) == (
        "success", 4, 20_000, 20_000, 0)
    assert report.bytes == sum(result["bytes"] for result in copied) > 0
    # Validated inside the ranges' snapshot: the source has changed since, and it still matches.
    assert report.validation.match is True and report.validation.source_rows == 20_000
    assert "created table raw.events" in report.schema_changes
    audit = pair.rows(pair.target, "select status, rows_read, rows_inserted, validation_match, "
                      "(report->>'workers')::int from _copy_engine.sync_runs")
    assert audit == [("success", 20_000, 20_000, True, 4)]
    assert pair.scalar(pair.target, "select last_rows_read from _copy_engine.sync_state "
                       "where target_table = 'raw.events'") == 20_000
    assert pair.scalar(pair.target, "select count(*) from pg_tables where schemaname = '_copy_engine' "
                       "and tablename like 'stage%'") == 0


def test_a_retried_range_is_idempotent_and_a_second_run_reports_rows_replaced(pair):
    make_events(pair, 4_000)
    table = full_table()
    sync_table(pair.source, pair.target, table.with_overrides(parallel=1))
    pair.run(pair.source, "delete from public.events where event_id > 3000")
    pair.run(pair.source, "create view public.recent as select 1")
    pair.run(pair.target, "create view public.stg_events as select event_id, code from raw.events")

    plan = plan_parallel_copy(pair.source, pair.target, table, parts=3)
    with ThreadPoolExecutor(max_workers=5) as pool:
        holder = pool.submit(hold_snapshot, pair.source, pair.target, table, plan, poll_s=0.05)
        wait_until_held(pair, plan["run_key"])
        with pytest.raises(TransientError, match="only 0 of 3 key range"):
            finish_parallel_copy(pair.source, pair.target, table, plan)
        first = [pool.submit(copy_range, pair.source, pair.target, table, plan, index) for index in range(3)]
        results = [future.result() for future in first]
        again = copy_range(pair.source, pair.target, table, plan, 1)
        assert again == results[1]
        report = finish_parallel_copy(pair.source, pair.target, table, plan)
        assert holder.result() == "finished"

    assert (report.rows_read, report.rows_inserted, report.rows_deleted, report.rows_replaced, report.workers) == (
        3000, 0, 1000, 3000, 3)
    assert pair.rows(pair.target, ORDERED.format("raw.events")) == pair.rows(pair.source,
                                                                           ORDERED.format("public.events"))
    assert pair.scalar(pair.target, "select count(*) from public.stg_events") == 3000
    assert pair.scalar(pair.target, "select count(*) from _copy_engine.parallel_ranges "
                       f"where run_key = '{plan['run_key']}'") == 3


def test_a_range_retried_after_the_holder_ended_fails_with_one_clear_message(pair):
    make_events(pair, 1_000)
    table = full_table()
    plan = plan_parallel_copy(pair.source, pair.target, table, parts=2)
    with ThreadPoolExecutor(max_workers=3) as pool:
        holder = pool.submit(hold_snapshot, pair.source, pair.target, table, plan, poll_s=0.05)
        wait_until_held(pair, plan["run_key"])
        for index in range(2):
            copy_range(pair.source, pair.target, table, plan, index)
        finish_parallel_copy(pair.source, pair.target, table, plan)
        holder.result()

    with pytest.raises(SnapshotReleasedError) as raised:
        copy_range(pair.source, pair.target, table, plan, 0)
    assert str(raised.value) == (
        f"events: parallel run {plan['run_key']} cannot continue: it has already finished and committed. Every "
        "key range must read the one snapshot of its plan, so restart the copy from a new plan (in Airflow: clear "
        "the table's task group from its plan task)")

    timed_out = plan_parallel_copy(pair.source, pair.target, table, parts=2)
    with pytest.raises(TerminalError, match="not finished within 0s, so its snapshot was released"):
        hold_snapshot(pair.source, pair.target, table, timed_out, timeout_s=0, poll_s=0.01)
    with pytest.raises(SnapshotReleasedError, match=r"^events: .*the snapshot holder timed out after 0s"):
        copy_range(pair.source, pair.target, table, timed_out, 1)
    with pytest.raises(SnapshotReleasedError, match="clear the table's task group from its plan task"):
        hold_snapshot(pair.source, pair.target, table, timed_out)


def test_killing_the_holder_mid_run_leaves_the_target_unchanged_and_a_new_plan_completes(pair):
    make_events(pair, 8_000)
    settings = {"name": "events", "source": "public.events", "target": "raw.events", "parallel": 4,
                "validation_ranges": 4}
    table = TableConfig(**settings)
    sync_table(pair.source, pair.target, table)
    before = pair.rows(pair.target, ORDERED.format("raw.events"))
    pair.run(pair.source, "update public.events set code = 'NEW'")

    plan = plan_parallel_copy(pair.source, pair.target, table)
    holder = step_process(pair, settings, "hold", plan)
    wait_until_held(pair, plan["run_key"])
    for index in range(2):
        copy_range(pair.source, pair.target, table, plan, index)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=30)

    with pytest.raises(SnapshotReleasedError, match="the hold_snapshot process died"):
        copy_range(pair.source, pair.target, table, plan, 2)
    with pytest.raises(SnapshotReleasedError, match="the hold_snapshot process died") as raised:
        finish_parallel_copy(pair.source, pair.target, table, plan)
    assert raised.value.report is not None and raised.value.report.status == "failed"
    assert pair.rows(pair.target, ORDERED.format("raw.events")) == before
    assert pair.scalar(pair.target, "select status from _copy_engine.sync_runs order by run_id desc limit 1") == \
        "failed"

    report = sync_table(pair.source, pair.target, table)
    assert (report.status, report.workers, report.rows_inserted, report.rows_replaced) == ("success", 4, 0, 8_000)
    assert pair.scalar(pair.target, "select count(*) from raw.events where code = 'NEW'") == 8_000


def test_an_incremental_table_splits_only_its_first_load(pair):
    make_events(pair, 3_000)
    table = TableConfig(name="events", source="public.events", target="raw.events", mode="incremental",
                        cursor_column="changed_at", delete_detection="hard", parallel=3)

    first = plan_parallel_copy(pair.source, pair.target, table)
    assert len(first["ranges"]) == 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        holder = pool.submit(hold_snapshot, pair.source, pair.target, table, first, poll_s=0.05)
        wait_until_held(pair, first["run_key"])
        list(pool.map(lambda index: copy_range(pair.source, pair.target, table, first, index), range(3)))
        report = finish_parallel_copy(pair.source, pair.target, table, first)
        assert holder.result() == "finished"
    assert (report.mode, report.rows_inserted, report.watermark_after) == (
        "incremental", 3_000, "2026-01-01 00:50:00+00")

    pair.run(pair.source, "update public.events set code = 'UPDATED', changed_at = changed_at + interval '1 day' "
             "where event_id <= 10")
    pair.run(pair.source, "delete from public.events where event_id > 2990")
    later = plan_parallel_copy(pair.source, pair.target, table)
    assert (later["ranges"], later["parts"]) == ([], [])
    assert hold_snapshot(pair.source, pair.target, table, later) == "none"
    report = finish_parallel_copy(pair.source, pair.target, table, later)
    assert (report.mode, report.workers, report.rows_read, report.rows_updated, report.rows_deleted) == (
        "incremental", 1, 10, 10, 10)
    assert pair.rows(pair.target, ORDERED.format("raw.events")) == pair.rows(pair.source,
                                                                           ORDERED.format("public.events"))


def test_the_ingestion_steps_copy_the_configured_large_table_and_then_sync_it_incrementally(pair):
    """What the DAG's `sync_edi_690` task group calls, with include/config/tables.yml, in threads."""
    from include.demo_data import generate, tick
    from include.ingestion import (
        asset_event_extra,
        copy_range_in_task,
        finish_in_task,
        hold_snapshot_in_task,
        is_large,
        plan_ranges,
        table_config,
    )

    generate(pair.source, securities=200, events=5_000)
    table = table_config("edi_690")
    assert is_large(table) and table.parallel == 4 and table.mode == "incremental"
    ordered = "select * from {} order by event_id"

    def run_group():
        parts = plan_ranges("edi_690", pair.source, pair.target)
        with ThreadPoolExecutor(max_workers=5) as pool:
            holder = pool.submit(hold_snapshot_in_task, "edi_690", pair.source, pair.target, parts, {})
            copied = list(pool.map(lambda part: copy_range_in_task("edi_690", pair.source, pair.target, part, {}),
                                   parts))
            report = finish_in_task("edi_690", pair.source, pair.target, parts, {})
            return parts, holder.result(), copied, report

    parts, held, copied, report = run_group()
    assert [part["label"].split(" ")[0] for part in parts] == ["1/4", "2/4", "3/4", "4/4"]
    assert held == "finished" and sum(result["rows"] for result in copied) == 5_000
    assert asset_event_extra(report) == {
        "mode": "incremental", "rows_read": 5_000, "rows_inserted": 5_000, "rows_updated": 0, "rows_deleted": 0,
        "rows_replaced": 0, "duration_s": report.duration_s, "watermark_before": None,
        "watermark_after": report.watermark_after, "validation_match": True}
    assert report.watermark_after == pair.scalar(pair.source, "select max(changed_at)::text from public.edi_690")

    tick(pair.source, seed=7)
    parts, held, copied, report = run_group()
    assert (parts, held, copied, report.workers, report.validation.match) == ([], "none", [], 1, True)
    assert report.rows_inserted + report.rows_updated > 0
    assert pair.rows(pair.target, ordered.format("raw.edi_690")) == pair.rows(pair.source,
                                                                            ordered.format("public.edi_690"))


class TaskTry:
    """The two attributes of Airflow's task instance that the ingestion's failure policy reads."""

    def __init__(self, try_number, max_tries):
        self.task_id, self.try_number, self.max_tries = "sync_edi_690.step", try_number, max_tries


def test_a_step_that_fails_for_good_releases_the_snapshot_and_later_steps_fail_once_clearly(pair):
    from airflow.sdk.exceptions import AirflowFailException

    from include.demo_data import generate
    from include.ingestion import copy_range_in_task, finish_in_task, hold_snapshot_in_task, plan_ranges

    generate(pair.source, securities=50, events=1_000)
    parts = plan_ranges("edi_690", pair.source, pair.target)
    run_key = parts[0]["plan"]["run_key"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        holder = pool.submit(hold_snapshot_in_task, "edi_690", pair.source, pair.target, parts, {})
        wait_until_held(pair, run_key)
        # A transient failure with tries left keeps the snapshot for the retry...
        with pytest.raises(TransientError, match="only 0 of 4 key range"):
            finish_in_task("edi_690", pair.source, pair.target, parts, {"ti": TaskTry(1, 3)})
        assert run_state(pair, run_key) == "held"
        # ...its last try gives the run up, and the holder lets go at once.
        with pytest.raises(TransientError):
            finish_in_task("edi_690", pair.source, pair.target, parts, {"ti": TaskTry(4, 3)})
        assert holder.result(timeout=30) == "abandoned"
    reason = pair.scalar(pair.target, f"select reason from _copy_engine.parallel_runs where run_key = '{run_key}'")
    assert reason.startswith("sync_edi_690.step failed: edi_690: parallel run")

    with pytest.raises(AirflowFailException) as raised:
        copy_range_in_task("edi_690", pair.source, pair.target, parts[2], {"ti": TaskTry(2, 3)})
    assert str(raised.value).startswith(f"edi_690: parallel run {run_key} cannot continue: its snapshot is no "
                                        "longer held (sync_edi_690.step failed")
    assert str(raised.value).endswith("restart the copy from a new plan (in Airflow: clear the table's task group "
                                      "from its plan task)")
    assert pair.scalar(pair.target, "select to_regclass('raw.edi_690') is not null") is True
    assert pair.scalar(pair.target, "select count(*) from raw.edi_690") == 0
