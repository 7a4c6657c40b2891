"""python -m include.local_stack run | up | stop | status | manifest | tick"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime

from include.local_stack import airflow, celery, runner
from include.local_stack.settings import SOURCE_CONN_ID, StackSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m include.local_stack", description=__doc__)
    parser.add_argument(
        "command",
        choices=["run", "up", "stop", "status", "manifest", "tick"],
        help="run: set up, start Airflow and run the whole pipeline once; up: only set up and start; "
        "stop: stop Airflow and the embedded PostgreSQL; status: what is running; "
        "manifest: build the dbt manifest; tick: apply a batch of changes to the demo source",
    )
    parser.add_argument("--seed", type=int, default=None, help="tick: the seed of the change batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        settings = StackSettings.from_environment()
        if args.command == "run":
            print(runner.run(settings))
        elif args.command == "up":
            runner.up(settings)
            print(f"Airflow is up at {settings.api_url} (login: {airflow.ADMIN_USER} / "
                  f"{airflow.admin_password(settings)}); `make stop` stops it.")  # fmt: skip
        elif args.command == "stop":
            stopped = runner.stop(settings)
            print(f"Stopped: {', '.join(stopped)}." if stopped else "Nothing was running.")
        elif args.command == "status":
            running = airflow.running_components(settings)
            lines = [f"airflow {name}: pid {pid}" for name, pid in running.items()] or ["Airflow is not running."]
            postgres = "running" if runner.embedded_postgres(settings).is_running() else "stopped"
            print("\n".join([*lines, f"embedded PostgreSQL: {postgres}"]))
        elif args.command == "manifest":
            print(f"dbt manifest: {runner.build_manifest(settings)}")
        elif args.command == "tick":
            from include.demo_data import tick

            if not runner.demo_in_use():
                raise runner.StackError("`make tick` changes the demo's source tables, and include/config/tables.yml "
                                        "does not copy them: your own source is left alone.")
            runner.start_databases(settings)
            seed = args.seed if args.seed is not None else int(time.time())
            changed = tick(settings.database_url(SOURCE_CONN_ID), seed=seed, now=datetime.now(UTC))
            print(f"Applied to the source: {changed}. `make run` copies the changes and runs dbt.")
    except (runner.StackError, airflow.AirflowError, celery.CeleryStackError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
