"""Copy engine benchmark: ratios against a `psql \\copy` binary pipe measured in the same run.

    .venv/bin/python -m bench.copy_engine_bench                 # 2M rows, 3 alternating runs
    .venv/bin/python -m bench.copy_engine_bench --rows 200000   # a quick look
    .venv/bin/python -m bench.copy_engine_bench --rows 20000000 --memory-only   # peak RSS at 20M rows
    .venv/bin/python -m bench.copy_engine_bench --server postgresql://postgres@127.0.0.1:5432/postgres

Starts a throwaway embedded PostgreSQL 18 (or uses the server of `--server`, an admin DSN, where it
creates two databases and drops them at the end), generates a mixed-type table in a source database
and copies it into a warehouse database on the same server. Engine runs are timed in-process
(`sync_table`, as the Airflow task calls it); one extra full sync runs as a `python -m
include.copy_engine` process to measure its peak RSS and its time with interpreter start-up.
One more pipe and one more full sync run with a sampler of every process's CPU time (the client
process, the source and the warehouse backends, psql) and, for the engine, the time of each phase.
Prints a Markdown table and writes the raw numbers to bench/results/copy_engine_pg<major>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from include.copy_engine import TableConfig, _run, _sync, sync_table, validate_table  # noqa: E402
from include.local_stack.postgres import EmbeddedPostgres, _bin_dir, create_database, free_port  # noqa: E402

TABLE_DDL = """
create table public.bench (
    id bigint primary key,
    code text not null,
    name text,
    name_ko text,
    listed date,
    updated_at timestamptz not null,
    price numeric(18,6),
    qty integer,
    active boolean,
    tags text[],
    scores integer[],
    attrs jsonb,
    note text
)"""

TABLE_ROWS = """
insert into public.bench
select i, 'C' || i, md5(i::text), '종목 ' || i || ' 株式 ✓ ' || chr(1488 + i %% 27),
       date '2000-01-01' +(i %% 9000), timestamptz '2024-01-01 00:00+00' + i * interval '1 second',
       (i * 1.234567)::numeric(18,6), i %% 1000, i %% 2 = 0, array['a' ||(i %% 10), 'b' ||(i %% 7)],
       array[i %% 5, i %% 11, null], jsonb_build_object('k', i, 'v', md5(i::text), 'n', i %% 3),
       case when i %% 10 = 0 then null else repeat('x', i %% 40) || E'\\t' end
from generate_series(1, %s) as i"""


def run(command: list[str]) -> tuple[float, dict[str, object] | None]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed: {result.stderr[-2000:]}")
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return elapsed, report


def engine(*args: str) -> list[str]:
    return [sys.executable, "-m", "include.copy_engine", *args]


def execute(dsn: str, statement: str, params: tuple[object, ...] | None = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


def settle(dsn: str) -> None:
    """Start a timed run on a quiet server: no autovacuum worker busy, dirty buffers checkpointed and on disk.

    Without it a checkpoint or an autovacuum of the previous run's table lands on a random later
    run, the pipe's as often as the engine's, and the medians swing by a third.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and conn.execute(
                "select count(*) from pg_stat_activity where backend_type = 'autovacuum worker'").fetchone()[0]:
            time.sleep(0.2)
        conn.execute("checkpoint")
    os.sync()  # the kernel's writeback of those pages would otherwise land on the next run


class CpuSampler:
    """CPU seconds (user + system) of the server's processes and of psql, sampled every 50 ms.

    A backend's last sample is taken at most 50 ms before it exits. Processes are grouped by what
    their title names: the source database, the warehouse database, psql, or the server itself.
    """

    def __init__(self, source_db: str, target_db: str) -> None:
        self.groups = {source_db: "source backend", target_db: "warehouse backend"}
        self.latest: dict[int, tuple[str, float]] = {}
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.stop = threading.Event()

    def _sample(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    command, fields = stat.read().split(b" (", 1)[1].rsplit(b") ", 1)
                if command not in (b"postgres", b"psql"):
                    continue
                with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                    title = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
            values = fields.split()
            pid, seconds = int(entry.name), (int(values[11]) + int(values[12])) / self.ticks
            group = "psql" if command == b"psql" else next(
                (label for name, label in self.groups.items() if f" {name} " in title), "server processes")
            self.latest[pid] = (group, seconds)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._sample()
            time.sleep(0.05)

    @contextmanager
    def measuring(self) -> Iterator[dict[str, float]]:
        """Yields a dict filled, when the block ends, with CPU seconds per group and this process's."""
        found: dict[str, float] = {}
        self._sample()
        before = {pid: seconds for pid, (_, seconds) in self.latest.items()}  # a process started later: from 0
        thread = threading.Thread(target=self._loop, daemon=True)
        own = time.process_time()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.stop.clear()
        thread.start()
        try:
            yield found
        finally:
            self.stop.set()
            thread.join()
            self._sample()
            found["client (this Python process)"] = round(time.process_time() - own, 2)
            spent: dict[str, float] = defaultdict(float)
            for pid, (group, seconds) in self.latest.items():
                spent[group] += seconds - before.get(pid, 0.0)
            found.update({group: round(value, 2) for group, value in spent.items()})
            # psql runs as a child: its own accounting is exact, where the sampler may miss its last 50 ms.
            ended = resource.getrusage(resource.RUSAGE_CHILDREN)
            psql = ended.ru_utime + ended.ru_stime - children.ru_utime - children.ru_stime
            if psql > 0:
                found["psql"] = round(psql, 2)


@contextmanager
def engine_phases() -> Iterator[dict[str, float]]:
    """Seconds a full sync spends in each phase, timed by wrapping the engine's steps."""
    spent: dict[str, float] = defaultdict(float)
    steps = [(_run.TableRun, "rows_before", "compare keys with the target's"),
             (_run.TableRun, "add_primary_key", "build the primary key"),
             (_run.TableRun, "replace_rows", "replace rows (all of it)"), (_sync, "stream", "COPY stream")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in steps]

    def timed(function: Callable[..., object], label: str) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started
        return wrapper

    for (owner, name, label), (_, _, original) in zip(steps, originals, strict=True):
        setattr(owner, name, timed(original, label))
    try:
        yield spent
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def median_of(label: str, runs: list[float]) -> float:
    value = statistics.median(runs)
    print(f"  {label}: {', '.join(f'{r:.2f}' for r in runs)} -> median {value:.2f}s", file=sys.stderr)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per measurement (>= 3)")
    parser.add_argument("--naive-rows", type=int, default=200_000,
                        help="rows for the pandas read_sql/to_sql reference, scaled linearly to --rows")
    parser.add_argument("--memory-only", action="store_true",
                        help="only generate the table and run one full sync as a CLI process: time and peak RSS")
    parser.add_argument("--server", metavar="ADMIN_DSN",
                        help="an existing server to measure on (its databases copy_engine_bench_source and "
                             "copy_engine_bench_warehouse are created and dropped); default: a throwaway embedded "
                             "PostgreSQL 18")
    args = parser.parse_args()
    psql = str(_bin_dir() / "psql")  # psql 18 talks to older servers too

    def run_on(admin_dsn: str) -> dict[str, object]:
        return measure_memory(admin_dsn, args) if args.memory_only else measure(admin_dsn, psql, args)

    if args.server:
        try:
            results = run_on(args.server)
        finally:
            for name in DATABASES:
                execute(args.server, f'drop database if exists "{name}" with (force)')
    else:
        with tempfile.TemporaryDirectory(prefix="copy_engine_bench_") as workdir:
            server = EmbeddedPostgres(Path(workdir) / "data", free_port(), throwaway=True).start()
            try:
                results = run_on(server.dsn())
            finally:
                server.stop()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.memory_only:
        print(json.dumps(results, indent=2))
        (out / f"copy_engine_memory_{args.rows}.json").write_text(json.dumps(results, indent=2))
        return
    print_table(results)
    major = str(results["machine"]["postgres"]).split(".")[0]  # type: ignore[index]
    (out / f"copy_engine_pg{major}.json").write_text(json.dumps(results, indent=2))


DATABASES = ("copy_engine_bench_source", "copy_engine_bench_warehouse")


def generate(admin_dsn: str, rows: int) -> tuple[str, str, float]:
    """The source table with `rows` rows and an empty warehouse; returns both DSNs and the seconds taken."""
    source, target = (create_database(admin_dsn, name, drop_existing=True) for name in DATABASES)
    print(f"generating {rows} rows ...", file=sys.stderr)
    started = time.perf_counter()
    execute(source, TABLE_DDL)
    execute(source, TABLE_ROWS, (rows,))
    # Incremental sources index their cursor column; the full copies do not read it.
    execute(source, "create index bench_updated_at on public.bench (updated_at)")
    execute(source, "vacuum analyze public.bench")
    # The same rows in random key order, as in a table whose rows were updated over the years: loading
    # them keeps a primary key index busy with inserts all over the tree, not only at its right edge.
    execute(source, "create table public.bench_shuffled (like public.bench including all)")
    execute(source, "insert into public.bench_shuffled select * from public.bench order by random()")
    execute(source, "vacuum analyze public.bench_shuffled")
    execute(target, "create schema raw")
    generate_s = time.perf_counter() - started
    print(f"  generated in {generate_s:.0f}s", file=sys.stderr)
    return source, target, generate_s


def measure_memory(admin_dsn: str, args: argparse.Namespace) -> dict[str, object]:
    """One full sync as a CLI process into an empty warehouse: its time and its peak RSS."""
    source, target, generate_s = generate(admin_dsn, args.rows)
    with psycopg.connect(source) as conn:
        table_bytes = conn.execute("select pg_total_relation_size('public.bench')").fetchone()[0]
    cli_s, cli_report = run(engine("sync", "--source", source, "--target", target, "--table", "public.bench",
                                   "--target-table", "raw.bench", "--no-validate"))
    assert cli_report is not None and cli_report["rows_read"] == args.rows, cli_report
    return {"rows": args.rows, "table_mb": round(table_bytes / 2**20), "generate_s": round(generate_s, 1),
            "cli_full_s": round(cli_s, 2), "peak_rss_mb": cli_report["peak_memory_mb"],
            "machine": {"cores": os.cpu_count(), "platform": platform.platform()}}


def measure(admin_dsn: str, psql: str, args: argparse.Namespace) -> dict[str, object]:
    source, target, generate_s = generate(admin_dsn, args.rows)
    with psycopg.connect(source) as conn:
        table_bytes = conn.execute("select pg_total_relation_size('public.bench')").fetchone()[0]
        server_version = conn.execute("show server_version").fetchone()[0]
        wal_level = conn.execute("show wal_level").fetchone()[0]
    # The pipe's target: the same columns and primary key, created empty.
    execute(target, TABLE_DDL.replace("public.bench", "raw.bench_pipe"))

    def pipe(source_table: str, watch: CpuSampler | None = None) -> float:
        execute(target, "truncate raw.bench_pipe")
        settle(target)
        with watch.measuring() if watch else contextlib.nullcontext({}) as cpu:
            elapsed = pipe_run(source_table)
        if watch:
            profiles["pipe"] = {"seconds": round(elapsed, 2), "cpu_s": cpu}
        return elapsed

    profiles: dict[str, dict[str, object]] = {}

    def pipe_run(source_table: str) -> float:
        started = time.perf_counter()
        out = subprocess.Popen([psql, "-X", "-q", "-d", source, "-c",
                                rf"\copy {source_table} to pstdout (format binary)"], stdout=subprocess.PIPE)
        into = subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target, "-c",
                               r"\copy raw.bench_pipe from pstdin (format binary)"], stdin=out.stdout,
                              capture_output=True)
        assert out.stdout is not None
        out.stdout.close()
        out.wait()
        if into.returncode or out.returncode:
            raise RuntimeError(f"psql pipe failed: {into.stderr.decode()[-500:]}")
        return time.perf_counter() - started

    full_table = TableConfig(name="bench", source="public.bench", target="raw.bench", validate=False)
    shuffled_table = TableConfig(name="bench_shuffled", source="public.bench_shuffled", target="raw.bench_shuffled",
                                 validate=False)
    # The pipe loads into an empty table; a full sync replaces the rows of the last one. This one starts
    # where the pipe does: its table is emptied before the timer starts.
    empty_table = TableConfig(name="bench_empty", source="public.bench", target="raw.bench_empty", validate=False)
    # Two key ranges loaded side by side into a copy of the target, which is then swapped in.
    parallel_table = TableConfig(name="bench_parallel", source="public.bench", target="raw.bench_parallel",
                                 parallel=2, validate=False)

    def timed(action: Callable[[], object]) -> float:
        settle(target)
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    def profile_full(table: TableConfig, watch: CpuSampler) -> None:
        """One more full sync, its CPU per process and its time per phase."""
        settle(target)
        with watch.measuring() as cpu, engine_phases() as phases:
            started = time.perf_counter()
            sync_table(source, target, table)
            elapsed = time.perf_counter() - started
        replace = phases.pop("replace rows (all of it)")
        phases["lock, drop the key, truncate"] = replace - sum(phases.values())
        phases["before and after: connect, describe, prepare, commit, audit"] = elapsed - replace
        profiles["full"] = {"seconds": round(elapsed, 2), "cpu_s": cpu,
                            "phases_s": {name: round(value, 2) for name, value in phases.items()}}

    def full(table: TableConfig) -> float:
        return timed(lambda: sync_table(source, target, table))

    def full_into_empty() -> float:
        execute(target, "truncate raw.bench_empty")
        return full(empty_table)

    print("warm-up: the first full syncs create the engine's target tables", file=sys.stderr)
    full(full_table)
    full(shuffled_table)
    full(parallel_table)
    full(empty_table)
    runs: dict[str, list[float]] = {"pipe": [], "full": [], "full_empty": [], "full_parallel": [],
                                    "pipe_shuffled": [], "full_shuffled": []}
    for _ in range(args.repeat):
        runs["pipe"].append(pipe("public.bench"))
        runs["full"].append(full(full_table))
        runs["full_empty"].append(full_into_empty())
        runs["full_parallel"].append(full(parallel_table))
        runs["pipe_shuffled"].append(pipe("public.bench_shuffled"))
        runs["full_shuffled"].append(full(shuffled_table))
    sampler = CpuSampler(*DATABASES)
    pipe("public.bench", watch=sampler)
    profile_full(full_table, sampler)
    print(f"  profile: {json.dumps(profiles)}", file=sys.stderr)
    pipe_s = median_of("psql binary pipe", runs["pipe"])
    full_s = median_of("engine full sync", runs["full"])
    full_empty_s = median_of("engine full sync into an empty table", runs["full_empty"])
    full_parallel_s = median_of("engine full sync, parallel: 2", runs["full_parallel"])
    pipe_shuffled_s = median_of("psql binary pipe, rows in random key order", runs["pipe_shuffled"])
    full_shuffled_s = median_of("engine full sync, rows in random key order", runs["full_shuffled"])

    # Peak memory of a whole engine process, from the CLI's own report.
    settle(target)
    cli_s, cli_report = run(engine("sync", "--source", source, "--target", target, "--table", "public.bench",
                                   "--target-table", "raw.bench", "--no-validate"))
    assert cli_report is not None and cli_report["rows_read"] == args.rows, cli_report
    peak_rss = float(cli_report["peak_memory_mb"])  # type: ignore[arg-type]
    print(f"  engine CLI process (full sync): {cli_s:.2f}s, peak RSS {peak_rss:.0f} MB", file=sys.stderr)

    validate_runs = [timed(lambda: validate_table(source, target, full_table)) for _ in range(args.repeat)]
    validate_s = median_of("engine validate", validate_runs)

    def incremental(target_table: str, deletes: str) -> Callable[[], float]:
        table = TableConfig(name=target_table, source="public.bench", target=target_table, mode="incremental",
                            cursor_column="updated_at", delete_detection=deletes, validate=False)  # type: ignore[arg-type]
        sync_table(source, target, table)  # the initial load, not timed

        def one() -> float:
            settle(target)
            started = time.perf_counter()
            report = sync_table(source, target, table)
            elapsed = time.perf_counter() - started
            assert report.rows_updated == changed and report.rows_deleted == (deleted if deletes != "none" else 0), (
                report.summary())
            return elapsed

        return one

    print("incremental runs ...", file=sys.stderr)
    plain, with_deletes = incremental("raw.bench_inc", "none"), incremental("raw.bench_del", "hard")
    incremental_runs, delete_runs = [], []
    for round_number in range(1, args.repeat + 1):
        # Each round changes 1% of the rows and deletes 0.01%; both tables then sync that change alone.
        with psycopg.connect(source, autocommit=True) as conn:
            changed = conn.execute("update public.bench set price = price + 1, updated_at = clock_timestamp() "
                                   "where id %% 100 = %s", (round_number,)).rowcount
            deleted = conn.execute("delete from public.bench where id %% 10000 = %s", (50 + round_number,)).rowcount
        incremental_runs.append(plain())
        delete_runs.append(with_deletes())
    incremental_s = median_of("incremental, 1% changed", incremental_runs)
    delete_s = median_of("incremental + hard delete detection", delete_runs)

    upsert = compare_upserts(source, target, args.rows)
    naive_s = naive(source, target, min(args.naive_rows, args.rows)) * args.rows / min(args.naive_rows, args.rows)
    print(f"  pandas read_sql/to_sql, scaled: {naive_s:.1f}s", file=sys.stderr)

    return {
        "rows": args.rows, "table_mb": round(table_bytes / 2**20), "repeat": args.repeat,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "postgres": server_version, "wal_level": wal_level},
        "seconds": {"pipe": pipe_s, "full": full_s, "full_empty": full_empty_s, "full_parallel": full_parallel_s,
                    "pipe_shuffled": pipe_shuffled_s,
                    "full_shuffled": full_shuffled_s,
                    "validate": validate_s, "incremental": incremental_s, "incremental_deletes": delete_s,
                    "naive_scaled": naive_s, **upsert},
        "runs": {**runs, "validate": validate_runs, "incremental": incremental_runs,
                 "incremental_deletes": delete_runs},
        "peak_rss_mb": peak_rss, "cli_full_s": cli_s, "generate_s": round(generate_s, 1), "profile": profiles,
        "naive_rows": min(args.naive_rows, args.rows),
    }


def compare_upserts(source: str, target: str, rows: int) -> dict[str, float]:
    """INSERT ... ON CONFLICT against MERGE for the same 1% batch, each rolled back afterwards."""
    batch = max(rows // 100, 1)
    timings: dict[str, list[float]] = {"on_conflict": [], "merge": []}
    columns = "id, code, name, name_ko, listed, updated_at, price, qty, active, tags, scores, attrs, note"
    statements = {
        "on_conflict": f"insert into raw.bench as t ({columns}) select {columns} from stage "
                       "on conflict (id) do update set price = excluded.price, updated_at = excluded.updated_at "
                       "where (t.price::text, t.updated_at::text) is distinct from "
                       "(excluded.price::text, excluded.updated_at::text)",
        "merge": "merge into raw.bench as t using stage as s on t.id = s.id "
                 "when matched and (t.price::text, t.updated_at::text) is distinct from "
                 "(s.price::text, s.updated_at::text) then update set price = s.price, updated_at = s.updated_at "
                 f"when not matched then insert ({columns}) "
                 f"values ({', '.join('s.' + c for c in columns.split(', '))})",
    }
    with psycopg.connect(target) as conn:
        for _ in range(3):
            for name, statement in statements.items():
                conn.execute(f"create temp table stage on commit drop as select {columns} from raw.bench "
                             "where id %% 100 = 0 limit %s", (batch,))
                conn.execute("update stage set price = price + 1")
                started = time.perf_counter()
                conn.execute(statement)
                timings[name].append(time.perf_counter() - started)
                conn.rollback()
    return {f"upsert_{name}": statistics.median(values) for name, values in timings.items()}


def naive(source: str, target: str, rows: int) -> float:
    """pandas read_sql -> to_sql, the approach the engine replaces."""
    import pandas as pd
    import sqlalchemy
    from sqlalchemy.dialects import postgresql

    source_engine = sqlalchemy.create_engine(source.replace("postgresql://", "postgresql+psycopg://"))
    target_engine = sqlalchemy.create_engine(target.replace("postgresql://", "postgresql+psycopg://"))
    started = time.perf_counter()
    frame = pd.read_sql(f"select * from public.bench order by id limit {int(rows)}", source_engine)
    types = {"attrs": postgresql.JSONB, "tags": postgresql.ARRAY(sqlalchemy.Text),
             "scores": postgresql.ARRAY(sqlalchemy.Integer)}
    frame.to_sql("bench_naive", target_engine, schema="raw", if_exists="replace", index=False, chunksize=10_000,
                 dtype=types)
    elapsed = time.perf_counter() - started
    source_engine.dispose()
    target_engine.dispose()
    return elapsed


def print_table(results: dict[str, object]) -> None:
    seconds = results["seconds"]
    assert isinstance(seconds, dict)
    full, pipe = seconds["full"], seconds["pipe"]
    machine = results["machine"]
    assert isinstance(machine, dict)
    print(f"\n{results['rows']:,} rows ({results['table_mb']} MB), median of {results['repeat']} alternating runs, "
          f"{machine['cores']} cores, PostgreSQL {machine['postgres']}\n")
    print("| measurement | seconds | ratio | target |")
    print("|---|---:|---:|---|")
    print(f"| psql `\\copy` binary pipe into the table with its key (baseline) | {pipe:.2f} | 1.00 × pipe | |")
    print(f"| engine full sync, replacing the rows of the last sync | {full:.2f} | {full / pipe:.2f} × pipe | ≤ 0.9 |")
    print(f"| engine full sync into an empty table, as the pipe | {seconds['full_empty']:.2f} | "
          f"{seconds['full_empty'] / pipe:.2f} × pipe | ≤ 0.9 |")
    print(f"| engine full sync, `parallel: 2` (two key ranges, then a swap) | {seconds['full_parallel']:.2f} | "
          f"{seconds['full_parallel'] / pipe:.2f} × pipe | ≤ 0.9 |")
    shuffled_pipe, shuffled_full = seconds["pipe_shuffled"], seconds["full_shuffled"]
    print(f"| the same rows in random key order: psql pipe | {shuffled_pipe:.2f} | 1.00 × pipe | |")
    print(f"| the same rows in random key order: engine full sync | {shuffled_full:.2f} | "
          f"{shuffled_full / shuffled_pipe:.2f} × pipe | ≤ 0.9 |")
    print(f"| engine incremental, 1% rows changed | {seconds['incremental']:.2f} | "
          f"{seconds['incremental'] / full:.2f} × full | ≤ 0.10 |")
    print(f"| engine incremental + hard delete detection | {seconds['incremental_deletes']:.2f} | "
          f"{seconds['incremental_deletes'] / full:.2f} × full | ≤ 0.30 |")
    print(f"| engine validation of the whole table | {seconds['validate']:.2f} | "
          f"{seconds['validate'] / full:.2f} × full | ≤ 0.5 |")
    print(f"| pandas read_sql → to_sql (measured on {results['naive_rows']:,} rows, scaled) | "
          f"{seconds['naive_scaled']:.1f} | {seconds['naive_scaled'] / full:.1f} × full | reference |")
    print(f"| upsert of a 1% batch: INSERT … ON CONFLICT | {seconds['upsert_on_conflict']:.3f} | | |")
    print(f"| upsert of a 1% batch: MERGE | {seconds['upsert_merge']:.3f} | "
          f"{seconds['upsert_merge'] / seconds['upsert_on_conflict']:.2f} × on conflict | |")
    print(f"| engine full sync as a CLI process (with interpreter start-up) | {results['cli_full_s']:.2f} | "
          f"{results['cli_full_s'] / pipe:.2f} × pipe | |")
    print(f"| engine peak RSS (CLI process) | {results['peak_rss_mb']:.0f} MB | | ≤ 150 MB |")
    profiles = results.get("profile")
    if isinstance(profiles, dict) and profiles:
        print(f"\nOne more run of each, CPU seconds per process group (wal_level {machine.get('wal_level')}):\n")
        groups = sorted({group for profile in profiles.values() for group in profile["cpu_s"]})
        print("| run | wall s | " + " | ".join(groups) + " |")
        print("|---|---:|" + "---:|" * len(groups))
        for name, profile in profiles.items():
            cpu = profile["cpu_s"]
            print(f"| {name} | {profile['seconds']:.2f} | "
                  + " | ".join(f"{cpu.get(group, 0.0):.2f}" for group in groups) + " |")
        phases = profiles.get("full", {}).get("phases_s", {})
        if phases:
            print("\nThe engine's full sync by phase (seconds): "
                  + ", ".join(f"{name} {value:.2f}" for name, value in phases.items()))


if __name__ == "__main__":
    main()
