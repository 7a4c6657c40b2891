"""A large table's snapshot holder when its ranges get no worker slot (Celery, Kubernetes), and when they do.

The holder runs as the DAG runs it (`hold_snapshot_in_task` with a count of started ranges); the
count is what Airflow's Task SDK would answer, here a function the test controls.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from include import ingestion
from include.demo_data import generate
from include.ingestion import copy_range_in_task, finish_in_task, hold_snapshot_in_task, plan_ranges
from tests.copy_engine.test_parallel_tasks import run_state, wait_until_held


def test_a_holder_whose_ranges_never_get_a_slot_lets_go_and_fails_with_the_sizing_message(pair, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    generate(pair.source, securities=50, events=1_000)
    monkeypatch.setattr(ingestion, "RANGES_START_TIMEOUT", timedelta(seconds=2))
    parts = plan_ranges("edi_690", pair.source, pair.target)
    run_key = parts[0]["plan"]["run_key"]
    asked = []

    def nothing_started() -> int:
        asked.append(time.monotonic())
        return 0

    started = time.monotonic()
    with pytest.raises(AirflowFailException) as raised:
        hold_snapshot_in_task("edi_690", pair.source, pair.target, parts, {}, nothing_started)
    waited = time.monotonic() - started
    message = str(raised.value)
    assert message == (
        "edi_690: none of its 4 copy_range tasks started within 2s of hold_snapshot starting: every worker slot "
        "is taken, and hold_snapshot holds one for the whole copy. Give the workers at least 2 slots per large "
        "table copied at the same time (5 to copy all its ranges at once; README, 'Sizing worker slots'), then "
        "clear the table's task group from its plan task")
    assert 2 <= waited < 15 and len(asked) >= 1
    assert run_state(pair, run_key) == "abandoned"
    # A range that gets a slot afterwards fails at once, naming why, and nothing reached the target.
    with pytest.raises(AirflowFailException, match="its snapshot is no longer held .*none of its 4 copy_range"):
        copy_range_in_task("edi_690", pair.source, pair.target, parts[0], {})
    assert pair.scalar(pair.target, "select count(*) from raw.edi_690") == 0


def test_a_holder_whose_ranges_start_late_waits_for_them_and_the_copy_completes(pair, monkeypatch):
    """Slots scarcer than holder plus ranges: the ranges run one after another, within the bound."""
    generate(pair.source, securities=50, events=2_000)
    monkeypatch.setattr(ingestion, "RANGES_START_TIMEOUT", timedelta(seconds=20))
    parts = plan_ranges("edi_690", pair.source, pair.target)
    run_key = parts[0]["plan"]["run_key"]
    started = []
    with ThreadPoolExecutor(max_workers=1) as holder_pool:
        holder = holder_pool.submit(hold_snapshot_in_task, "edi_690", pair.source, pair.target, parts, {},
                                    lambda: len(started))
        wait_until_held(pair, run_key)
        time.sleep(3)  # the ranges wait for a slot, but less than the bound
        copied = []
        for part in parts:  # one slot: one range after the other
            started.append(part["index"])
            copied.append(copy_range_in_task("edi_690", pair.source, pair.target, part, {}))
        report = finish_in_task("edi_690", pair.source, pair.target, parts, {})
        assert holder.result(timeout=30) == "finished"
    assert sum(result["rows"] for result in copied) == 2_000
    assert (report.rows_inserted, report.validation.match) == (2_000, True)
    assert pair.scalar(pair.target, "select count(distinct event_id) from raw.edi_690") == 2_000
