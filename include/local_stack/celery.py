"""The local stack on Airflow's CeleryExecutor, as Astro Deployments and Amazon MWAA run the DAGs.

`AIRFLOW_EXECUTOR=celery CELERY_BROKER_URL=redis://127.0.0.1:6379/0 make run` starts, besides the
scheduler, dag-processor, api-server and triggerer, `CELERY_WORKERS` workers (default 2) of
`CELERY_WORKER_CONCURRENCY` slots each (default 2), each its own process with a pid file and a log
like the other components. The broker (Redis or RabbitMQ) is the user's; the result backend is the
stack's embedded PostgreSQL. Without AIRFLOW_EXECUTOR the stack runs the LocalExecutor and needs
no broker.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

EXECUTOR_VARIABLE = "AIRFLOW_EXECUTOR"
BROKER_VARIABLE = "CELERY_BROKER_URL"
WORKERS_VARIABLE = "CELERY_WORKERS"
CONCURRENCY_VARIABLE = "CELERY_WORKER_CONCURRENCY"
WORKER_PREFIX = "celery-worker-"
# Set in each worker's environment; `worker_hostname` reads it.
WORKER_NAME_VARIABLE = "LOCAL_STACK_CELERY_WORKER"
# How long a task may go without a heartbeat before the scheduler fails it (and retries it): the
# time a dead worker's tasks wait. Airflow's default, 300 s, is meant for busy production schedulers.
TASK_HEARTBEAT_TIMEOUT_S = 60


class CeleryStackError(RuntimeError):
    """The Celery set-up cannot start; the message names the variable to fix."""


@dataclass(frozen=True)
class CeleryOptions:
    """What `AIRFLOW_EXECUTOR=celery` runs with. The broker URL may hold a password: not in repr."""

    broker_url: str
    workers: int = 2
    concurrency: int = 2

    def __repr__(self) -> str:
        return f"CeleryOptions(broker_url={mask_url(self.broker_url)!r}, workers={self.workers}, " \
               f"concurrency={self.concurrency})"  # fmt: skip

    @property
    def slots(self) -> int:
        return self.workers * self.concurrency

    def describe(self) -> str:
        return f"CeleryExecutor, {self.workers} workers × {self.concurrency} slots, broker {mask_url(self.broker_url)}"


def options_from_environment(environ: dict[str, str] | os._Environ[str] = os.environ) -> CeleryOptions | None:
    """None for the LocalExecutor (the default); the Celery options when AIRFLOW_EXECUTOR=celery."""
    executor = environ.get(EXECUTOR_VARIABLE, "").strip().lower()
    if executor in ("", "local", "localexecutor"):
        return None
    if executor not in ("celery", "celeryexecutor"):
        raise CeleryStackError(f"{EXECUTOR_VARIABLE}={executor!r} is not an executor the local stack runs; "
                               f"set it to `celery` or `local` (the default)")
    broker = environ.get(BROKER_VARIABLE, "").strip()
    if not broker:
        raise CeleryStackError(f"{EXECUTOR_VARIABLE}=celery needs a broker: set {BROKER_VARIABLE}, e.g. "
                               "redis://127.0.0.1:6379/0 or amqp://guest:guest@127.0.0.1:5672//")
    return CeleryOptions(broker, _positive(environ, WORKERS_VARIABLE, 2), _positive(environ, CONCURRENCY_VARIABLE, 2))


def _positive(environ: dict[str, str] | os._Environ[str], name: str, default: int) -> int:
    value = environ.get(name, "").strip() or str(default)
    if not value.isdigit() or int(value) < 1:
        raise CeleryStackError(f"{name}={value!r} must be a whole number of at least 1")
    return int(value)


def mask_url(url: str) -> str:
    """The URL as it may appear in a log or a message: any password replaced."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def check_broker(options: CeleryOptions, timeout: float = 5) -> None:
    """Connect to the broker once; unreachable, refused or unknown, one line says so and what to fix."""
    from kombu import Connection

    try:
        with Connection(options.broker_url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
    except Exception as error:  # kombu raises its own, the transport's and the socket's errors
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1].rstrip(".")
        raise CeleryStackError(f"The Celery broker {mask_url(options.broker_url)} (from {BROKER_VARIABLE}) "
                               f"cannot be reached: {reason}. Fix {BROKER_VARIABLE}, or unset "
                               f"{EXECUTOR_VARIABLE} to run on the LocalExecutor without a broker.") from None


def executor_name(options: CeleryOptions | None) -> str:
    return "LocalExecutor" if options is None else "CeleryExecutor"


def executor_environment(options: CeleryOptions | None, result_backend_dsn: str) -> dict[str, str]:
    """What every Airflow process of a stack on this executor adds to its environment."""
    if options is None:
        return {"AIRFLOW__CORE__EXECUTOR": executor_name(options)}
    return {
        "AIRFLOW__CORE__EXECUTOR": executor_name(options),
        "AIRFLOW__CELERY__BROKER_URL": options.broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": result_backend_dsn.replace("postgresql://", "db+postgresql+psycopg2://", 1),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(options.concurrency),
        # Sending a task to a broker on a machine this busy can take more than the 1 s default.
        "AIRFLOW__CELERY__OPERATION_TIMEOUT": "10",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(TASK_HEARTBEAT_TIMEOUT_S),
    }


def worker_names(options: CeleryOptions | None) -> list[str]:
    return [] if options is None else [f"{WORKER_PREFIX}{index}" for index in range(1, options.workers + 1)]


def is_worker(component: str) -> bool:
    return component.startswith(WORKER_PREFIX)


def worker_arguments(options: CeleryOptions, name: str, run_dir: os.PathLike[str]) -> list[str]:
    """`airflow celery worker …` for one worker: its own Celery node name and pid file; logs are
    files on this machine's disk, which the api-server reads, so no log server (two would share its port)."""
    return ["celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency", str(options.concurrency),
            "--pid", os.path.join(run_dir, f"airflow-{name}.pid"), "--skip-serve-logs"]


def worker_environment(name: str) -> dict[str, str]:
    """A worker's task instances record its name as their hostname, so the UI and the tests see which
    of the machine's workers ran a task (on separate machines the host name alone would say it)."""
    return {WORKER_NAME_VARIABLE: name, "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname"}


def worker_hostname() -> str:
    """`[core] hostname_callable` of a local worker: `<worker>@<host>`, Celery's name for the node."""
    host = socket.getfqdn()
    name = os.environ.get(WORKER_NAME_VARIABLE)
    return f"{name}@{host}" if name else host


def _log_offset(log: Path) -> Path:
    return log.with_name(f".{log.name}.start")


def mark_log_start(log: Path) -> None:
    """Note where a worker's log (appended to across restarts) stands as the worker starts."""
    _log_offset(log).write_text(str(log.stat().st_size if log.exists() else 0))


def worker_ready(log: Path, worker: str) -> bool:
    """Celery logs `<node>@<host> ready.` once the worker consumes from the broker."""
    offset = _log_offset(log)
    if not (log.exists() and offset.exists()):
        return False
    with log.open("rb") as handle:
        handle.seek(int(offset.read_text() or 0))
        return re.search(rf"{re.escape(worker)}@\S+ ready\.".encode(), handle.read()) is not None
