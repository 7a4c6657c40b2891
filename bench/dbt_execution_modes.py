"""The transform DAG's wall time against the same work as plain dbt commands in one shell.

One local stack (embedded PostgreSQL, real Airflow with the LocalExecutor) copies the demo data
once; then, alternating the variants for several rounds, Airflow is restarted with the variant's
settings (DBT_EXECUTION_MODE, DBT_TEST_BEHAVIOR, DBT_PROJECT_DIR), `transform_dbt` is triggered and
its run's wall time (start to end, from Airflow's API) recorded, with where the time went along the
run's critical path (per step: the scheduler queueing it, the executor starting it, the task
process parsing its DAG file, and the rest of its run). The baseline of each variant, measured in
the same round right after it: the same work as plain dbt commands in one shell, `dbt source
freshness` then `dbt build` of the same project on the same warehouse.

Projects: `demo` (dbt/) and generated projects of N models (`--projects demo,10,50,200`): views over
the demo's raw tables in three folders (half staging, a quarter intermediate reading two staging
models each, a quarter marts), each with a `not_null` test, and the raw sources with a freshness
threshold. They show how the DAG's overhead (its wall time minus plain dbt's) grows with the size
of the project; generated projects run in the default mode (watcher, after_each).

    .venv/bin/python -m bench.dbt_execution_modes [--rounds 2] [--securities 10000 --events 100000]
        [--modes watcher,dbt_runner,virtualenv] [--test-behaviors after_each,build] [--projects demo,10,50,200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from bench.process_cpu import ProcessCpu, by_role
from include.dbt_project import build_manifest, dbt_arguments, dbt_invocation
from include.local_stack import airflow, runner
from include.local_stack.postgres import free_port
from include.local_stack.settings import PROJECT_ROOT, WAREHOUSE_CONN_ID, StackSettings

DBT_VENV = PROJECT_ROOT / ".venv-dbt"
GENERATED = PROJECT_ROOT / ".data" / "bench-dbt-projects"
DEMO_PROJECT = PROJECT_ROOT / "dbt"


def ensure_dbt_virtualenv() -> Path:
    """A separate virtualenv holding only dbt, as the Astro and MWAA guides set it up."""
    dbt = DBT_VENV / "bin" / "dbt"
    if not dbt.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DBT_VENV)], check=True)
        pins = [line for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
                if line.startswith(("dbt-core==", "dbt-postgres=="))]  # fmt: skip
        subprocess.run([str(DBT_VENV / "bin" / "pip"), "install", "--quiet", *pins,
                        "-c", str(PROJECT_ROOT / "constraints.txt")], check=True)  # fmt: skip
    return dbt


RESULTS = PROJECT_ROOT / "bench" / "results"

SOURCES_YML = """version: 2
sources:
  - name: raw
    schema: raw
    config:
      freshness:
        warn_after: {count: 10, period: day}
        error_after: {count: 30, period: day}
    tables:
      - name: stock_master
        config: {loaded_at_field: updated_at}
      - name: edi_690
        config: {loaded_at_field: changed_at}
"""
KEYS = {"stock_master": "security_id", "edi_690": "event_id"}


def generate_project(models: int) -> Path:
    """A dbt project of `models` views over the demo's raw tables, each with a not_null test."""
    root = GENERATED / f"models_{models}"
    shutil.rmtree(root, ignore_errors=True)
    for folder in ("staging", "intermediate", "marts"):
        (root / "models" / folder).mkdir(parents=True)
    (root / "macros").mkdir()
    shutil.copy(DEMO_PROJECT / "macros" / "generate_schema_name.sql", root / "macros")
    (root / "dbt_project.yml").write_text(
        "name: postgres_analytics\nversion: '1.0.0'\nprofile: warehouse\n"
        "flags: {send_anonymous_usage_stats: false}\n"
        "models:\n  postgres_analytics:\n    +materialized: view\n"
        "    staging: {+schema: bench_staging}\n    intermediate: {+schema: bench_intermediate}\n"
        "    marts: {+schema: bench_marts}\n"
    )
    (root / "models" / "staging" / "_sources.yml").write_text(SOURCES_YML)
    staging = max(1, models // 2)
    intermediate = max(1, models // 4)
    marts = max(1, models - staging - intermediate)
    layers: dict[str, list[tuple[str, str, str]]] = {"staging": [], "intermediate": [], "marts": []}
    for i in range(staging):
        table = ("stock_master", "edi_690")[i % 2]
        sql = f"select * from {{{{ source('raw', '{table}') }}}} where {KEYS[table]} % {staging} = {i}\n"
        layers["staging"].append((f"stg_{i:04d}", KEYS[table], sql))
    for i in range(intermediate):
        first, second = layers["staging"][i % staging], layers["staging"][(i + 2) % staging]
        sql = f"select * from {{{{ ref('{first[0]}') }}}}\nunion all\nselect * from {{{{ ref('{second[0]}') }}}}\n"
        layers["intermediate"].append((f"int_{i:04d}", first[1], sql if first[1] == second[1] else
                                       f"select * from {{{{ ref('{first[0]}') }}}}\n"))  # fmt: skip
    for i in range(marts):
        parent = layers["intermediate"][i % intermediate]
        sql = f"select {parent[1]}, count(*) as row_count from {{{{ ref('{parent[0]}') }}}} group by 1\n"
        layers["marts"].append((f"mart_{i:04d}", parent[1], sql))
    for folder, rows in layers.items():
        docs = ["version: 2", "models:"]
        for name, key, sql in rows:
            (root / "models" / folder / f"{name}.sql").write_text(sql)
            docs += [f"  - name: {name}", "    columns:", f"      - name: {key}", "        data_tests: [not_null]"]
        (root / "models" / folder / f"_{folder}__models.yml").write_text("\n".join(docs) + "\n")
    return root


def parse_project(settings: StackSettings, project: Path) -> None:
    """`dbt parse` with the profile and target Cosmos builds, as `make manifest` does for dbt/."""
    build_manifest(settings.database_url(WAREHOUSE_CONN_ID), project)


def task_parse_seconds(settings: StackSettings, run_id: str, task_id: str) -> float | None:
    """How long the task process took to parse its DAG file, from the first lines of its log."""
    run_logs = settings.airflow_home / "logs" / f"dag_id={runner.TRANSFORM_DAG}" / f"run_id={run_id}"
    folder = run_logs / f"task_id={task_id}"
    logs = sorted(folder.glob("*.log")) if folder.exists() else []
    if not logs:
        return None
    stamps = {}
    for line in logs[0].read_text(errors="replace").splitlines()[:60]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        for marker in ("DAG bundles loaded", "Worker startup parse complete"):
            if entry.get("event", "").startswith(marker) and marker not in stamps:
                stamps[marker] = datetime.fromisoformat(entry["timestamp"])
    if len(stamps) < 2:
        return None
    return (stamps["Worker startup parse complete"] - stamps["DAG bundles loaded"]).total_seconds()


def run_seconds(run: dict) -> float:
    start = datetime.fromisoformat(run["start_date"])
    end = datetime.fromisoformat(run["end_date"])
    return (end - start).total_seconds()


def _offset(value: str | None, origin: datetime) -> float | None:
    return None if value is None else (datetime.fromisoformat(value) - origin).total_seconds()


def task_timeline(client: airflow.AirflowClient, run: dict) -> list[dict]:
    """Each task of a run, in seconds from the run's start: when it could have started (its last
    upstream task ended), was queued by the scheduler (never, for a task started in the triggerer),
    started in a worker process or the triggerer, and ended."""
    dag_id, run_id = runner.TRANSFORM_DAG, run["dag_run_id"]
    origin = datetime.fromisoformat(run["start_date"])
    upstream: dict[str, list[str]] = {}
    for task in client.get(f"/api/v2/dags/{dag_id}/tasks")["tasks"]:
        for downstream in task["downstream_task_ids"]:
            upstream.setdefault(downstream, []).append(task["task_id"])
    instances = {ti["task_id"]: ti for ti in airflow.task_instances(client, dag_id, run_id)}
    rows = []
    for task_id, ti in instances.items():
        ends = [_offset(instances[u]["end_date"], origin) or 0.0 for u in upstream.get(task_id, []) if u in instances]
        rows.append({
            "task_id": task_id,
            "upstream": upstream.get(task_id, []),
            "ready": max(ends, default=0.0),
            "queued": _offset(ti["queued_when"], origin),
            "started": _offset(ti["start_date"], origin),
            "ended": _offset(ti["end_date"], origin),
            "try_number": ti["try_number"],
        })  # fmt: skip
    return sorted(rows, key=lambda row: row["started"] or 0.0)


def critical_path(rows: list[dict]) -> list[dict]:
    """The chain of tasks that ended last, each step's upstream the one it waited for."""
    by_id = {row["task_id"]: row for row in rows}
    path = [max(rows, key=lambda row: row["ended"] or 0.0)]
    while upstream := [by_id[u] for u in path[-1]["upstream"] if u in by_id]:
        path.append(max(upstream, key=lambda row: row["ended"] or 0.0))
    return path[::-1]


def print_timeline(settings: StackSettings, run: dict, rows: list[dict]) -> dict[str, float]:
    """Where the time goes along the critical path: waiting for the scheduler to queue a ready task,
    for the executor to start it, the task process parsing its DAG file, and the rest of its run
    (for a watcher sensor: waiting for its node's result from the producer)."""
    label = run["dag_run_id"]
    print(f"\n{label}: critical path (seconds from the run's start)")
    print(f"{'task':<58} {'ready':>6} {'queued':>7} {'started':>8} {'ended':>6}  sched  start  parse    run")
    totals = {"sched": 0.0, "start": 0.0, "parse": 0.0, "run": 0.0}
    for row in critical_path(rows):
        # A task started in the triggerer (start_from_trigger) is never queued: the scheduler hands
        # it to the triggerer and stamps its start; its "run" is the trigger's pick-up and wait.
        queued = row["queued"] if row["queued"] is not None else row["started"]
        sched = (queued or 0.0) - row["ready"]
        start = (row["started"] or 0.0) - (queued or 0.0)
        parse = task_parse_seconds(settings, label, row["task_id"]) or 0.0
        run_s = (row["ended"] or 0.0) - (row["started"] or 0.0) - parse
        for key, value in (("sched", sched), ("start", start), ("parse", parse), ("run", run_s)):
            totals[key] += value
        queued_text = "-" if row["queued"] is None else f"{row['queued']:.1f}"
        print(f"{row['task_id']:<58} {row['ready']:6.1f} {queued_text:>7} {row['started'] or 0:8.1f} "
              f"{row['ended'] or 0:6.1f} {sched:6.1f} {start:6.1f} {parse:6.2f} {run_s:6.1f}")  # fmt: skip
    print(f"{'sum along the critical path':<58} {'':>30} {totals['sched']:6.1f} {totals['start']:6.1f} "
          f"{totals['parse']:6.2f} {totals['run']:6.1f}")  # fmt: skip
    producer = next((row for row in rows if row["task_id"].endswith("dbt_producer_watcher")), None)
    if producer:
        totals["producer"] = (producer["ended"] or 0.0) - (producer["started"] or 0.0)
        totals["after_producer"] = run_seconds(run) - (producer["ended"] or 0.0)
        totals["producer_start"] = producer["started"] or 0.0
        print(f"producer (one dbt source freshness + dbt build): started at {totals['producer_start']:.1f} s, "
              f"ran {totals['producer']:.1f} s; the run ended {totals['after_producer']:.1f} s after it")
    parses = [p for row in rows if (p := task_parse_seconds(settings, label, row["task_id"])) is not None]
    if parses:
        totals["parse_median"] = statistics.median(parses)
        print(f"DAG-file parse in the {len(parses)} task processes: median {statistics.median(parses):.2f} s, "
              f"max {max(parses):.2f} s")
    return totals


def time_transform(settings: StackSettings, variant: str) -> tuple[float, dict[str, float]]:
    airflow.stop(settings)
    airflow.start(settings)
    client = airflow.wait_until_healthy(settings)
    airflow.wait_for_dags(client, [runner.TRANSFORM_DAG])
    time.sleep(5)  # the scheduler parses the DAG files once before its first fork (config/airflow_local_settings.py)
    # As `make run` does: ingestion by hand (nothing changed at the source), the transform on its
    # Assets. The first task after Airflow starts waits about 6 s before its first API call, once
    # per start; the ingestion takes that wait, and the transform is timed as a running Airflow runs it.
    with ProcessCpu().measuring() as processes:  # ingestion and transform: CPU seconds per process
        run = runner.trigger_pipeline(client, timeout=1800).transform
    run_id = run["dag_run_id"]
    if run["state"] != "success":
        raise SystemExit(f"transform in {variant} failed: "
                         f"{runner.failed_tasks(client, runner.TRANSFORM_DAG, run_id)}")  # fmt: skip
    rows = task_timeline(client, run)
    steps = print_timeline(settings, run, rows)
    producers = [ti["id"] for ti in airflow.task_instances(client, runner.TRANSFORM_DAG, run_id)
                 if ti["task_id"].endswith("producer_watcher")]  # fmt: skip
    cpu = by_role(processes, producers)
    print(f"CPU seconds during the ingestion and the transform ({run_seconds(run):.1f} s transform wall): "
          + ", ".join(f"{role} {seconds}" for role, seconds in cpu.items()), flush=True)  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run_id}.json").write_text(json.dumps({"run": run, "tasks": rows, "steps": steps, "cpu": cpu},
                                                       indent=1))  # fmt: skip
    return run_seconds(run), steps


def time_dbt(settings: StackSettings, project: Path, *commands: list[str]) -> float:
    """dbt commands one after the other, each its own `dbt` process, as a person would type them."""
    started = time.perf_counter()
    profiles = settings.data_dir / "dbt-profiles"
    env = dbt_invocation(settings.database_url(WAREHOUSE_CONN_ID), profiles)
    for command in commands:
        subprocess.run(
            [str(Path(sys.executable).with_name("dbt")), *command, *dbt_arguments(project, profiles),
             "--target-path", str(settings.data_dir / "dbt-target"), "--quiet"],
            cwd=PROJECT_ROOT, env=env, check=True,
        )  # fmt: skip
    return time.perf_counter() - started


# The same work as the DAG: it checks the sources' freshness, then builds (docs are another DAG's).
SAME_WORK = [["source", "freshness"], ["build"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--securities", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--modes", default="watcher")
    parser.add_argument("--test-behaviors", default="after_each")
    parser.add_argument("--projects", default="demo,10,50,200")
    parser.add_argument("--idle-sleeps", default="",
                        help="also run the demo with these [scheduler] scheduler_idle_sleep_time values, e.g. 1,0.2")
    parser.add_argument("--watcher-tasks", default="triggerer",
                        help="where watcher node tasks wait (DBT_WATCHER_TASKS), e.g. deferred,triggerer,worker")
    args = parser.parse_args()
    modes = args.modes.split(",")
    places = args.watcher_tasks.split(",")
    variants = [("demo", mode, behavior) for mode in modes for behavior in args.test_behaviors.split(",")
                if not (mode == "watcher" and behavior == "build")]  # fmt: skip
    variants += [(size, "watcher", "after_each") for size in args.projects.split(",") if size != "demo"]
    # A watcher variant once per place its node tasks wait in: "watcher/triggerer", "watcher/worker".
    variants = [(size, f"{mode}/{place}" if mode == "watcher" else mode, behavior)
                for size, mode, behavior in variants for place in (places if mode == "watcher" else places[:1])]
    if "demo" not in args.projects.split(","):
        variants = [v for v in variants if v[0] != "demo"]
    sleeps = filter(None, args.idle_sleeps.split(","))
    variants += [("demo", "watcher", f"after_each / idle sleep {sleep} s") for sleep in sleeps]
    base = StackSettings(
        data_dir=PROJECT_ROOT / ".data" / "bench-dbt-modes",
        postgres_port=free_port(),
        api_port=free_port(),
        demo_securities=args.securities,
        demo_events=args.events,
        extra_env={"DBT_EXECUTION_MODE": "watcher", "DBT_TEST_BEHAVIOR": "after_each"},
    )
    dbt_executable = str(ensure_dbt_virtualenv()) if "virtualenv" in modes else ""
    projects = {"demo": DEMO_PROJECT}
    names = {v: f"{v[0] if v[0] == 'demo' else v[0] + ' models'} / {v[1]} / {v[2]}" for v in variants}
    times: dict[str, list[float]] = {}
    try:
        client = runner.up(base)
        runner.trigger_pipeline(client, timeout=1800)  # loads raw and runs the transform once (warm-up)
        for size in {v[0] for v in variants} - {"demo"}:
            projects[size] = generate_project(int(size))
            parse_project(base, projects[size])
            time_dbt(base, projects[size], ["build"])  # creates its views once, as the demo's warm-up did
        steps: dict[str, list[dict[str, float]]] = {}
        for round_number in range(args.rounds):
            for variant in variants:
                size, mode, behavior = variant
                behavior, _, idle_sleep = behavior.partition(" / idle sleep ")
                mode, _, place = mode.partition("/")
                env = {"DBT_EXECUTION_MODE": mode, "DBT_TEST_BEHAVIOR": behavior, "DBT_EXECUTABLE": dbt_executable,
                       "DBT_WATCHER_TASKS": place or places[0],
                       "DBT_PROJECT_DIR": str(projects[size]),
                       "AIRFLOW__COSMOS__CACHE_DIR": str(base.data_dir / f"cosmos_cache_{size}")}  # fmt: skip
                if idle_sleep:
                    env["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] = idle_sleep.removesuffix(" s")
                seconds, variant_steps = time_transform(dataclasses.replace(base, extra_env=env),
                                                        f"{size}_{mode}_{behavior}{idle_sleep}")  # fmt: skip
                times.setdefault(names[variant], []).append(seconds)
                steps.setdefault(names[variant], []).append(variant_steps)
                plain = time_dbt(base, projects[size], *SAME_WORK)
                times.setdefault(f"{names[variant]} (plain dbt)", []).append(plain)
                print(f"round {round_number + 1}: {names[variant]}: {seconds:6.1f} s; plain dbt {plain:6.1f} s",
                      flush=True)  # fmt: skip
    finally:
        runner.stop(base)
    print(f"\nmachine: {os.cpu_count()} cores; {args.securities} securities, {args.events} events; "
          f"median of {args.rounds} rounds")  # fmt: skip
    print("| project / mode / tests | DAG wall time | plain dbt (freshness + build) | overhead | ratio "
          "| producer | after the producer | task DAG parse (median) |")
    print("|---|---|---|---|---|---|---|---|")
    overheads = {}
    for variant in variants:
        name = names[variant]
        dag_wall = statistics.median(times[name])
        plain = statistics.median(times[f"{name} (plain dbt)"])
        overheads[variant] = dag_wall - plain
        median_step = {k: statistics.median(s.get(k, 0.0) for s in steps[name]) for k in steps[name][0]}
        print(f"| {name} | {dag_wall:.1f} s | {plain:.1f} s | {dag_wall - plain:.1f} s | {dag_wall / plain:.2f}x "
              f"| {median_step.get('producer', 0):.1f} s | {median_step.get('after_producer', 0):.1f} s "
              f"| {median_step.get('parse_median', 0):.2f} s |")  # fmt: skip
    for mode in sorted({v[1] for v in variants if v[0] != "demo"}):
        sizes = sorted((int(v[0]), overheads[v]) for v in variants if v[0] != "demo" and v[1] == mode)
        if len(sizes) >= 2:
            (small, small_overhead), (large, large_overhead) = sizes[0], sizes[-1]
            print(f"\n{mode}: overhead per added model ({small} -> {large} models): "
                  f"{(large_overhead - small_overhead) / (large - small):.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()
