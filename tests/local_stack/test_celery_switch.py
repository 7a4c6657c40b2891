"""`AIRFLOW_EXECUTOR=celery make run`: the switch, its bad input, and the broker check against real brokers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from include.local_stack import airflow, celery
from include.local_stack.celery import CeleryOptions, CeleryStackError, options_from_environment
from include.local_stack.postgres import free_port
from include.local_stack.settings import PROJECT_ROOT, StackSettings

REDIS = os.environ.get("CELERY_TEST_BROKER_URL", "redis://127.0.0.1:6379/3")
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def test_the_default_is_the_local_executor_and_needs_no_broker(tmp_path):
    assert options_from_environment({}) is None
    assert options_from_environment({"AIRFLOW_EXECUTOR": "local"}) is None
    env = airflow.airflow_environment(StackSettings(data_dir=tmp_path))
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert not any(key.startswith("AIRFLOW__CELERY__") for key in env if key not in os.environ)


def test_celery_takes_the_broker_workers_and_slots_and_keeps_the_password_out_of_repr(tmp_path):
    options = options_from_environment({"AIRFLOW_EXECUTOR": "celery", "CELERY_BROKER_URL": "redis://:pw9@h:6379/2",
                                        "CELERY_WORKERS": "3", "CELERY_WORKER_CONCURRENCY": "4"})
    assert (options.workers, options.concurrency, options.slots) == (3, 4, 12)
    assert "pw9" not in repr(options) and "pw9" not in options.describe()
    assert options.describe() == "CeleryExecutor, 3 workers × 4 slots, broker redis://:***@h:6379/2"
    settings = StackSettings(data_dir=tmp_path, celery=options)
    assert "pw9" not in repr(settings)
    env = airflow.airflow_environment(settings)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:pw9@h:6379/2"
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://postgres:")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].endswith(f"@127.0.0.1:{settings.postgres_port}/airflow")
    assert airflow.components(settings)[-3:] == ["celery-worker-1", "celery-worker-2", "celery-worker-3"]


@pytest.mark.parametrize(("environ", "message"), [
    ({"AIRFLOW_EXECUTOR": "celery"}, "AIRFLOW_EXECUTOR=celery needs a broker: set CELERY_BROKER_URL"),
    ({"AIRFLOW_EXECUTOR": "kubernetes"}, "AIRFLOW_EXECUTOR='kubernetes' is not an executor the local stack runs"),
    ({"AIRFLOW_EXECUTOR": "celery", "CELERY_BROKER_URL": "redis://h", "CELERY_WORKERS": "0"},
     "CELERY_WORKERS='0' must be a whole number of at least 1"),
    ({"AIRFLOW_EXECUTOR": "celery", "CELERY_BROKER_URL": "redis://h", "CELERY_WORKER_CONCURRENCY": "two"},
     "CELERY_WORKER_CONCURRENCY='two' must be a whole number of at least 1"),
])  # fmt: skip
def test_bad_settings_name_the_variable(environ, message):
    with pytest.raises(CeleryStackError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options_from_environment(environ)


@pytest.mark.parametrize("url", [REDIS, RABBITMQ])
def test_the_machines_brokers_answer(url):
    celery.check_broker(CeleryOptions(url))


def test_a_broker_that_refuses_the_login_is_named_with_the_password_masked():
    with pytest.raises(CeleryStackError) as raised:
        celery.check_broker(CeleryOptions("amqp://guest:wrong-pw@127.0.0.1:5672//"))
    message = str(raised.value)
    assert message.startswith("The Celery broker amqp://guest:***@127.0.0.1:5672// (from CELERY_BROKER_URL) "
                              "cannot be reached: ")
    assert "ACCESS_REFUSED" in message and "wrong-pw" not in message


def test_make_run_with_an_unreachable_broker_stops_before_anything_starts_with_one_line():
    """As a user runs it: the command `make run` runs, in its own process."""
    port, postgres_port = free_port(), free_port()
    env = dict(os.environ, AIRFLOW_EXECUTOR="celery", CELERY_BROKER_URL=f"redis://:hunter2@127.0.0.1:{port}/0",
               LOCAL_POSTGRES_PORT=str(postgres_port), AIRFLOW_API_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-m", "include.local_stack", "run"], env=env, cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: The Celery broker redis://:***@127.0.0.1:{port}/0 (from CELERY_BROKER_URL) cannot be reached: "
        f"Error 111 connecting to 127.0.0.1:{port}. Connection refused. Fix CELERY_BROKER_URL, or unset "
        "AIRFLOW_EXECUTOR to run on the LocalExecutor without a broker."]
    # Not even the embedded PostgreSQL was started.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", postgres_port), timeout=2).close()


def test_a_running_airflow_keeps_its_executor_until_make_stop(tmp_path):
    """`AIRFLOW_EXECUTOR=celery make run` while a LocalExecutor stack runs would start workers nobody sends to."""
    local = StackSettings(data_dir=tmp_path)
    on_celery = StackSettings(data_dir=tmp_path, celery=CeleryOptions(REDIS))
    run_dir = tmp_path / "airflow" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "executor").write_text("LocalExecutor")
    (run_dir / "scheduler.pid").write_text(str(os.getpid()))  # a live process stands in for the scheduler
    (run_dir / "celery-worker-1.pid").write_text(str(os.getpid()))
    running = airflow.running_components(local)
    assert running == {"scheduler": os.getpid(), "celery-worker-1": os.getpid()}  # found whatever the settings
    with pytest.raises(airflow.AirflowError, match=r"running with the LocalExecutor here; run `make stop` first "
                                                   r"to switch to the CeleryExecutor"):
        airflow._check_executor(on_celery, running)
    airflow._check_executor(local, running)
