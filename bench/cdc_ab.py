"""CDC A/B bench: the cursor incremental run, the CDC engine of a git ref and the CDC engine of this
checkout, for the same changes in one process.

    .venv/bin/python -m bench.cdc_ab --ref 393177b --rows 2000000 --repeat 15

The setup of bench.cdc_bench (two throwaway PostgreSQL 18 servers, the 2M-row table; each round
updates 1% of the rows and deletes 0.01%), with three tables synced after their first load: incremental
on the cursor column, cdc by `include/copy_engine/_cdc.py` as it is at `--ref` (loaded as a module
beside this checkout's), and cdc by this checkout. Each round runs the three in a rotating order, each
after both servers settled; counts are asserted, and at the end both CDC targets are compared with the
source by checksum. Prints the medians and each round's seconds. On a noisy machine the rounds of
one mode spread by a fifth; compare medians over many rounds, and the per-round ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import psycopg

from bench.cdc_bench import bench_databases, logical_server
from bench.copy_engine_bench import ROOT, settle
from include.copy_engine import TableConfig, _api, _cdc, sync_table
from include.copy_engine._cdc import flush_source_wal, replication_name
from include.local_stack.postgres import EmbeddedPostgres, free_port


def engine_at(ref: str, workdir: Path) -> ModuleType:
    """`_cdc.py` as it is at `ref`, imported as include.copy_engine._cdc_ref (its relative imports are this
    checkout's modules)."""
    text = subprocess.run(["git", "show", f"{ref}:include/copy_engine/_cdc.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = workdir / "_cdc_ref.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("include.copy_engine._cdc_ref", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="the git ref whose CDC engine is compared")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--skew", action="store_true", help="each round: 100,000 updates of 1,000 keys in 100 "
                        "transactions (the skewed day of bench.cdc_bench), no deletes")
    parser.add_argument("--floors", action="store_true", help="each round, before the syncs: the source server's "
                        "decoding of the round's changes alone (no client work), for the full rows (the slot of "
                        "'cdc now'), for the key only (a publication with a column list) and for nothing published")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cdc_ab_") as workdir:
        engines = {f"cdc at {args.ref}": engine_at(args.ref, Path(workdir)), "cdc now": _cdc}
        source_server = logical_server(Path(workdir) / "source")
        target_server = EmbeddedPostgres(Path(workdir) / "warehouse", free_port(), throwaway=True).start()
        try:
            measure(source_server.dsn(), target_server.dsn(), engines, args)
        finally:
            source_server.stop()
            target_server.stop()


def measure(source_admin: str, target_admin: str, engines: dict[str, ModuleType], args: argparse.Namespace) -> None:
    source, target = bench_databases(source_admin, target_admin, args.rows)
    tables = {"incremental": TableConfig(name="bench_inc", source="public.bench", target="raw.bench_inc",
                                         mode="incremental", cursor_column="updated_at", validate=False)}
    for number, name in enumerate(engines):
        tables[name] = TableConfig(name=f"bench_cdc{number}", source="public.bench", target=f"raw.bench_cdc{number}",
                                   mode="cdc", validate=False)

    def sync(name: str) -> tuple[float, object]:
        if name in engines:
            _api.attempt_cdc = engines[name].attempt_cdc  # type: ignore[attr-defined]
        started = time.perf_counter()
        report = sync_table(source, target, tables[name])
        return time.perf_counter() - started, report

    for name in tables:
        sync(name)
    seconds: dict[str, list[float]] = {name: [] for name in tables}
    names = list(tables)
    if args.floors:
        floor_slots = create_floor_slots(source)
        seconds.update({name: [] for name in ("server decoding alone: full rows", *floor_slots)})
    if args.skew:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("create table skew_keys as select id from public.bench where id % 97 = 3 order by id "
                         "limit 1000")
    for round_number in range(1, args.repeat + 1):
        if args.skew:
            with psycopg.connect(source, autocommit=True) as conn:
                for _ in range(100):
                    changed = conn.execute("update public.bench set qty = qty + 1, updated_at = clock_timestamp() "
                                           "where id in (select id from skew_keys)").rowcount
            deleted = 0
        else:
            with psycopg.connect(source, autocommit=True) as conn:
                changed = conn.execute("update public.bench set price = price + 1, updated_at = clock_timestamp() "
                                       "where id %% 100 = %s", (round_number,)).rowcount
                deleted = conn.execute("delete from public.bench where id %% 10000 = %s",
                                       (50 + round_number,)).rowcount
        if args.floors:
            for name, elapsed in server_decoding(source, replication_name(tables["cdc now"].target, "bench_warehouse"),
                                                 floor_slots).items():
                seconds[name].append(elapsed)
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            settle(source)
            settle(target)
            elapsed, report = sync(name)
            expected = (changed, 0 if name == "incremental" else deleted)
            assert (report.rows_updated, report.rows_deleted) == expected, (name, report.summary())  # type: ignore[attr-defined]
            seconds[name].append(elapsed)
        print(f"round {round_number}: " + ", ".join(f"{name} {values[-1]:.3f}" for name, values in seconds.items()),
              file=sys.stderr)
    query = "select count(*), md5(string_agg(t::text, '|' order by id)) from {} as t"
    with psycopg.connect(source) as conn:
        expected_sum = conn.execute(query.format("public.bench")).fetchone()
    with psycopg.connect(target) as conn:
        for name in engines:
            assert conn.execute(query.format(tables[name].target)).fetchone() == expected_sum, name
    print(f"\n{args.rows:,} rows; each round {changed:,} updated and {deleted:,} deleted; {args.repeat} rounds; "
          "both CDC targets equal the source (checksum)\n")
    print("| run | median s | vs cursor incremental (median of the rounds' ratios) | rounds |\n|---|---:|---:|---|")
    for name, values in seconds.items():
        ratios = [value / base for value, base in zip(values, seconds["incremental"], strict=True)]
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(ratios):.2f}x | "
              f"{' '.join(f'{value:.2f}' for value in values)} |")


def create_floor_slots(source: str) -> dict[str, str]:
    """Slots (each with its publication of the same name) that decode the bench table's changes as the key only,
    and that decode nothing: what the server's decoding costs with less to send."""
    slots = {"server decoding alone: key only": "floor_key_only", "server decoding alone: nothing published":
             "floor_nothing"}
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("create table floor_unchanged (id int primary key)")
        conn.execute("create publication floor_key_only for table public.bench (id)")
        conn.execute("create publication floor_nothing for table floor_unchanged")
        for slot in slots.values():
            conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    return slots


def server_decoding(source: str, engine_slot: str, floor_slots: dict[str, str]) -> dict[str, float]:
    """Seconds the source takes to decode the changes up to its flushed position and count them, per slot: the
    engine's own (not consumed), then each floor slot (advanced past them after)."""
    seconds = {}
    with psycopg.connect(source, autocommit=True) as conn:
        flush_source_wal(conn)  # as the engine does before it reads
        upto = conn.execute("select pg_current_wal_flush_lsn()").fetchone()[0]  # type: ignore[index]
        for name, slot in {"server decoding alone: full rows": engine_slot, **floor_slots}.items():
            settle(source)
            started = time.perf_counter()
            conn.execute("select count(*) from pg_logical_slot_peek_binary_changes(%s, %s, null, 'proto_version', "
                         "'1', 'publication_names', %s, 'binary', 'true')", (slot, upto, slot))
            seconds[name] = time.perf_counter() - started
            if slot != engine_slot:
                conn.execute("select pg_replication_slot_advance(%s, %s)", (slot, upto))
    return seconds


if __name__ == "__main__":
    main()
