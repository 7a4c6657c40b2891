from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from include.local_stack import airflow, runner
from include.local_stack.postgres import free_port
from include.local_stack.settings import StackSettings
from include.triggerer_setup import PUBLISHED_RESULTS_KEY
from tests.loopback import WebhookServer, serve_webhook, slack_connection

# Small enough for CI, large enough that every event type and action flag occurs.
E2E_SECURITIES = 400
E2E_EVENTS = 4_000
# Failed tasks are retried after 2 s instead of 30 s: the scenarios wait for retries (a failing dbt
# test is tried three times, a killed worker's range once more) and prove nothing about the delay.
FAST_RETRIES = {"PIPELINE_RETRY_DELAY_S": "2"}


@dataclass
class RunningStack:
    settings: StackSettings
    client: airflow.AirflowClient


def start_stack(data_dir, warehouse_url: str | None, extra_env: dict[str, str], source_url: str | None = None,
                **settings_args) -> RunningStack:
    settings = StackSettings(
        data_dir=data_dir,
        postgres_port=free_port(),
        api_port=free_port(),
        warehouse_url=warehouse_url,
        source_url=source_url,
        **settings_args,
        demo_securities=E2E_SECURITIES,
        demo_events=E2E_EVENTS,
        extra_env={**FAST_RETRIES, **extra_env},
    )
    try:
        client = runner.up(settings)
    except Exception:
        runner.stop(settings)
        raise
    return RunningStack(settings, client)


def read_triggerer_log(stack: RunningStack) -> str:
    """The triggerer's log, asserted to hold its INFO lines (a line the caller finds missing is missing) and
    no warning that a change of include/triggerer_setup.py could not be made."""
    text = (stack.settings.airflow_home / "logs" / "triggerer.log").read_text(errors="replace")
    assert "the triggerer's execution API is ready" in text
    assert [line for line in text.splitlines() if "could not" in line] == []
    return text


def published_results_not_found(stack: RunningStack) -> list[str]:
    """The triggerer's error lines for reads of the producer's published results before it sent them
    (include/triggerer_setup.py: read_published_results_quietly)."""
    assert list((stack.settings.airflow_home / "logs").rglob("*.log.trigger.*.log")), "no trigger ran"
    return [line for line in read_triggerer_log(stack).splitlines()
            if "XCom not found" in line and PUBLISHED_RESULTS_KEY in line]  # fmt: skip


def node_lines_in_triggerer_log(stack: RunningStack) -> list[str]:
    """Lines a dbt node's trigger logged (include/dbt_watcher.py) that are in the triggerer's own log."""
    return [line for line in read_triggerer_log(stack).splitlines()
            if "dbt result of" in line or "compiled SQL of" in line]  # fmt: skip


@pytest.fixture(scope="module")
def slack_receiver() -> Iterator[WebhookServer]:
    """Where the stack's `slack_alerts` connection posts its alerts."""
    with serve_webhook() as server:
        yield server


@pytest.fixture(scope="module", params=["pg18", "pg15"])
def stack(request, server_dirs, slack_receiver) -> Iterator[RunningStack]:
    """A real Airflow whose warehouse is the embedded PostgreSQL 18, or the machine's PostgreSQL 15;
    its alerts go to `slack_receiver`.

    On PostgreSQL 15 (trust authentication) source and warehouse are both there, as servers of your
    own, and their URLs carry no password: dbt must connect as the copy engine does, without one.
    """
    warehouse_url = source_url = None
    if request.param == "pg15":
        pg15 = request.getfixturevalue("pg15")
        source_url = pg15.new_database("e2e_source")
        warehouse_url = pg15.new_database("e2e_warehouse")
        warehouse_url, role = owned_by_new_login_role(pg15.admin_dsn, warehouse_url)
        warehouse_url = make_conninfo(**{k: v for k, v in conninfo_to_dict(warehouse_url).items() if k != "password"})
    slack_receiver.bodies.clear()
    alerts = {"AIRFLOW_CONN_SLACK_ALERTS": json.dumps(slack_connection(slack_receiver.server_port))}
    running = start_stack(server_dirs(f"stack-{request.param}"), warehouse_url, alerts, source_url)
    try:
        yield running
    finally:
        runner.stop(running.settings)
        if warehouse_url:
            pg15.drop_database(warehouse_url)
            pg15.drop_database(source_url)
            with psycopg.connect(pg15.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def owned_by_new_login_role(admin_dsn: str, database_url: str) -> tuple[str, str]:
    """A warehouse as users have one: owned by a password login role that is not a superuser."""
    params = conninfo_to_dict(database_url)
    role, password = f"loader_{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("create role {} login password {}").format(sql.Identifier(role), sql.Literal(password)))
        conn.execute(
            sql.SQL("alter database {} owner to {}").format(sql.Identifier(params["dbname"]), sql.Identifier(role))
        )
    return make_conninfo(database_url, user=role, password=password), role
