"""Alerts on task failure and on a validation mismatch, through Slack and email.

Two connections switch the channels on, and nothing else is needed:

- `slack_alerts` (conn_type `slackwebhook`) posts through the Slack provider's `SlackWebhookNotifier`;
- `smtp_alerts` (conn_type `smtp`) mails through the SMTP provider's `SmtpNotifier`, to the addresses
  in the connection's extra `to`, or else in the `ALERT_EMAIL_TO` environment variable.

Which channels are on is decided each time an alert is sent, never when a DAG file is parsed: this
module imports no Airflow and looks nothing up at import. With neither connection defined, the first
alert of a process logs "alerts are off: ..." and every alert does nothing. Sending an alert never
raises: a failure is logged, so that it cannot mask the task's own error.

    default_args={"on_failure_callback": failure_callbacks(), ...}
    send_validation_alert(get_current_context(), table="stock_master", details="...")

See docs/alerts.md.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SLACK_CONN_ID = "slack_alerts"
SMTP_CONN_ID = "smtp_alerts"
RECIPIENTS_EXTRA = "to"
RECIPIENTS_ENV = "ALERT_EMAIL_TO"
ALERTS_OFF = f"alerts are off: define connection {SLACK_CONN_ID} or {SMTP_CONN_ID}"

TASK_FAILED = "Task failed"
VALIDATION_MISMATCH = "Validation mismatch"

# Long enough for a useful exception message, short enough for a Slack line and a mail subject.
MAX_ERROR_CHARS = 500
MASK = "***"

# scheme://user:password@host: everything between "user:" and the last "@" of the token goes, so a
# password holding "@" is masked whole rather than in part.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)\S+(?=@[^\s@]*)")
# key=value and key: value pairs (libpq conninfo, JSON, env dumps) whose key names a secret, also as
# a suffix: PGPASSWORD=..., db_password: ...
_KEY_SECRET = re.compile(
    r"""(?P<head>["']?\b\w*?(?:password|passwd|pwd|secret|token|api[_-]?key)["']?\s*[=:]\s*)"""
    r"""(?:"[^"]*"|'[^']*'|[^\s,;&'"}]+)""",
    re.IGNORECASE,
)


def mask_secrets(text: str) -> str:
    """`text` with DSN passwords and `password=...`-like values replaced by `***`."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    return _KEY_SECRET.sub(lambda m: m["head"] + MASK, text)


def error_summary(error: BaseException | str | None) -> str:
    """The first line of an error, prefixed with the exception's type, masked and bounded."""
    if error is None:
        return "no error recorded"
    text = str(error).strip()
    first_line = text.splitlines()[0].strip() if text else ""
    if isinstance(error, BaseException):
        first_line = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    first_line = mask_secrets(first_line)
    if len(first_line) > MAX_ERROR_CHARS:
        first_line = first_line[: MAX_ERROR_CHARS - 1] + "…"
    return first_line


@dataclass(frozen=True)
class AlertMessage:
    """What every channel sends: a one-line subject and a short plain-text body."""

    subject: str
    text: str


def build_alert_message(
    *,
    kind: str,
    dag_id: str,
    task_id: str,
    table: str | None = None,
    try_number: int | None = None,
    error: BaseException | str | None = None,
    log_url: str | None = None,
) -> AlertMessage:
    """The alert for one task instance. Pure: no Airflow, no I/O.

    >>> build_alert_message(kind="Task failed", dag_id="d", task_id="t", table="orders", try_number=2,
    ...                     error=ValueError("boom"), log_url="http://x/log").text.splitlines()
    ['Task failed: d.t [orders], try 2', 'Error: ValueError: boom', 'Log: http://x/log']
    """
    where = f"{dag_id}.{task_id}" + (f" [{table}]" if table else "")
    headline = f"{kind}: {where}" + (f", try {try_number}" if try_number else "")
    summary = error_summary(error)
    lines = [headline, f"Error: {summary}"]
    if log_url:
        lines.append(f"Log: {log_url}")
    return AlertMessage(subject=f"[Airflow] {kind}: {where}", text="\n".join(lines))


def parse_recipients(value: str | Iterable[str] | None) -> list[str]:
    """Addresses from a list or a comma/semicolon separated string."""
    if not value:
        return []
    items = re.split(r"[,;]", value) if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item and item.strip()]


def failure_callbacks() -> list[Callable[[Mapping[str, Any]], None]]:
    """The DAG's `default_args["on_failure_callback"]`: alert on a task's final failure."""
    return [on_task_failure]


def on_task_failure(context: Mapping[str, Any]) -> None:
    """A task's failure callback: send the failure alert to every configured channel."""
    try:
        _alert(context, TASK_FAILED, table=None, error=context.get("exception"))
    except Exception:
        log.exception("Could not send the failure alert")


def send_validation_alert(context: Mapping[str, Any], table: str, details: str) -> None:
    """Alert that `table` failed validation (e.g. checksums differ); call it from the running task."""
    try:
        _alert(context, VALIDATION_MISMATCH, table=table, error=details)
    except Exception:
        log.exception("Could not send the validation alert for %s", table)


def _alert(context: Mapping[str, Any], kind: str, *, table: str | None, error: BaseException | str | None) -> None:
    channels = _active_channels()
    if not channels:
        return
    message = _message_from_context(context, kind, table=table, error=error)
    for conn_id in channels:
        try:
            if conn_id == SLACK_CONN_ID:
                _send_slack(context, message)
            else:
                _send_email(context, message)
        except Exception:
            log.exception("Could not send the alert through connection %s", conn_id)
        else:
            log.info("Alert sent through connection %s: %s", conn_id, message.subject)


def _message_from_context(
    context: Mapping[str, Any], kind: str, *, table: str | None, error: BaseException | str | None
) -> AlertMessage:
    ti = context["ti"]
    if table is None:
        table = getattr(ti, "rendered_map_index", None)
        map_index = getattr(ti, "map_index", -1)
        if not table and map_index is not None and map_index >= 0:
            table = f"map index {map_index}"
    try:
        log_url: str | None = ti.log_url
    except Exception:  # the link is a convenience; the alert goes out without it
        log.warning("No log URL for %s", ti.task_id, exc_info=True)
        log_url = None
    return build_alert_message(
        kind=kind,
        dag_id=ti.dag_id,
        task_id=ti.task_id,
        table=table,
        try_number=getattr(ti, "try_number", None),
        error=error,
        log_url=log_url,
    )


def _connection_exists(conn_id: str) -> bool:
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        Connection.get(conn_id)
    except AirflowNotFoundException:
        return False
    return True


def _active_channels() -> list[str]:
    channels = [conn_id for conn_id in (SLACK_CONN_ID, SMTP_CONN_ID) if _connection_exists(conn_id)]
    if not channels:
        _log_alerts_off()
    return channels


@functools.cache
def _log_alerts_off() -> None:
    """Once per process: a DAG run that fails many tasks should not repeat it for each."""
    log.warning(ALERTS_OFF)


def _send_slack(context: Mapping[str, Any], message: AlertMessage) -> None:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    notifier = SlackWebhookNotifier(slack_webhook_conn_id=SLACK_CONN_ID, text=message.text)
    # notify(), not the notifier's __call__: that renders the text as a Jinja template, and an
    # error message may well contain "{{" or "{%".
    notifier.notify(dict(context))


def _send_email(context: Mapping[str, Any], message: AlertMessage) -> None:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier
    from airflow.sdk import Connection

    extra = Connection.get(SMTP_CONN_ID).extra_dejson
    recipients = parse_recipients(extra.get(RECIPIENTS_EXTRA)) or parse_recipients(os.environ.get(RECIPIENTS_ENV))
    if not recipients:
        raise ValueError(
            f"no email recipients: set extra {RECIPIENTS_EXTRA!r} on connection {SMTP_CONN_ID} "
            f"or the {RECIPIENTS_ENV} environment variable"
        )
    notifier = SmtpNotifier(
        to=recipients,
        # None: the sender is the connection's extra "from_email".
        from_email=None,
        subject=message.subject,
        html_content=f"<pre>{html.escape(message.text)}</pre>",
        smtp_conn_id=SMTP_CONN_ID,
    )
    notifier.notify(dict(context))
