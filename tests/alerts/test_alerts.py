"""Alerts: the message and its masking without Airflow; then a real failing DAG run that alerts a
local SMTP server (aiosmtpd) and a local HTTP server standing in for the Slack webhook.

The DAG runs with `dag.test()` in a child Python process, against a throwaway sqlite metadata
database in a tmp AIRFLOW_HOME. A child, not this process: Airflow reads AIRFLOW_HOME and the
database URL once per process, and other test packages (tests/dags) configure Airflow in the same
pytest session; a child also gives "alerts are off" its own process to be logged once in.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from include.alerts import (
    ALERTS_OFF,
    RECIPIENTS_ENV,
    TASK_FAILED,
    VALIDATION_MISMATCH,
    build_alert_message,
    error_summary,
    failure_callbacks,
    mask_secrets,
    on_task_failure,
    parse_recipients,
)
from include.local_stack.postgres import free_port
from tests.loopback import WebhookServer, serve_webhook, slack_connection

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROBE_DAG_ID = "alert_probe"
DAG_RUN_TIMEOUT = 180
# The probe's mapped task fails for both tables; its validation task alerts and succeeds.
EXPECTED_STATES = {"sync_table[0]": "failed", "sync_table[1]": "failed", "validate[-1]": "success"}

# --- the message, without Airflow -------------------------------------------------------------


def test_message_names_dag_task_table_try_error_and_log_link():
    message = build_alert_message(
        kind=TASK_FAILED,
        dag_id="ingest_raw_tables",
        task_id="sync_table",
        table="stock_master",
        try_number=4,
        error=RuntimeError("connection refused\n  at line 2"),
        log_url="http://airflow.example.com/dags/ingest_raw_tables/runs/r1/tasks/sync_table/mapped/0?try_number=4",
    )
    assert message.subject == "[Airflow] Task failed: ingest_raw_tables.sync_table [stock_master]"
    assert message.text.splitlines() == [
        "Task failed: ingest_raw_tables.sync_table [stock_master], try 4",
        "Error: RuntimeError: connection refused",
        "Log: http://airflow.example.com/dags/ingest_raw_tables/runs/r1/tasks/sync_table/mapped/0?try_number=4",
    ]


def test_message_for_an_unmapped_task_without_log_link():
    message = build_alert_message(kind=VALIDATION_MISMATCH, dag_id="d", task_id="t", error="checksums differ")
    assert message.subject == "[Airflow] Validation mismatch: d.t"
    assert message.text == "Validation mismatch: d.t\nError: checksums differ"


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        (
            "could not connect to postgresql://loader:hunter2@db.internal:5432/warehouse",
            "could not connect to postgresql://loader:***@db.internal:5432/warehouse",
        ),
        ("dsn postgresql://loader:p@ss:w0rd@db:5432/w failed", "dsn postgresql://loader:***@db:5432/w failed"),
        ("host=db user=loader password=hunter2 dbname=w", "host=db user=loader password=*** dbname=w"),
        ("password='two words' port=5432", "password=*** port=5432"),
        ('{"login": "loader", "password": "hunter2"}', '{"login": "loader", "password": ***}'),
        ("PGPASSWORD=x; api_key: abc123, db_token=t0k", "PGPASSWORD=***; api_key: ***, db_token=***"),
        ("the passwords differ at http://host:8080/path", "the passwords differ at http://host:8080/path"),
    ],
)
def test_masking_hides_dsn_and_key_value_passwords(raw, masked):
    assert mask_secrets(raw) == masked


def test_error_summary_is_first_line_typed_masked_and_bounded():
    error = ValueError("login failed for postgresql://u:secret@h/db\nTraceback noise")
    assert error_summary(error) == "ValueError: login failed for postgresql://u:***@h/db"
    assert error_summary(KeyError()) == "KeyError"
    assert error_summary(None) == "no error recorded"
    assert len(error_summary("x" * 5000)) == 500


def test_recipients_from_a_string_or_a_list():
    assert parse_recipients("a@example.com, b@example.com;c@example.com") == [
        "a@example.com",
        "b@example.com",
        "c@example.com",
    ]
    assert parse_recipients(["a@example.com", " "]) == ["a@example.com"]
    assert parse_recipients(None) == []


def test_failure_callbacks_is_a_list_of_callables():
    assert failure_callbacks() == [on_task_failure]


def test_importing_alerts_imports_no_airflow():
    code = "import sys, include.alerts; print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- a real DAG run that alerts servers on loopback ---------------------------------------------

PROBE_DAG = textwrap.dedent(
    '''
    """A DAG that fails on purpose, to exercise include.alerts."""

    from __future__ import annotations

    import json
    from datetime import UTC, datetime

    from airflow.sdk import dag, get_current_context, task

    from include.alerts import failure_callbacks, send_validation_alert


    @dag(
        dag_id="alert_probe",
        schedule=None,
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
        catchup=False,
        tags=["test"],
        default_args={"retries": 0, "on_failure_callback": failure_callbacks()},
    )
    def alert_probe():
        @task(map_index_template="{{ table_name }}")
        def sync_table(table_name: str) -> None:
            get_current_context()["table_name"] = table_name
            raise RuntimeError(
                f"copy of {table_name} failed: postgresql://loader:hunter2@db.internal:5432/w refused"
                "\\nsecond line that stays out of the alert"
            )

        @task
        def validate() -> None:
            send_validation_alert(get_current_context(), table="edi_690", details="checksum 1f != 2e over 12 rows")

        sync_table.expand(table_name=["stock_master", "edi_690"])
        validate()


    probe = alert_probe()

    if __name__ == "__main__":
        # Run by tests/alerts/test_alerts.py: migrate the throwaway database, then one run per
        # scenario named on the command line, in this one process, each with the alert connections
        # the test gave it as PROBE_<SCENARIO>_CONN_<NAME> (none at all for some).
        import os
        import sys

        from airflow.utils.db import upgradedb

        upgradedb()
        for scenario in sys.argv[1:]:
            for name in ("SLACK_ALERTS", "SMTP_ALERTS"):
                value = os.environ.get(f"PROBE_{scenario.upper()}_CONN_{name}")
                if value:
                    os.environ[f"AIRFLOW_CONN_{name}"] = value
                else:
                    os.environ.pop(f"AIRFLOW_CONN_{name}", None)
            print(f"PROBE_START {scenario}", flush=True)
            run = probe.test()
            states = {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in run.get_task_instances()}
            print("PROBE_RESULT " + json.dumps({"run": str(run.state), "tasks": states}), flush=True)
    '''
)


@dataclass
class ProbeRun:
    run_state: str
    task_states: dict[str, str]
    output: str


def run_probe_dag(home: Path, scenarios: dict[str, dict[str, str]]) -> dict[str, ProbeRun]:
    """Migrate a fresh metadata database in `home`, then `dag.test()` the probe DAG once per scenario,
    in order, with that scenario's `AIRFLOW_CONN_*` variables."""
    dags = home / "dags"
    dags.mkdir()
    dag_file = dags / "alert_probe.py"
    dag_file.write_text(PROBE_DAG)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AIRFLOW") and key not in (RECIPIENTS_ENV, "PYTHONPATH")
    }
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__API__BASE_URL": "http://airflow.example.com",
            "PYTHONPATH": str(PROJECT_ROOT),
            **{
                key.replace("AIRFLOW_CONN_", f"PROBE_{scenario.upper()}_CONN_"): value
                for scenario, connections in scenarios.items()
                for key, value in connections.items()
            },
        }
    )
    done = subprocess.run(
        [sys.executable, str(dag_file), *scenarios],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=DAG_RUN_TIMEOUT,
    )
    runs: dict[str, ProbeRun] = {}
    for chunk in done.stdout.split("PROBE_START ")[1:]:
        scenario, _, output = chunk.partition("\n")
        result = [line for line in output.splitlines() if line.startswith("PROBE_RESULT ")]
        if result:
            parsed = json.loads(result[-1].removeprefix("PROBE_RESULT "))
            runs[scenario] = ProbeRun(parsed["run"], parsed["tasks"], output)
    assert done.returncode == 0 and set(runs) == set(scenarios), f"dag.test() did not finish:\n{done.stdout[-6000:]}"
    return runs


@dataclass
class RecordingHandler:
    """aiosmtpd handler that keeps every message it is given."""

    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 OK"


@pytest.fixture(scope="module")
def smtp_server() -> Iterator[tuple[Controller, RecordingHandler]]:
    handler = RecordingHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller, handler
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def webhook_server() -> Iterator[WebhookServer]:
    with serve_webhook() as server:
        yield server


def connection_env(smtp_port: int, webhook_port: int) -> dict[str, str]:
    slack = slack_connection(webhook_port)
    mail = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": smtp_port,
        "extra": {
            "from_email": "airflow@example.com",
            "to": "data-team@example.com",
            "disable_ssl": True,
            "disable_tls": True,
            "retry_limit": 0,
            "timeout": 10,
        },
    }
    return {"AIRFLOW_CONN_SLACK_ALERTS": json.dumps(slack), "AIRFLOW_CONN_SMTP_ALERTS": json.dumps(mail)}


def mail_text(message: EmailMessage) -> str:
    return "\n".join(part.get_content() for part in message.walk() if part.get_content_maintype() == "text")


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory, smtp_server, webhook_server) -> dict[str, ProbeRun]:
    """One child process, three runs: no alert connections; both pointing at closed ports; both
    pointing at the servers here."""
    smtp, _ = smtp_server
    home = tmp_path_factory.mktemp("alerts_airflow_home")
    scenarios = {
        "off": {},
        "unreachable": connection_env(free_port(), free_port()),
        "on": connection_env(smtp.port, webhook_server.server_address[1]),
    }
    return run_probe_dag(home, scenarios)


def test_failing_run_alerts_slack_and_email_on_loopback(probe_runs, smtp_server, webhook_server):
    _, mailbox = smtp_server
    probe = probe_runs["on"]

    assert probe.run_state == "failed"
    assert probe.task_states == EXPECTED_STATES
    assert ALERTS_OFF not in probe.output and "Could not send" not in probe.output

    texts = sorted(body["json"]["text"] for body in webhook_server.bodies)
    assert {body["path"] for body in webhook_server.bodies} == {"/services/T000/B000/XXXX"}
    assert len(texts) == 3, probe.output[-6000:]
    failures = [text for text in texts if text.startswith(TASK_FAILED)]
    for table, index in (("edi_690", 1), ("stock_master", 0)):
        text = next(text for text in failures if f"[{table}]" in text)
        assert f"{TASK_FAILED}: {PROBE_DAG_ID}.sync_table [{table}], try 1" in text
        assert f"RuntimeError: copy of {table} failed: postgresql://loader:***@db.internal:5432/w refused" in text
        assert f"Log: http://airflow.example.com/dags/{PROBE_DAG_ID}/runs/" in text
        assert f"/tasks/sync_table/mapped/{index}?try_number=1" in text
    validation = next(text for text in texts if text.startswith(VALIDATION_MISMATCH))
    assert f"{VALIDATION_MISMATCH}: {PROBE_DAG_ID}.validate [edi_690]" in validation
    assert "checksum 1f != 2e over 12 rows" in validation
    assert all("hunter2" not in text and "second line" not in text for text in texts)

    assert len(mailbox.messages) == 3, probe.output[-6000:]
    mails = {message["Subject"]: message for message in mailbox.messages}
    for table in ("stock_master", "edi_690"):
        mail = mails[f"[Airflow] {TASK_FAILED}: {PROBE_DAG_ID}.sync_table [{table}]"]
        assert mail["From"] == "airflow@example.com"
        assert mail["X-Envelope-To"] == "data-team@example.com"
        body = mail_text(mail)
        assert f"RuntimeError: copy of {table} failed: postgresql://loader:***@db.internal:5432/w refused" in body
        assert f"/dags/{PROBE_DAG_ID}/runs/" in body and "hunter2" not in body
    assert "checksum 1f != 2e over 12 rows" in mail_text(
        mails[f"[Airflow] {VALIDATION_MISMATCH}: {PROBE_DAG_ID}.validate [edi_690]"]
    )


def test_without_connections_tasks_fail_normally_and_alerts_are_off_once(probe_runs):
    probe = probe_runs["off"]

    assert probe.run_state == "failed"
    assert probe.task_states == EXPECTED_STATES
    assert "copy of stock_master failed" in probe.output
    # Three alerts were due (two failures, one validation mismatch) in one process: one line.
    assert probe.output.count(ALERTS_OFF) == 1, probe.output[-6000:]
    assert "Could not send" not in probe.output


def test_an_alert_that_cannot_be_sent_is_logged_and_the_task_error_stands(probe_runs):
    probe = probe_runs["unreachable"]

    # The tasks end as they would without alerts: the failure is the task's own error, and the
    # validation task, whose alert could not be sent either, still succeeds.
    assert probe.run_state == "failed"
    assert probe.task_states == EXPECTED_STATES
    assert "RuntimeError: copy of stock_master failed" in probe.output
    assert probe.output.count("Could not send the alert through connection slack_alerts") == 3, probe.output[-6000:]
    assert probe.output.count("Could not send the alert through connection smtp_alerts") == 3
    assert ALERTS_OFF not in probe.output
