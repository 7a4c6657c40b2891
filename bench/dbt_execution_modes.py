"""The transform DAG's wall time in each Cosmos execution mode, against a plain `dbt build`.

One local stack (embedded PostgreSQL, real Airflow with the LocalExecutor) copies the demo data
once; then, alternating the modes for several rounds, Airflow is restarted with DBT_EXECUTION_MODE
set, `transform_dbt` is triggered and its run's wall time (start to end) recorded. `dbt build` of
the same project on the same warehouse is the baseline, measured in the same rounds.

    .venv/bin/python -m bench.dbt_execution_modes [--rounds 2] [--securities 10000 --events 100000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from include.local_stack import airflow, runner
from include.local_stack.postgres import free_port
from include.local_stack.settings import PROJECT_ROOT, StackSettings

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


def run_seconds(run: dict) -> float:
    start = datetime.fromisoformat(run["start_date"])
    end = datetime.fromisoformat(run["end_date"])
    return (end - start).total_seconds()


def time_transform(settings: StackSettings) -> float:
    airflow.stop(settings)
    airflow.start(settings)
    client = airflow.wait_until_healthy(settings)
    airflow.wait_for_dags(client, [runner.TRANSFORM_DAG])
    run_id = f"bench__{settings.extra_env['DBT_EXECUTION_MODE']}__{time.time_ns()}"
    client.post(f"/api/v2/dags/{runner.TRANSFORM_DAG}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
    run = airflow.wait_for_run(client, runner.TRANSFORM_DAG, run_id, timeout=1800)
    if run["state"] != "success":
        raise SystemExit(f"transform in {settings.extra_env['DBT_EXECUTION_MODE']} mode failed: "
                         f"{runner.failed_tasks(client, runner.TRANSFORM_DAG, run_id)}")  # fmt: skip
    return run_seconds(run)


def time_dbt_build(settings: StackSettings) -> float:
    started = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).with_name("dbt")), "build", "--project-dir", "dbt", "--profiles-dir", "dbt",
         "--target-path", str(settings.data_dir / "dbt-target"), "--quiet"],
        cwd=PROJECT_ROOT, env=runner.dbt_environment(settings), check=True,
    )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--securities", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--modes", default="dbt_runner,virtualenv,watcher")
    args = parser.parse_args()
    modes = args.modes.split(",")
    base = StackSettings(
        data_dir=PROJECT_ROOT / ".data" / "bench-dbt-modes",
        postgres_port=free_port(),
        api_port=free_port(),
        demo_securities=args.securities,
        demo_events=args.events,
        extra_env={"DBT_EXECUTION_MODE": "dbt_runner"},
    )
    dbt_executable = str(ensure_dbt_virtualenv()) if "virtualenv" in modes else ""
    try:
        client = runner.up(base)
        runner.trigger_pipeline(client, timeout=1800)  # loads raw and runs the transform once (warm-up)
        times: dict[str, list[float]] = {mode: [] for mode in [*modes, "dbt build"]}
        for round_number in range(args.rounds):
            for mode in modes:
                env = {"DBT_EXECUTION_MODE": mode, "DBT_EXECUTABLE": dbt_executable}
                seconds = time_transform(dataclasses.replace(base, extra_env=env))
                times[mode].append(seconds)
                print(f"round {round_number + 1}: {mode:<10} {seconds:6.1f} s", flush=True)
            times["dbt build"].append(time_dbt_build(base))
            print(f"round {round_number + 1}: dbt build  {times['dbt build'][-1]:6.1f} s", flush=True)
    finally:
        runner.stop(base)
    baseline = statistics.median(times["dbt build"])
    print(f"\nmachine: {os.cpu_count()} cores; {args.securities} securities, {args.events} events; "
          f"median of {args.rounds} rounds")  # fmt: skip
    print("| mode | transform_dbt wall time | ratio to plain `dbt build` |")
    print("|---|---|---|")
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"| {mode} | {median:.1f} s | {median / baseline:.2f}x |")


if __name__ == "__main__":
    main()
