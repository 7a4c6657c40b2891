"""Per-phase profile of a CDC run against the cursor incremental runs, for the same changes.

    .venv/bin/python -m bench.cdc_profile --rows 2000000 --repeat 3

The setup of bench.cdc_bench (two throwaway PostgreSQL 18 servers, the 2M-row table synced three
ways, each round updating 1% of the rows and deleting 0.01%); each timed run is wrapped in a
profiler that times the engine's steps (self time, nested) and every SQL statement each step sends.
Prints, per run, the median seconds of each step over the rounds (self time: a step's nested steps
are their own lines) and of each statement above `--statements` seconds. With `--explain FILE`, the
warehouse logs the plan of every statement over 20 ms (auto_explain with ANALYZE, BUFFERS, WAL) and
its log is copied to FILE.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.cdc_bench import bench_databases, logical_server
from bench.copy_engine_bench import execute, settle
from include.copy_engine import TableConfig, _api, _cdc, _keys, _run, _sync, sync_table
from include.local_stack.postgres import EmbeddedPostgres, free_port


class Profile:
    """Self time per step path ("a > b"), and per (step, statement) the time spent in psycopg calls."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.self_s: dict[str, float] = defaultdict(float)
        self.statements: dict[tuple[str, str], float] = defaultdict(float)
        self.started: list[float] = []

    def enter(self, name: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # the key sums beside an incremental sync: their time is the sync's wait for them
        now = time.perf_counter()
        if self.stack:
            self.self_s[self.path()] += now - self.started[-1]
        self.stack.append(name)
        self.started.append(now)

    def leave(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        now = time.perf_counter()
        self.self_s[self.path()] += now - self.started.pop()
        self.stack.pop()
        if self.started:
            self.started[-1] = now

    def path(self) -> str:
        return " > ".join(self.stack)


PROFILE = Profile()


def wrap(owner: Any, name: str, label: str | None = None) -> None:
    original = getattr(owner, name)
    label = label or name

    def timed(*args: Any, **kwargs: Any) -> Any:
        PROFILE.enter(label)
        try:
            return original(*args, **kwargs)
        finally:
            PROFILE.leave()

    setattr(owner, name, timed)


def wrap_generator(owner: Any, name: str) -> None:
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        iterator = original(*args, **kwargs)
        while True:
            PROFILE.enter(name)
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                PROFILE.leave()
            yield item

    setattr(owner, name, timed)


def wrap_context(owner: Any, name: str) -> None:
    original = getattr(owner, name)

    @contextmanager
    def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        PROFILE.enter(name + " (enter)")
        manager = original(*args, **kwargs)
        try:
            value = manager.__enter__()
        finally:
            PROFILE.leave()
        try:
            yield value
        except BaseException:
            if not manager.__exit__(*sys.exc_info()):
                raise
        else:
            PROFILE.enter(name + " (exit)")
            try:
                manager.__exit__(None, None, None)
            finally:
                PROFILE.leave()

    setattr(owner, name, timed)


def instrument() -> None:
    # Statements: the time psycopg spends in each call, under the step that sends it.
    def timed_execute(original: Callable[..., Any]) -> Callable[..., Any]:
        def execute_(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            conn = self if isinstance(self, psycopg.Connection) else self.connection
            text = query.as_string(conn) if hasattr(query, "as_string") else str(query)
            started = time.perf_counter()
            try:
                return original(self, query, *args, **kwargs)
            finally:
                if threading.current_thread() is threading.main_thread():
                    PROFILE.statements[(PROFILE.path(), " ".join(text.split())[:90])] += time.perf_counter() - started
        return execute_

    psycopg.Cursor.execute = timed_execute(psycopg.Cursor.execute)  # type: ignore[method-assign]
    wrap(psycopg.Connection, "commit", "commit()")
    # Steps.
    for method in ("describe", "create_types", "prepare_target", "record_committed", "set_lock_timeout", "upsert"):
        wrap(_run.TableRun, method)
    for method in ("connected", "locked", "data_transaction"):
        wrap_context(_run.TableRun, method)
    for module in (_cdc, _sync):
        wrap(module, "ensure_state_tables")
        wrap(module, "read_watermark")
        wrap(module, "write_state")
    wrap(_sync, "open_snapshot")
    wrap(_api, "record_final")
    for name in ("_why_full_copy", "wait_until_slot_free", "flush_source_wal", "_generated_expressions", "_write",
                 "confirm_position", "_measure_slot", "_apply_changes", "_write_kept"):
        wrap(_cdc, name)
    wrap_generator(_cdc, "read_changes")
    wrap(_cdc.PgOutputDecoder, "feed", "decode (feed)")
    wrap_generator(_cdc.PgOutputDecoder, "stage_rows")
    for name in ("_copy_changes", "_upsert", "detect_deletes", "_load_incremental"):
        wrap(_sync, name)
    wrap(_sync, "stream", "stream (COPY source -> stage)")
    wrap(_keys, "key_sums", "key_sums (in the sync)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--explain", type=Path, help="copy the warehouse's log with auto_explain plans here")
    parser.add_argument("--statements", type=float, default=0.005, help="list statements above this median (s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cdc_profile_") as workdir:
        source_server = logical_server(Path(workdir) / "source")
        target_server = EmbeddedPostgres(Path(workdir) / "warehouse", free_port(), throwaway=True).start()
        try:
            profile(source_server.dsn(), target_server.dsn(), args)
            if args.explain:
                shutil.copy(Path(workdir) / "warehouse.log", args.explain)
        finally:
            source_server.stop()
            target_server.stop()


def profile(source_admin: str, target_admin: str, args: argparse.Namespace) -> None:
    source, target = bench_databases(source_admin, target_admin, args.rows)

    def table(name: str, **settings: Any) -> TableConfig:
        return TableConfig(name=name, source="public.bench", target=f"raw.{name}", validate=False, **settings)

    tables = {
        "incremental": table("bench_inc", mode="incremental", cursor_column="updated_at"),
        "incremental_deletes": table("bench_del", mode="incremental", cursor_column="updated_at",
                                     delete_detection="hard"),
        "cdc": table("bench_cdc", mode="cdc"),
    }
    for config in tables.values():
        sync_table(source, target, config)
    if args.explain:
        for setting, value in (("session_preload_libraries", "auto_explain"), ("auto_explain.log_min_duration", "20ms"),
                               ("auto_explain.log_analyze", "on"), ("auto_explain.log_buffers", "on"),
                               ("auto_explain.log_wal", "on"), ("auto_explain.log_nested_statements", "on")):
            with psycopg.connect(target_admin, autocommit=True) as conn:
                conn.execute(sql.SQL("alter system set {} = {}").format(sql.SQL(setting), sql.Literal(value)))
        execute(target_admin, "select pg_reload_conf()")
    instrument()
    steps: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in tables}
    statements: dict[str, dict[tuple[str, str], list[float]]] = {name: defaultdict(list) for name in tables}
    totals: dict[str, list[float]] = defaultdict(list)
    for round_number in range(1, args.repeat + 1):
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("update public.bench set price = price + 1, updated_at = clock_timestamp() "
                         "where id %% 100 = %s", (round_number,))
            conn.execute("delete from public.bench where id %% 10000 = %s", (50 + round_number,))
        order = list(tables) if round_number % 2 else list(reversed(tables))
        for name in order:
            settle(source)
            settle(target)
            PROFILE.__init__()  # type: ignore[misc]
            PROFILE.enter("sync_table")
            started = time.perf_counter()
            report = sync_table(source, target, tables[name])
            totals[name].append(time.perf_counter() - started)
            PROFILE.leave()
            print(f"  round {round_number} {name}: {totals[name][-1]:.3f}s {report.summary()}", file=sys.stderr)
            for path, seconds in PROFILE.self_s.items():
                steps[name][path].append(seconds)
            for key, seconds in PROFILE.statements.items():
                statements[name][key].append(seconds)
    for name in tables:
        print(f"\n## {name}: median {statistics.median(totals[name]):.3f}s over {args.repeat}\n")
        print("| step (self time) | median s |\n|---|---:|")
        for path, values in steps[name].items():
            values += [0.0] * (args.repeat - len(values))
            print(f"| {path} | {statistics.median(values):.3f} |")
        print("\n| step | statement | median s |\n|---|---|---:|")
        for (path, text), values in sorted(statements[name].items(), key=lambda item: -statistics.median(item[1])):
            values += [0.0] * (args.repeat - len(values))
            if statistics.median(values) >= args.statements:
                print(f"| {path.split(' > ')[-1]} | `{text}` | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
