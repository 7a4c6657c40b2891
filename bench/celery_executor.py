"""The pipeline on Celery workers against the LocalExecutor, on the same machine in the same run.

For each executor, alternating for several rounds, a fresh local stack (embedded PostgreSQL, the
demo data, a real Airflow) runs what `make run` runs: ingestion by hand, then the Asset-triggered
transform. Measured from the task instances: the large table's parallel copy (its task group, from
`plan` starting to `finish` ending, and the span of its `copy_range` tasks) and the whole pipeline
(ingestion's start to the transform's end). The LocalExecutor is the baseline.

    .venv/bin/python -m bench.celery_executor [--rounds 1] [--workers 2 --concurrency 2]
        [--broker redis://127.0.0.1:6379/3] [--securities 10000 --events 100000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import uuid
from datetime import datetime
from pathlib import Path

from include.local_stack import airflow, runner
from include.local_stack.celery import CeleryOptions
from include.local_stack.postgres import free_port
from include.local_stack.settings import PROJECT_ROOT, StackSettings

RESULTS = PROJECT_ROOT / "bench" / "results"
GROUP = "sync_edi_690"


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def measure(settings: StackSettings) -> dict[str, float]:
    """One fresh stack, one pipeline run; seconds of the large table's copy and of the whole run."""
    client = runner.up(settings)
    try:
        run = runner.trigger_pipeline(client, timeout=1800)
        tis = list(airflow.task_instances(client, runner.INGEST_DAG, run.ingest["dag_run_id"]))
        group = {ti["task_id"].split(".", 1)[1]: ti for ti in tis if ti["task_id"].startswith(f"{GROUP}.")
                 and ti["map_index"] < 0}
        ranges = [ti for ti in tis if ti["task_id"] == f"{GROUP}.copy_range"]
        hosts = sorted({ti["hostname"] for ti in ranges})
        return {
            "large_table_copy_s": (_at(group["finish"]["end_date"]) - _at(group["plan"]["start_date"])).total_seconds(),
            "ranges_span_s": (max(_at(ti["end_date"]) for ti in ranges)
                              - min(_at(ti["start_date"]) for ti in ranges)).total_seconds(),
            "pipeline_s": (_at(run.transform["end_date"]) - _at(run.ingest["start_date"])).total_seconds(),
            "ingestion_s": (_at(run.ingest["end_date"]) - _at(run.ingest["start_date"])).total_seconds(),
            "transform_s": (_at(run.transform["end_date"]) - _at(run.transform["start_date"])).total_seconds(),
            "range_hosts": len(hosts),
        }
    finally:
        runner.stop(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/3")
    parser.add_argument("--securities", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    variants = {"local": None, "celery": CeleryOptions(args.broker, args.workers, args.concurrency)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_number in range(1, args.rounds + 1):
        for name, options in variants.items():
            data_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
            # A queue of its own: a broker shared with other stacks never hands this run's tasks to them.
            settings = StackSettings(data_dir=data_dir, postgres_port=free_port(), api_port=free_port(),
                                     demo_securities=args.securities, demo_events=args.events, celery=options,
                                     extra_env={"AIRFLOW__OPERATORS__DEFAULT_QUEUE": f"bench-{uuid.uuid4().hex[:8]}"})
            try:
                results[name].append(measure(settings))
            finally:
                shutil.rmtree(data_dir, ignore_errors=True)
            print(f"round {round_number} {name}: {json.dumps(results[name][-1])}", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(result[key] for result in results[name])

    celery_label = f"Celery ({args.workers} workers × {args.concurrency})"
    print(f"\n{args.securities} securities, {args.events} events, {args.rounds} round(s), medians:")
    print(f"{'':<44} {'LocalExecutor':>14} {celery_label:>24} {'ratio':>7}")
    for key, label in (("large_table_copy_s", "edi_690 parallel copy (plan → finish)"),
                       ("ranges_span_s", "  its 4 copy_range tasks (first start → last end)"),
                       ("ingestion_s", "ingestion run"), ("transform_s", "transform run"),
                       ("pipeline_s", "whole pipeline (ingestion start → marts)")):
        local, distributed = median("local", key), median("celery", key)
        print(f"{label:<44} {local:>13.1f}s {distributed:>23.1f}s {distributed / local:>6.2f}×")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"celery_executor_{datetime.now():%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
