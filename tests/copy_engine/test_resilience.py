"""Crash safety, retries and the per-table run lock, with real processes and real backends."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from include.copy_engine import ConcurrentRunError, TableConfig, sync_table

# Makes the source stream slowly (a 20 ms pause every 100 rows) so there is time to interfere.
SLOW_WHERE = "pg_sleep(case when id % 100 = 0 then 0.02 else 0 end) is not null"


def make_ticks(pair, rows):
    pair.run(pair.source, "create table public.ticks (id int primary key, payload text, "
             "changed_at timestamptz not null default '2024-01-01')")
    pair.run(pair.source, "insert into public.ticks (id, payload) select i, repeat('x', 50) "
             "from generate_series(1, %s) as i", (rows,))


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def copying_into(dsn):
    """Rows the running COPY FROM has written into the target so far (0 when none is running)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("select tuples_processed from pg_stat_progress_copy where datname = current_database() "
                           "and command = 'COPY FROM'").fetchone()
        return row[0] if row and row[0] > 0 else 0


def test_a_run_killed_mid_copy_leaves_the_target_unchanged_and_the_next_run_completes(pair):
    make_ticks(pair, 10)
    sync_table(pair.source, pair.target, TableConfig(name="ticks", source="public.ticks"))
    pair.run(pair.source, "insert into public.ticks (id, payload) select i, 'new' from generate_series(11, 20000) i")
    before = pair.rows(pair.target, "select * from raw.ticks order by id")
    state_before = pair.rows(pair.target, "select synced_at from _copy_engine.sync_state")
    command = [sys.executable, "-m", "include.copy_engine", "sync", "--source", pair.source, "--target",
               pair.target, "--table", "public.ticks", "--target-table", "raw.ticks", "--where", SLOW_WHERE]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: copying_into(pair.target) > 0)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL

    assert pair.rows(pair.target, "select * from raw.ticks order by id") == before
    assert pair.rows(pair.target, "select synced_at from _copy_engine.sync_state") == state_before

    finished = subprocess.run(command[:-2], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert (report["status"], report["rows_read"], report["validation"]["match"]) == ("success", 20000, True)
    assert pair.scalar(pair.target, "select count(*) from raw.ticks") == 20000


def test_a_dropped_source_connection_is_retried(pair):
    make_ticks(pair, 5000)
    table = TableConfig(name="ticks", source="public.ticks", where=SLOW_WHERE, retry_backoff_s=0.05)
    terminated = []

    def terminate_source_copy():
        def source_copy_pid():
            with psycopg.connect(pair.source, autocommit=True) as conn:
                row = conn.execute("select pid from pg_stat_activity where datname = current_database() "
                                   "and query like 'copy (%%' and state = 'active'").fetchone()
                return row[0] if row else None

        try:
            pid = wait_for(source_copy_pid)
            with psycopg.connect(pair.source, autocommit=True) as conn:
                terminated.append(conn.execute("select pg_terminate_backend(%s)", (pid,)).fetchone()[0])
        except AssertionError as error:
            terminated.append(error)

    killer = threading.Thread(target=terminate_source_copy)
    killer.start()
    report = sync_table(pair.source, pair.target, table)
    killer.join()

    assert terminated == [True]
    assert (report.status, report.attempts, report.rows_read) == ("success", 2, 5000)
    assert report.validation.match is True
    assert pair.scalar(pair.target, "select count(*) from raw.ticks") == 5000


def test_a_second_run_on_the_same_target_waits_or_fails_clearly(pair):
    make_ticks(pair, 5000)
    # About a second of streaming: 10 pauses of 100 ms.
    slow = TableConfig(name="ticks", source="public.ticks",
                       where="pg_sleep(case when id % 500 = 0 then 0.1 else 0 end) is not null")
    results = {}

    def run(key, table):
        try:
            results[key] = sync_table(pair.source, pair.target, table)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            results[key] = error

    def holds_lock():
        return pair.scalar(pair.target, "select count(*) from pg_locks where locktype = 'advisory' and granted "
                           "and database = (select oid from pg_database where datname = current_database())")

    first = threading.Thread(target=run, args=("first", slow))
    first.start()
    wait_for(holds_lock)
    impatient = TableConfig(name="ticks", source="public.ticks", lock_wait_s=0.3)
    with pytest.raises(ConcurrentRunError, match=r"^ticks: another run is syncing raw.ticks and still holds its "
                       r"lock after \d+\.\ds; let it finish, or raise lock_wait_s$") as raised:
        sync_table(pair.source, pair.target, impatient)
    waited = float(re.search(r"after (\d+\.\d)s", str(raised.value)).group(1))
    assert waited >= 0.3  # it waited for lock_wait_s; how much longer depends on the machine's load
    assert raised.value.report.attempts == 1
    patient = threading.Thread(target=run, args=("second", TableConfig(name="ticks", source="public.ticks")))
    patient.start()
    first.join()
    patient.join()

    assert results["first"].status == "success" and results["second"].status == "success"
    assert results["second"].finished_at > results["first"].finished_at
    # It replaced what the first run wrote, not interleaved with it.
    assert (results["second"].rows_inserted, results["second"].rows_replaced) == (0, 5000)
    assert pair.scalar(pair.target, "select count(*) from raw.ticks") == 5000


def test_two_tables_loading_into_a_new_schema_at_once_both_succeed(pair):
    """Mapped Airflow tasks copy several tables at the same moment into a schema none has made yet."""
    for name in ("left_t", "right_t"):
        pair.run(pair.source, f"create table public.{name} (id int primary key, v text)")
        pair.run(pair.source, f"insert into public.{name} select i, 'v' || i from generate_series(1, 20000) as i")
    barrier = threading.Barrier(2)
    reports, errors = {}, []

    def load(name):
        barrier.wait()
        try:
            reports[name] = sync_table(pair.source, pair.target, TableConfig(name=name, source=f"public.{name}",
                                                                            target=f"fresh_schema.{name}"))
        except Exception as error:  # the assertion below shows it
            errors.append(error)

    threads = [threading.Thread(target=load, args=(name,)) for name in ("left_t", "right_t")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert {name: report.to_dict()["rows_inserted"] for name, report in reports.items()} == {
        "left_t": 20000, "right_t": 20000}
    assert pair.scalar(pair.target, "select count(*) from fresh_schema.left_t") == 20000
    assert pair.scalar(pair.target, "select count(*) from fresh_schema.right_t") == 20000


def test_the_audit_row_commits_with_the_data_and_is_completed_after_validation(pair, monkeypatch):
    from include.copy_engine import _api

    pair.run(pair.source, "create table public.feed (id int primary key, v text, changed_at int)")
    pair.run(pair.source, "insert into public.feed select i, 'v', i from generate_series(1, 10) i")
    table = TableConfig(name="feed", source="public.feed", mode="incremental", cursor_column="changed_at")
    runs = ("select run_id, status, rows_inserted, watermark_after, validation_match from _copy_engine.sync_runs "
            "order by run_id")
    # The process dies right after the data's commit: the final update of its audit row never happens.
    monkeypatch.setattr(_api, "record_final", lambda target_dsn, report: None)
    first = sync_table(pair.source, pair.target, table)
    monkeypatch.undo()
    assert pair.rows(pair.target, runs) == [(first.run_id, "success", 10, "10", None)]

    pair.run(pair.source, "insert into public.feed values (11, 'v', 11)")
    second = sync_table(pair.source, pair.target, table)

    assert second.run_id > first.run_id
    assert pair.rows(pair.target, runs) == [(first.run_id, "success", 10, "10", None),
                                            (second.run_id, "success", 1, "11", True)]
    assert pair.scalar(pair.target, f"select report->>'duration_s' from _copy_engine.sync_runs "
                       f"where run_id = {second.run_id}") == str(second.duration_s)
