"""The transform DAG's wall time in each Cosmos execution mode, against a plain `dbt build`.

One local stack (embedded PostgreSQL, real Airflow with the LocalExecutor) copies the demo data
once; then, alternating the variants for several rounds, Airflow is restarted with
DBT_EXECUTION_MODE and DBT_TEST_BEHAVIOR set, `transform_dbt` is triggered and its run's wall time
(start to end) recorded, with where the time went along the run's critical path. `dbt build` of
the same project on the same warehouse is the baseline, measured in the same rounds; so is the same
work the DAG does in one dbt process each (`dbt source freshness`, `dbt build`, `dbt docs generate`).

    .venv/bin/python -m bench.dbt_execution_modes [--rounds 2] [--securities 10000 --events 100000]
        [--modes dbt_runner,virtualenv,watcher] [--test-behaviors after_each,build]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from include.dbt_project import dbt_arguments, dbt_invocation
from include.local_stack import airflow, runner
from include.local_stack.postgres import free_port
from include.local_stack.settings import PROJECT_ROOT, WAREHOUSE_CONN_ID, StackSettings

DBT_VENV = PROJECT_ROOT / ".venv-dbt"


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


def run_seconds(run: dict) -> float:
    start = datetime.fromisoformat(run["start_date"])
    end = datetime.fromisoformat(run["end_date"])
    return (end - start).total_seconds()


def _offset(value: str | None, origin: datetime) -> float | None:
    return None if value is None else (datetime.fromisoformat(value) - origin).total_seconds()


def task_timeline(client: airflow.AirflowClient, run: dict) -> list[dict]:
    """Each task of a run, in seconds from the run's start: when it could have started (its last
    upstream task ended), was queued by the scheduler, started in a worker process, and ended."""
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
    while path[-1]["upstream"]:
        path.append(max((by_id[u] for u in path[-1]["upstream"] if u in by_id), key=lambda row: row["ended"] or 0.0))
    return path[::-1]


def print_timeline(label: str, rows: list[dict]) -> None:
    """Where the time goes along the critical path: waiting for the scheduler to queue a ready task,
    for the executor to start it, and the task's own run (DAG parse, Cosmos and dbt included)."""
    print(f"\n{label}: critical path (seconds from the run's start)")
    print(f"{'task':<58} {'ready':>6} {'queued':>7} {'started':>8} {'ended':>6}  sched  start    run")
    totals = {"sched": 0.0, "start": 0.0, "run": 0.0}
    for row in critical_path(rows):
        sched = (row["queued"] or 0.0) - row["ready"]
        start = (row["started"] or 0.0) - (row["queued"] or 0.0)
        run = (row["ended"] or 0.0) - (row["started"] or 0.0)
        totals["sched"] += sched
        totals["start"] += start
        totals["run"] += run
        print(f"{row['task_id']:<58} {row['ready']:6.1f} {row['queued'] or 0:7.1f} {row['started'] or 0:8.1f} "
              f"{row['ended'] or 0:6.1f} {sched:6.1f} {start:6.1f} {run:6.1f}")  # fmt: skip
    print(f"{'sum along the critical path':<58} {'':>30} {totals['sched']:6.1f} {totals['start']:6.1f} "
          f"{totals['run']:6.1f}")  # fmt: skip


def time_transform(settings: StackSettings) -> float:
    airflow.stop(settings)
    airflow.start(settings)
    client = airflow.wait_until_healthy(settings)
    airflow.wait_for_dags(client, [runner.TRANSFORM_DAG])
    variant = f"{settings.extra_env['DBT_EXECUTION_MODE']}__{settings.extra_env['DBT_TEST_BEHAVIOR']}"
    run_id = f"bench__{variant}__{time.time_ns()}"
    client.post(f"/api/v2/dags/{runner.TRANSFORM_DAG}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
    run = airflow.wait_for_run(client, runner.TRANSFORM_DAG, run_id, timeout=1800)
    if run["state"] != "success":
        raise SystemExit(f"transform in {variant} failed: "
                         f"{runner.failed_tasks(client, runner.TRANSFORM_DAG, run_id)}")  # fmt: skip
    rows = task_timeline(client, run)
    print_timeline(run_id, rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run_id}.json").write_text(json.dumps({"run": run, "tasks": rows}, indent=1))
    return run_seconds(run)


def time_dbt(settings: StackSettings, *commands: list[str]) -> float:
    """dbt commands one after the other, each its own `dbt` process, as a person would type them."""
    started = time.perf_counter()
    profiles = settings.data_dir / "dbt-profiles"
    env = dbt_invocation(settings.database_url(WAREHOUSE_CONN_ID), profiles)
    for command in commands:
        subprocess.run(
            [str(Path(sys.executable).with_name("dbt")), *command, *dbt_arguments(settings.dbt_project_dir, profiles),
             "--target-path", str(settings.data_dir / "dbt-target"), "--quiet"],
            cwd=PROJECT_ROOT, env=env, check=True,
        )  # fmt: skip
    return time.perf_counter() - started


BASELINES = {
    "dbt build": [["build"]],
    "dbt freshness+build+docs": [["source", "freshness", "--select", "source:raw"], ["build"], ["docs", "generate"]],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--securities", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--modes", default="dbt_runner,virtualenv,watcher")
    parser.add_argument("--test-behaviors", default="after_each")
    args = parser.parse_args()
    modes = args.modes.split(",")
    variants = [(mode, behavior) for mode in modes for behavior in args.test_behaviors.split(",")]
    base = StackSettings(
        data_dir=PROJECT_ROOT / ".data" / "bench-dbt-modes",
        postgres_port=free_port(),
        api_port=free_port(),
        demo_securities=args.securities,
        demo_events=args.events,
        extra_env={"DBT_EXECUTION_MODE": "dbt_runner", "DBT_TEST_BEHAVIOR": "after_each"},
    )
    dbt_executable = str(ensure_dbt_virtualenv()) if "virtualenv" in modes else ""
    try:
        client = runner.up(base)
        runner.trigger_pipeline(client, timeout=1800)  # loads raw and runs the transform once (warm-up)
        times: dict[str, list[float]] = {f"{mode} / {behavior}": [] for mode, behavior in variants}
        times.update({name: [] for name in BASELINES})
        for round_number in range(args.rounds):
            for mode, behavior in variants:
                env = {"DBT_EXECUTION_MODE": mode, "DBT_TEST_BEHAVIOR": behavior, "DBT_EXECUTABLE": dbt_executable}
                seconds = time_transform(dataclasses.replace(base, extra_env=env))
                times[f"{mode} / {behavior}"].append(seconds)
                print(f"round {round_number + 1}: {mode} / {behavior}: {seconds:6.1f} s", flush=True)
            for name, commands in BASELINES.items():
                times[name].append(time_dbt(base, *commands))
                print(f"round {round_number + 1}: {name}: {times[name][-1]:6.1f} s", flush=True)
    finally:
        runner.stop(base)
    baseline = statistics.median(times["dbt build"])
    same_work = statistics.median(times["dbt freshness+build+docs"])
    print(f"\nmachine: {os.cpu_count()} cores; {args.securities} securities, {args.events} events; "
          f"median of {args.rounds} rounds")  # fmt: skip
    print("| variant | wall time | ratio to plain `dbt build` | ratio to the same work in plain dbt |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} s | {median / baseline:.2f}x | {median / same_work:.2f}x |")


if __name__ == "__main__":
    main()
