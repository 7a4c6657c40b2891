"""CDC benchmark: a `mode: cdc` run against the cursor-based incremental runs, for the same changes.

    .venv/bin/python -m bench.cdc_bench                  # 2M rows, 3 rounds
    .venv/bin/python -m bench.cdc_bench --rows 200000    # a quick look

Starts two throwaway embedded PostgreSQL 18 servers: the source with wal_level = logical, the
warehouse apart (so the slot does not decode the warehouse's own writes). The 2M-row table of
copy_engine_bench is synced three ways after its first load: incremental on its cursor column,
incremental with hard delete detection, and cdc. Each round updates 1% of the rows and deletes
0.01%, then each table syncs exactly that change (counts asserted). Then a skewed day: 100,000
updates to 1,000 keys in 100 transactions, where CDC coalesces per key. Also timed, for the last
round's changes and the skewed day's, without applying them: reading them through the SQL function
(`pg_logical_slot_peek_binary_changes`, the engine's `read_changes`) and through the replication
protocol (`bench/slot_stream.py`), both into the engine's decoder, which is how the engine chose the
SQL function. Prints a Markdown table; raw numbers go to bench/results/cdc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from bench.copy_engine_bench import ROOT, TABLE_DDL, TABLE_ROWS, execute, median_of, settle
from bench.slot_stream import stream_changes
from include.copy_engine import SyncReport, TableConfig, sync_table
from include.copy_engine._cdc import PgOutputDecoder, read_changes, replication_name
from include.local_stack.postgres import EmbeddedPostgres, create_database, free_port


def logical_server(data_dir: Path) -> EmbeddedPostgres:
    server = EmbeddedPostgres(data_dir, free_port(), throwaway=True).start()
    execute(server.dsn(), "alter system set wal_level = logical")
    server.stop()
    return server.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skew-updates", type=int, default=100_000)
    parser.add_argument("--skew-keys", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cdc_bench_") as workdir:
        source_server = logical_server(Path(workdir) / "source")
        target_server = EmbeddedPostgres(Path(workdir) / "warehouse", free_port(), throwaway=True).start()
        try:
            results = measure(source_server.dsn(), target_server.dsn(), args)
        finally:
            source_server.stop()
            target_server.stop()
    print_table(results)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cdc.json").write_text(json.dumps(results, indent=2))


def bench_databases(source_admin: str, target_admin: str, rows: int) -> tuple[str, str]:
    """The source database with the generated table (its cursor column indexed) and an empty warehouse."""
    source = create_database(source_admin, "bench_source")
    target = create_database(target_admin, "bench_warehouse")
    # Decoding reads flushed WAL only; the throwaway server commits asynchronously otherwise.
    execute(source_admin, "alter database bench_source set synchronous_commit = on")
    print(f"generating {rows} rows ...", file=sys.stderr)
    execute(source, TABLE_DDL)
    execute(source, TABLE_ROWS, (rows,))
    execute(source, "create index bench_updated_at on public.bench (updated_at)")
    execute(source, "vacuum analyze public.bench")
    return source, target


def measure(source_admin: str, target_admin: str, args: argparse.Namespace) -> dict[str, object]:
    source, target = bench_databases(source_admin, target_admin, args.rows)

    def table(name: str, **settings: object) -> TableConfig:
        return TableConfig(name=name, source="public.bench", target=f"raw.{name}", validate=False,
                           **settings)  # type: ignore[arg-type]

    tables = {
        "incremental": table("bench_inc", mode="incremental", cursor_column="updated_at"),
        "incremental_deletes": table("bench_del", mode="incremental", cursor_column="updated_at",
                                     delete_detection="hard"),
        "cdc": table("bench_cdc", mode="cdc"),
    }
    print("first loads (not timed) ...", file=sys.stderr)
    for config in tables.values():
        sync_table(source, target, config)

    def timed(config: TableConfig) -> tuple[float, SyncReport]:
        # Both servers quiet: an autovacuum of the source table writes WAL the slot must read through.
        settle(source)
        settle(target)
        started = time.perf_counter()
        report = sync_table(source, target, config)
        return time.perf_counter() - started, report

    runs: dict[str, list[float]] = {name: [] for name in tables}
    for round_number in range(1, args.repeat + 1):
        with psycopg.connect(source, autocommit=True) as conn:
            changed = conn.execute("update public.bench set price = price + 1, updated_at = clock_timestamp() "
                                   "where id %% 100 = %s", (round_number,)).rowcount
            deleted = conn.execute("delete from public.bench where id %% 10000 = %s", (50 + round_number,)).rowcount
        if round_number == args.repeat:  # the readers on a 1% round's changes (nothing is consumed)
            print("  reading the round's changes both ways ...", file=sys.stderr)
            settle(source)
            round_readers = compare_readers(source, target, tables["cdc"])
        # The runs alternate their order from round to round.
        order = list(tables) if round_number % 2 else list(reversed(tables))
        for name in order:
            elapsed, report = timed(tables[name])
            # The deleted keys (id % 10000 = 50 + round) are not among the updated ones (id % 100 = round).
            expected_deletes = 0 if name == "incremental" else deleted
            assert (report.rows_updated, report.rows_deleted) == (changed, expected_deletes), (name, report.summary())
            runs[name].append(elapsed)
    seconds = {name: median_of(f"{name}, 1% changed", values) for name, values in runs.items()}

    print("skewed day ...", file=sys.stderr)
    # The same `skew_keys` keys, scattered over the table, updated in each of 100 transactions.
    execute(source, "create table skew_keys as select id from public.bench where id %% 97 = 3 order by id limit %s",
            (args.skew_keys,))
    updates = 0
    with psycopg.connect(source, autocommit=True) as conn:
        for _ in range(args.skew_updates // args.skew_keys):
            updates += conn.execute("update public.bench set qty = qty + 1, updated_at = clock_timestamp() "
                                    "where id in (select id from skew_keys)").rowcount
    keys = execute_scalar(source, "select count(*) from skew_keys")
    read_sql_s, read_protocol_s, messages = compare_readers(source, target, tables["cdc"])
    skew: dict[str, float | int] = {"updates": updates, "keys": keys, "peek_read_s": read_sql_s,
                                    "protocol_read_s": read_protocol_s, "messages": messages}
    for name in ("cdc", "incremental"):
        elapsed, report = timed(tables[name])
        skew[f"{name}_s"] = round(elapsed, 3)
        skew[f"{name}_rows_read"] = report.rows_read
        skew[f"{name}_rows_updated"] = report.rows_updated
        print(f"  skewed day, {name}: {elapsed:.2f}s ({report.summary()})", file=sys.stderr)
    elapsed, report = timed(tables["incremental_deletes"])
    skew["incremental_deletes_s"] = round(elapsed, 3)
    return {"rows": args.rows, "repeat": args.repeat, "changed_per_round": changed, "deleted_per_round": deleted,
            "seconds": seconds, "runs": runs, "skew": skew,
            "round_readers": {"peek_read_s": round_readers[0], "protocol_read_s": round_readers[1],
                              "messages": round_readers[2]},
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()}}


def execute_scalar(dsn: str, query: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def compare_readers(source: str, target: str, config: TableConfig) -> tuple[float, float, int]:
    """Seconds to read and decode the slot's pending changes by the SQL function (the engine's `read_changes`)
    and by the replication protocol (`bench.slot_stream`), both into the engine's decoder; nothing is consumed."""
    with psycopg.connect(target) as conn:
        name = replication_name(config.target, conn.info.dbname)
    with psycopg.connect(source) as conn:
        row = conn.execute("select pg_current_wal_flush_lsn()::text, confirmed_flush_lsn::text "
                           "from pg_replication_slots where slot_name = %s", (name,)).fetchone()
        assert row is not None
        upto, start = str(row[0]), str(row[1])
        conn.commit()
        columns = [str(row[0]) for row in conn.execute(
            "select attname from pg_attribute where attrelid = 'public.bench'::regclass and attnum > 0 "
            "and not attisdropped order by attnum").fetchall()]
        conn.commit()
        started = time.perf_counter()
        decoder = PgOutputDecoder(columns, ("id",), 0)
        messages = 0
        for batch in read_changes(conn, name, upto):
            decoder.feed_all(batch)
            messages += len(batch)
        peek_s = time.perf_counter() - started
    print(f"  read {messages} messages by peek in {peek_s:.2f}s", file=sys.stderr)
    started = time.perf_counter()
    decoder = PgOutputDecoder(columns, ("id",), 0)
    received = 0
    with psycopg.connect(source, replication="database", autocommit=True) as conn:
        for message in stream_changes(conn, name, start, upto):
            decoder.feed(message)
            received += 1
    stream_s = time.perf_counter() - started
    assert received == messages, (received, messages)
    with psycopg.connect(source) as conn:  # the stream confirmed nothing and released the slot
        row = conn.execute("select confirmed_flush_lsn::text, active_pid from pg_replication_slots "
                           "where slot_name = %s", (name,)).fetchone()
    assert row == (start, None), (row, start)
    print(f"  read {messages} messages by the replication protocol in {stream_s:.2f}s", file=sys.stderr)
    return round(peek_s, 3), round(stream_s, 3), messages


def print_table(results: dict[str, object]) -> None:
    seconds: dict[str, float] = results["seconds"]  # type: ignore[assignment]
    skew: dict[str, float] = results["skew"]  # type: ignore[assignment]
    base = seconds["incremental"]
    print(f"\n{results['rows']:,} rows; each round {results['changed_per_round']:,} updated and "
          f"{results['deleted_per_round']:,} deleted (median of {results['repeat']})\n")
    print("| run | seconds | vs cursor incremental |\n|---|---:|---:|")
    for name in ("incremental", "incremental_deletes", "cdc"):
        print(f"| {name} | {seconds[name]:.2f} | {seconds[name] / base:.2f}x |")
    readers: dict[str, float] = results["round_readers"]  # type: ignore[assignment]
    print(f"\nreading the last round's {readers['messages']:,} messages, without applying them: by "
          f"`pg_logical_slot_peek_binary_changes` {readers['peek_read_s']:.2f} s, by the replication protocol "
          f"{readers['protocol_read_s']:.2f} s")
    print(f"\nskewed day: {skew['updates']:,} updates to {skew['keys']:,} keys ({skew['messages']:,} messages)\n")
    print("| run | seconds |\n|---|---:|")
    for name in ("cdc_s", "incremental_s", "incremental_deletes_s", "peek_read_s", "protocol_read_s"):
        print(f"| {name[:-2]} | {skew[name]:.2f} |")


if __name__ == "__main__":
    main()
