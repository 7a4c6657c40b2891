"""Run the dbt project against a real warehouse database whose `raw` schema holds demo data.

The copy engine's raw tables are 1:1 copies of the source, so the tests generate the demo data
straight into `raw`. dbt runs as a subprocess with its target and log paths in a temporary
directory, so parallel runs never share state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from include.copy_engine._state import ensure_state_tables
from include.dbt_project import dbt_arguments, dbt_invocation
from include.demo_data import generate, tick
from tests.conftest import PostgresServer

REPO = Path(__file__).resolve().parents[2]
DBT_PROJECT = REPO / "dbt"
DBT = Path(sys.executable).parent / "dbt"

SECURITIES = 300
EVENTS = 3000
SEED = 42
TICK_SEED = 7


def dbt_env(dsn: str | None, work_dir: Path) -> dict[str, str]:
    """The environment for dbt with the profile the template generates for `dsn` (in `work_dir/profiles`)."""
    return dbt_invocation(dsn or "postgresql://nobody@127.0.0.1:9/nowhere", work_dir / "profiles")


def run_dbt(arguments: Sequence[str], *, dsn: str | None, work_dir: Path) -> subprocess.CompletedProcess[str]:
    """`dbt <arguments>` on the project; fails the test with dbt's output if dbt fails."""
    env = dbt_env(dsn, work_dir)
    command = [
        str(DBT),
        *arguments,
        *dbt_arguments(DBT_PROJECT, work_dir / "profiles"),
        "--target-path",
        str(work_dir / "target"),
        "--log-path",
        str(work_dir / "logs"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work_dir)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(arguments)} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr}")
    return result


def fetch(dsn: str, query: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(query).fetchall()


@dataclass
class State:
    """Source rows and dbt's tables at one moment."""

    stock_master: dict[int, dict[str, Any]]
    edi_690: dict[int, dict[str, Any]]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Warehouse:
    """A warehouse after an initial load and build, then a tick and a second build.

    Between tick and second build one security and one event are deleted from raw, as the copy
    engine does when the source deletes them, to exercise the snapshots' hard_deletes.
    """

    server: str
    dsn: str
    work_dir: Path
    initial: State
    after_tick: State
    tick_changes: dict[str, int]
    tick_at: datetime
    deleted_security_id: int
    deleted_event_id: int
    catalog: dict[str, Any]
    manifest: dict[str, Any]


_TABLES = {
    "dim_securities": "select * from marts.dim_securities order by security_id, version_number",
    "fact_events": "select * from marts.fact_events order by event_id",
    "fact_cash_dividends_yearly": "select * from marts.fact_cash_dividends_yearly order by 1, 3",
    "fact_split_adjustment_factors": "select * from marts.fact_split_adjustment_factors order by 1, 6",
    "int_event_summary": "select * from intermediate.int_event_summary order by security_id, event_type",
    "snp_stock_master": "select * from snapshots.snp_stock_master order by security_id, dbt_valid_from",
    "snp_edi_690": "select * from snapshots.snp_edi_690 order by event_id, dbt_valid_from",
    "stg_exchanges": "select * from staging.stg_exchanges order by exchange_mic",
}


def _state(dsn: str, *, with_tables: bool) -> State:
    state = State(
        stock_master={row["security_id"]: row for row in fetch(dsn, "select * from raw.stock_master")},
        edi_690={row["event_id"]: row for row in fetch(dsn, "select * from raw.edi_690")},
    )
    if with_tables:
        state.tables = {name: fetch(dsn, query) for name, query in _TABLES.items()}
    return state


def _delete_untouched_rows(dsn: str, state: State, tick_at: datetime) -> tuple[int, int]:
    """Delete from raw a security with live events and a live event of another security, both
    untouched by the tick; return their ids."""
    live = [event for event in state.edi_690.values() if event["action_flag"] in ("I", "U")]
    security_id = min(
        event["security_id"] for event in live if state.stock_master[event["security_id"]]["updated_at"] < tick_at
    )
    event_id = min(
        event["event_id"] for event in live if event["security_id"] != security_id and event["changed_at"] < tick_at
    )
    with psycopg.connect(dsn) as conn:
        conn.execute("delete from raw.stock_master where security_id = %s", (security_id,))
        conn.execute("delete from raw.edi_690 where event_id = %s", (event_id,))
    return security_id, event_id


@pytest.fixture(scope="module")
def warehouse(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warehouse]:
    """Build once per server and module: generate, build, tick, build, docs generate."""
    dsn = postgres_server.new_database("dbt")
    work_dir = tmp_path_factory.mktemp(f"dbt_{postgres_server.name}")
    try:
        generate(dsn, securities=SECURITIES, events=EVENTS, seed=SEED, schema="raw")
        with psycopg.connect(dsn) as conn:
            ensure_state_tables(conn)  # the copy engine's audit table, empty: raw was generated, not copied
        run_dbt(["build"], dsn=dsn, work_dir=work_dir)
        initial = _state(dsn, with_tables=True)
        changes = tick(dsn, seed=TICK_SEED, schema="raw")
        ticked = _state(dsn, with_tables=False)
        tick_at = max(row["updated_at"] for row in ticked.stock_master.values())
        deleted_security_id, deleted_event_id = _delete_untouched_rows(dsn, ticked, tick_at)
        run_dbt(["build"], dsn=dsn, work_dir=work_dir)
        after_tick = _state(dsn, with_tables=True)
        run_dbt(["docs", "generate"], dsn=dsn, work_dir=work_dir)
        yield Warehouse(
            server=postgres_server.name,
            dsn=dsn,
            work_dir=work_dir,
            initial=initial,
            after_tick=after_tick,
            tick_changes=changes,
            tick_at=tick_at,
            deleted_security_id=deleted_security_id,
            deleted_event_id=deleted_event_id,
            catalog=json.loads((work_dir / "target" / "catalog.json").read_text()),
            manifest=json.loads((work_dir / "target" / "manifest.json").read_text()),
        )
    finally:
        postgres_server.drop_database(dsn)
