"""The engine's own tables in the warehouse: per-table state (the watermark) and the run audit."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ._report import SyncReport

logger = logging.getLogger(__name__)

STATE_SCHEMA = "_copy_engine"

SYNC_STATE = sql.Identifier(STATE_SCHEMA, "sync_state")
SYNC_RUNS = sql.Identifier(STATE_SCHEMA, "sync_runs")
PARALLEL_RUNS = sql.Identifier(STATE_SCHEMA, "parallel_runs")
PARALLEL_RANGES = sql.Identifier(STATE_SCHEMA, "parallel_ranges")

_CREATE = [
    sql.SQL("create schema if not exists {}").format(sql.Identifier(STATE_SCHEMA)),
    sql.SQL(
        """create table if not exists {} (
            target_table text primary key,
            table_name text not null,
            source text not null,
            mode text not null,
            cursor_column text,
            watermark text,
            last_rows_read bigint not null default 0,
            synced_at timestamptz not null default now()
        )"""
    ).format(SYNC_STATE),
    sql.SQL(
        """create table if not exists {} (
            run_id bigint generated always as identity primary key,
            table_name text not null,
            source text not null,
            target_table text not null,
            mode text not null,
            status text not null check (status in ('success', 'failed')),
            started_at timestamptz not null,
            finished_at timestamptz not null,
            rows_read bigint not null,
            rows_inserted bigint not null,
            rows_updated bigint not null,
            rows_deleted bigint not null,
            rows_replaced bigint not null default 0,
            bytes bigint not null,
            duration_s double precision not null,
            watermark_before text,
            watermark_after text,
            validation_match boolean,
            schema_changes jsonb not null default '[]',
            attempts integer not null,
            error text,
            report jsonb not null
        )"""
    ).format(SYNC_RUNS),
    # A parallel copy's plan and the key ranges it has copied (see _parallel).
    sql.SQL(
        """create table if not exists {} (
            run_key text primary key,
            table_name text not null,
            target_table text not null,
            parts integer not null,
            state text not null default 'planned'
                check (state in ('planned', 'held', 'finished', 'abandoned', 'closed')),
            snapshot text,
            columns jsonb,
            binary_copy boolean,
            schema_changes jsonb not null default '[]',
            reason text,
            planned_at timestamptz not null default now(),
            held_at timestamptz,
            ended_at timestamptz,
            report jsonb
        )"""
    ).format(PARALLEL_RUNS),
    sql.SQL(
        """create table if not exists {} (
            run_key text not null references {} on delete cascade,
            range_index integer not null,
            rows bigint not null,
            bytes bigint not null,
            done_at timestamptz not null default now(),
            primary key (run_key, range_index)
        )"""
    ).format(PARALLEL_RANGES, PARALLEL_RUNS),
    sql.SQL("alter table {} add column if not exists report jsonb").format(PARALLEL_RUNS),
    # Added in 0.2: a full copy's rows written in place of a row with the same key.
    sql.SQL("alter table {} add column if not exists rows_replaced bigint not null default 0").format(SYNC_RUNS),
    # A CDC table's replication slot and publication on the source (both have this name).
    sql.SQL("alter table {} add column if not exists replication_slot text").format(SYNC_STATE),
]

# Serialises the `create ... if not exists` of concurrent first runs, which can otherwise collide.
_SETUP_LOCK_KEY = "copy_engine:setup"
_ALL_PRESENT = """
select to_regclass('_copy_engine.sync_runs') is not null and to_regclass('_copy_engine.sync_state') is not null
   and exists (select from pg_attribute
               where attrelid = to_regclass('_copy_engine.parallel_runs') and attname = 'report')
   and to_regclass('_copy_engine.parallel_ranges') is not null
   and exists (select from pg_attribute
               where attrelid = to_regclass('_copy_engine.sync_runs') and attname = 'rows_replaced')
   and exists (select from pg_attribute
               where attrelid = to_regclass('_copy_engine.sync_state') and attname = 'replication_slot')
"""


def ensure_state_tables(conn: psycopg.Connection) -> None:
    """Create the state schema and tables if missing, in a committed transaction of their own."""
    with conn.transaction():
        exists = conn.execute(_ALL_PRESENT).fetchone()
        if exists and exists[0]:
            return
        conn.execute("select pg_advisory_xact_lock(hashtextextended(%s, 0))", (_SETUP_LOCK_KEY,))
        for statement in _CREATE:
            conn.execute(statement)


def run_lock_key(target: str) -> str:
    """The session advisory lock key that serialises the runs on one target table."""
    return f"copy_engine:{target}"


def read_watermark(conn: psycopg.Connection, target: str, *, cdc: bool = False) -> str | None:
    """The stored watermark: a cursor value, or with `cdc` the source position a CDC run applied.

    Each kind reads only its own: after a change of mode the run starts without one.
    """
    row = conn.execute(
        sql.SQL("select watermark from {} where target_table = %s and (mode = 'cdc') = %s").format(
            SYNC_STATE), (target, cdc)).fetchone()
    return None if row is None else row[0]


def write_state(conn: psycopg.Connection, report: SyncReport, cursor_column: str | None, *,
                replication_slot: str | None = None) -> None:
    """Record the watermark (for CDC: the source position applied, and its slot); called inside the data
    transaction so both commit or neither. A slot once recorded is kept when the table changes mode,
    so that `drop-replication` still finds it."""
    conn.execute(
        sql.SQL(
            """insert into {} as s (target_table, table_name, source, mode, cursor_column, watermark,
                                    last_rows_read, synced_at, replication_slot)
               values (%s, %s, %s, %s, %s, %s, %s, now(), %s)
               on conflict (target_table) do update set
                   table_name = excluded.table_name, source = excluded.source, mode = excluded.mode,
                   cursor_column = excluded.cursor_column, watermark = excluded.watermark,
                   last_rows_read = excluded.last_rows_read, synced_at = excluded.synced_at,
                   replication_slot = coalesce(excluded.replication_slot, s.replication_slot)"""
        ).format(SYNC_STATE),
        (report.target, report.table, report.source, report.mode, cursor_column, report.watermark_after,
         report.rows_read, replication_slot),
    )


def read_cdc_states(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """(target table, source, replication slot) of every table a CDC run has synced into this warehouse."""
    rows = conn.execute(sql.SQL("select target_table, source, replication_slot from {} "
                                "where replication_slot is not null order by target_table").format(SYNC_STATE))
    return [(str(a), str(b), str(c)) for a, b, c in rows.fetchall()]


def forget_replication(conn: psycopg.Connection, target: str) -> None:
    """After its slot is dropped: no slot recorded, and no CDC position (a CDC run starts with a full copy)."""
    conn.execute(sql.SQL("update {} set replication_slot = null, "
                         "watermark = case when mode = 'cdc' then null else watermark end "
                         "where target_table = %s").format(SYNC_STATE), (target,))


_RUN_COLUMNS = ("table_name", "source", "target_table", "mode", "status", "started_at", "finished_at", "rows_read",
                "rows_inserted", "rows_updated", "rows_deleted", "rows_replaced", "bytes", "duration_s",
                "watermark_before", "watermark_after", "validation_match", "schema_changes", "attempts", "error",
                "report")


def _run_values(report: SyncReport) -> tuple[Any, ...]:
    data: dict[str, Any] = report.to_dict()
    data.pop("run_id")  # the row's own run_id column says it
    return (report.table, report.source, report.target, report.mode, report.status, report.started_at,
            report.finished_at or dt.datetime.now(dt.UTC), report.rows_read, report.rows_inserted,
            report.rows_updated, report.rows_deleted, report.rows_replaced, report.bytes, report.duration_s,
            report.watermark_before, report.watermark_after, report.validation.match, Jsonb(report.schema_changes),
            report.attempts, report.error, Jsonb(json.loads(json.dumps(data))))


def record_run(conn: psycopg.Connection, report: SyncReport) -> int:
    """Append the run to `_copy_engine.sync_runs` and return its run_id.

    Inside the data transaction, the row commits with the data or not at all.
    """
    with conn.transaction():
        row = conn.execute(
            sql.SQL("insert into {} ({}) values ({}) returning run_id").format(
                SYNC_RUNS, sql.SQL(", ").join(map(sql.Identifier, _RUN_COLUMNS)),
                sql.SQL(", ").join(sql.Placeholder() * len(_RUN_COLUMNS))),
            _run_values(report)).fetchone()
    assert row is not None
    return int(row[0])


def save_run(conn: psycopg.Connection, report: SyncReport) -> None:
    """Bring the run's row up to date, or append it when it has none yet (its data transaction, if
    any, rolled back); sets `report.run_id`."""
    if report.run_id is None or not update_run(conn, report.run_id, report):
        report.run_id = record_run(conn, report)


def update_run(conn: psycopg.Connection, run_id: int, report: SyncReport) -> bool:
    """Bring the run's row up to date (its end, status and validation); False when there is no such row
    (its data transaction rolled back)."""
    with conn.transaction():
        cursor = conn.execute(
            sql.SQL("update {} set ({}) = ({}) where run_id = %s").format(
                SYNC_RUNS, sql.SQL(", ").join(map(sql.Identifier, _RUN_COLUMNS)),
                sql.SQL(", ").join(sql.Placeholder() * len(_RUN_COLUMNS))),
            (*_run_values(report), run_id))
    return cursor.rowcount > 0
