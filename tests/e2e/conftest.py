from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from include.local_stack import airflow, runner
from include.local_stack.postgres import free_port
from include.local_stack.settings import StackSettings

# Small enough for CI, large enough that every event type and action flag occurs.
E2E_SECURITIES = 400
E2E_EVENTS = 4_000


@dataclass
class RunningStack:
    settings: StackSettings
    client: airflow.AirflowClient


def start_stack(data_dir, warehouse_url: str | None) -> RunningStack:
    settings = StackSettings(
        data_dir=data_dir,
        postgres_port=free_port(),
        api_port=free_port(),
        warehouse_url=warehouse_url,
        demo_securities=E2E_SECURITIES,
        demo_events=E2E_EVENTS,
    )
    try:
        client = runner.up(settings)
    except Exception:
        runner.stop(settings)
        raise
    return RunningStack(settings, client)


@pytest.fixture(scope="module", params=["pg18", "pg15"])
def stack(request, tmp_path_factory) -> Iterator[RunningStack]:
    """A real Airflow whose warehouse is the embedded PostgreSQL 18, or the machine's PostgreSQL 15."""
    warehouse_url = None
    if request.param == "pg15":
        warehouse_url = request.getfixturevalue("pg15").new_database("e2e_warehouse")
    running = start_stack(tmp_path_factory.mktemp(f"stack_{request.param}"), warehouse_url)
    try:
        yield running
    finally:
        runner.stop(running.settings)
        if warehouse_url:
            request.getfixturevalue("pg15").drop_database(warehouse_url)
