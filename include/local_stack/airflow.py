"""A real Airflow on this machine: scheduler, dag-processor, api-server and triggerer (and Celery workers,
include/local_stack/celery.py, when AIRFLOW_EXECUTOR=celery).

Each component is its own detached process (it outlives `make run`), with a pid file and a log in
the stack's data folder. The REST API is the only way this module talks to a running Airflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from include.dbt_project import PROJECT_DIR_VARIABLE as DBT_PROJECT_DIR_VARIABLE
from include.dbt_project import docs_projects_setting, project_name
from include.local_stack import celery
from include.local_stack.postgres import free_port
from include.local_stack.settings import SOURCE_CONN_ID, WAREHOUSE_CONN_ID, StackSettings

logger = logging.getLogger(__name__)

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# Cosmos' watcher producer would also rewrite an Airflow Variable holding every result so far on each
# of its XCom pushes (700 extra writes of a growing value for 50 models), to survive a hard crash;
# without it the backup is written once, when the producer fails. The Dockerfile sets the same.
WATCHER_PRODUCER_SETTINGS = {"AIRFLOW__COSMOS__ENABLE_WATCHER_RELIABLE_RETRY": "False"}
ADMIN_USER = "admin"


class AirflowError(RuntimeError):
    """The local Airflow did not do what was asked; the message says what to look at."""


class AirflowAPIError(AirflowError):
    """The REST API answered with an error status."""

    def __init__(self, method: str, path: str, status: int, detail: str) -> None:
        super().__init__(f"{method} {path} answered {status}: {detail[:1000]}")
        self.status = status


def airflow_connection_uri(dsn: str) -> str:
    """An Airflow connection URI (`postgres://…`) for a libpq DSN."""
    params = conninfo_to_dict(dsn)
    login = params.get("user", "postgres")
    password = params.get("password")
    auth = f"{urllib.parse.quote(login, safe='')}"
    if password:
        auth += f":{urllib.parse.quote(password, safe='')}"
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    # Anything else (sslmode, certificates, passfile, options) becomes the connection's extra.
    extra = {key: value for key, value in params.items() if key not in ("user", "password", "host", "port", "dbname")}
    query = f"?{urllib.parse.urlencode(extra)}" if extra else ""
    return f"postgres://{auth}@{host}:{port}/{params.get('dbname', 'postgres')}{query}"


def airflow_environment(settings: StackSettings) -> dict[str, str]:
    """The environment every Airflow process of this stack runs with."""
    home = settings.airflow_home
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            # config/ holds airflow_local_settings.py, which Airflow finds in $AIRFLOW_HOME/config on
            # Astro: the scheduler imports dbt and parses the DAGs once, and every task it forks inherits them.
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(settings.root), str(settings.root / "config"), env.get("PYTHONPATH")])
            ),
            "AIRFLOW__CORE__DAGS_FOLDER": str(settings.root / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(settings.root / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": settings.secret("fernet_key"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.api_url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(settings.api_port),
            "AIRFLOW__API__BASE_URL": settings.api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": settings.secret("jwt_secret"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": settings.embedded_dsn("airflow").replace(
                "postgresql://", "postgresql+psycopg2://", 1
            ),
            # Nothing phones home: this machine, like many behind a firewall, has no internet.
            "AIRFLOW__USAGE_DATA_COLLECTION__ENABLED": "False",
            "AIRFLOW__COSMOS__ENABLE_TELEMETRY": "False",
            **WATCHER_PRODUCER_SETTINGS,
            # The docs the transform's dbt_docs task publishes, served by Cosmos' plugin under
            # Browse → dbt Docs (include/dbt_config.py writes where this entry points).
            # Keyed by the dbt project's name, read from its manifest.
            "AIRFLOW__COSMOS__DBT_DOCS_PROJECTS": docs_projects_setting(
                project_name(settings.dbt_project_dir), str(settings.data_dir / "dbt_docs")
            ),
            DBT_PROJECT_DIR_VARIABLE: str(settings.dbt_project_dir),
            # Cosmos' partial-parse and profile cache, per stack: by default every stack on the
            # machine (make run, the e2e tests, the benchmark) would share /tmp/cosmos.
            "AIRFLOW__COSMOS__CACHE_DIR": str(settings.data_dir / "cosmos_cache"),
            # Find new DAG files within seconds, not minutes. An edited DAG file is parsed again at
            # once (Airflow's `modified_time` order); an unchanged one every 30 s, Airflow's default:
            # every 10 s, the 200-model transform's 400-task DAG took the dag-processor 9 s of CPU in a
            # 50 s run, beside the build. `make run` restarts Airflow when the project changed.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW_CONN_SOURCE_POSTGRES": airflow_connection_uri(settings.database_url(SOURCE_CONN_ID)),
            "AIRFLOW_CONN_WAREHOUSE_POSTGRES": airflow_connection_uri(
                settings.database_url(WAREHOUSE_CONN_ID)
            ),
        }
    )
    env.update(celery.executor_environment(settings.celery, settings.embedded_dsn("airflow")))
    # `make run` triggers the pipeline itself; the schedule of tables.yml would start a second run
    # at once (catchup=False still runs the latest interval). PIPELINE_SCHEDULE: include/ingestion.py.
    env.setdefault("PIPELINE_SCHEDULE", "none")
    # The demo's CDC table on a source of your own at wal_level replica: copied in full, with a note
    # (include/ingestion.py); the embedded server is at wal_level logical and syncs it by CDC.
    env.setdefault("PIPELINE_CDC_FALLBACK", "full")
    env.update(settings.extra_env)
    return env


def components(settings: StackSettings) -> list[str]:
    """The processes this stack runs: Airflow's components, and its Celery workers if any."""
    return [*COMPONENTS, *celery.worker_names(settings.celery)]


def _airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def _pid_file(settings: StackSettings, component: str) -> Path:
    return settings.airflow_home / "run" / f"{component}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][0] != "Z"
    except OSError:
        return True


def running_components(settings: StackSettings) -> dict[str, int]:
    """Every component with a live pid file, workers included whatever the current settings say
    (`make stop` without AIRFLOW_EXECUTOR=celery stops them too)."""
    found = {}
    run_dir = settings.airflow_home / "run"
    for path in sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []:
        component = path.stem
        if component in COMPONENTS or celery.is_worker(component):
            pid = int(path.read_text())
            if _alive(pid):
                found[component] = pid
    return found


def _check_executor(settings: StackSettings, running: dict[str, int]) -> None:
    """A running Airflow keeps its executor: switching needs `make stop` first."""
    path = settings.airflow_home / "run" / "executor"
    wanted = celery.executor_name(settings.celery)
    if running and path.exists() and path.read_text() != wanted:
        raise AirflowError(f"Airflow is running with the {path.read_text()} here; run `make stop` first to switch "
                           f"to the {wanted}")
    path.write_text(wanted)


def _write_passwords_file(settings: StackSettings) -> None:
    path = settings.airflow_home / "passwords.json"
    if not path.exists():
        path.write_text(json.dumps({ADMIN_USER: settings.secret("admin_password")}))
        path.chmod(0o600)


def admin_password(settings: StackSettings) -> str:
    return json.loads((settings.airflow_home / "passwords.json").read_text())[ADMIN_USER]


def migrate_database(settings: StackSettings) -> None:
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    _write_passwords_file(settings)
    log = settings.airflow_home / "db-migrate.log"
    with log.open("w") as out:
        result = subprocess.run(
            [_airflow_bin(), "db", "migrate"], env=airflow_environment(settings), stdout=out, stderr=out
        )
    if result.returncode != 0:
        raise AirflowError(f"`airflow db migrate` failed; see {log}")


def start(settings: StackSettings) -> None:
    """Start every component that is not already running; never a second copy of one."""
    env = airflow_environment(settings)
    # The log servers' fixed default ports (8793, 8794) would collide with a second stack on the
    # machine (`make test` while `make run` is up); task logs are read from files here anyway.
    env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(free_port())
    env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"] = str(free_port())
    (settings.airflow_home / "run").mkdir(parents=True, exist_ok=True)
    logs = settings.airflow_home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    already = running_components(settings)
    _check_executor(settings, already)
    for component in components(settings):
        if component in already:
            continue
        arguments, component_env = [component], env
        if celery.is_worker(component):
            assert settings.celery is not None
            arguments = celery.worker_arguments(settings.celery, component, settings.airflow_home / "run")
            component_env = {**env, **celery.worker_environment(component)}
        # Started through a shell that exits at once: the component is orphaned to init, so it
        # outlives this command and is never a zombie child of it.
        log = logs / f"{component}.log"
        if celery.is_worker(component):
            celery.mark_log_start(log)
        launched = subprocess.run(
            ["sh", "-c", 'exec "$@" >>"$LOG" 2>&1 </dev/null & echo $!', "sh", _airflow_bin(), *arguments],
            env={**component_env, "LOG": str(log)},
            cwd=settings.root,
            start_new_session=True,
            capture_output=True,
            text=True,
            check=True,
        )
        pid = int(launched.stdout.strip())
        _pid_file(settings, component).write_text(str(pid))
        logger.info("started airflow %s (pid %s, log %s)", component, pid, log)


def stop(settings: StackSettings, timeout: float = 30) -> list[str]:
    """Stop every running component (with its task processes); return what was stopped."""
    running = running_components(settings)
    # Task processes run in process groups of their own: found now, killed if they outlive the stop.
    tasks = {child for pid in running.values() for child in descendants(pid)}
    groups = {}
    for component, pid in running.items():
        try:
            groups[component] = os.getpgid(pid)
            os.killpg(groups[component], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for component, pid in running.items():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid) and component in groups:
            try:
                os.killpg(groups[component], signal.SIGKILL)
            except ProcessLookupError:
                pass
    for child in tasks:
        if _alive(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    for component in running:
        _pid_file(settings, component).unlink(missing_ok=True)
    return list(running)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, …), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


@dataclass
class AirflowClient:
    """The few REST calls the local runner needs, authenticated as the local admin."""

    base_url: str
    password: str
    user: str = ADMIN_USER
    _token: str | None = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise AirflowAPIError(method, path, error.code, error.read().decode(errors="replace")) from None
        return json.loads(payload) if payload else None

    def login(self) -> None:
        self._token = None
        answer = self._request("POST", "/auth/token", {"username": self.user, "password": self.password})
        self._token = answer["access_token"]

    def get(self, path: str, attempts: int = 3) -> Any:
        """GET, asked again when the api-server is too busy to answer in time (reads are safe to repeat)."""
        for attempt in range(1, attempts + 1):
            try:
                return self._request("GET", path)
            except (TimeoutError, ConnectionError, urllib.error.URLError) as error:
                if isinstance(error, urllib.error.HTTPError) or attempt == attempts:
                    raise
                time.sleep(2 * attempt)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("POST", path, body)

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("PATCH", path, body)


def wait_until_healthy(settings: StackSettings, timeout: float = 180) -> AirflowClient:
    """Wait for the api-server and for scheduler, triggerer and dag-processor heartbeats."""
    client = AirflowClient(settings.api_url, admin_password(settings))
    deadline = time.monotonic() + timeout
    last = "api-server not answering"
    while time.monotonic() < deadline:
        missing = [c for c in components(settings) if c not in running_components(settings)]
        if missing:
            raise AirflowError(
                f"Airflow {', '.join(missing)} exited; see {settings.airflow_home / 'logs'}/<component>.log"
            )
        try:
            health = client.get("/api/v2/monitor/health")
            unhealthy = [name for name, part in health.items() if part.get("status") != "healthy"]
            unhealthy += [w for w in celery.worker_names(settings.celery)
                          if not celery.worker_ready(settings.airflow_home / "logs" / f"{w}.log", w)]
            if not unhealthy:
                client.login()
                return client
            last = f"not yet healthy: {', '.join(unhealthy)}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = f"api-server not answering ({error})"
        time.sleep(1)
    raise AirflowError(f"Airflow did not become healthy in {timeout:.0f}s ({last}); see {settings.airflow_home}/logs")


def wait_for_dags(client: AirflowClient, dag_ids: list[str], timeout: float = 180) -> None:
    """Wait until the dag-processor has parsed each DAG; fail with the import errors if any."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        errors = client.get("/api/v2/importErrors")["import_errors"]
        if errors:
            text = "\n".join(f"{e['filename']}:\n{e['stack_trace']}" for e in errors)
            raise AirflowError(f"DAG files failed to import:\n{text}")
        known = {d["dag_id"] for d in client.get("/api/v2/dags?limit=100")["dags"]}
        if set(dag_ids) <= known:
            return
        time.sleep(1)
    raise AirflowError(f"DAGs {dag_ids} were not parsed within {timeout:.0f}s")


def dag_runs(client: AirflowClient, dag_id: str) -> list[dict[str, Any]]:
    return client.get(f"/api/v2/dags/{dag_id}/dagRuns?limit=100&order_by=-run_after")["dag_runs"]


def wait_for_run(client: AirflowClient, dag_id: str, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(2)
    raise AirflowError(f"{dag_id} run {run_id} did not finish within {timeout:.0f}s")


def wait_for_new_run(
    client: AirflowClient, dag_id: str, known_run_ids: set[str], run_type: str, timeout: float
) -> dict[str, Any]:
    """Wait for a run of `dag_id` that did not exist before, of the given type, to finish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [
            r for r in dag_runs(client, dag_id) if r["dag_run_id"] not in known_run_ids and r["run_type"] == run_type
        ]
        if fresh:
            return wait_for_run(client, dag_id, fresh[0]["dag_run_id"], max(1.0, deadline - time.monotonic()))
        time.sleep(2)
    raise AirflowError(f"No {run_type} run of {dag_id} started within {timeout:.0f}s")


def task_instances(client: AirflowClient, dag_id: str, run_id: str) -> Iterator[dict[str, Any]]:
    # Page through: the api-server caps a page at `[api] maximum_page_limit` (100 by default).
    path = f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
    offset = 0
    while True:
        page = client.get(f"{path}?limit=100&offset={offset}")
        yield from page["task_instances"]
        offset += len(page["task_instances"])
        if not page["task_instances"] or offset >= page["total_entries"]:
            return
