"""What `make run` checks before it starts anything, and whether a running Airflow is still current.

Each problem is one line naming the setting and what to do: a port another program holds, a table
configuration that cannot be read, a DAG file that would not import, a warehouse dbt cannot reach.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from include.local_stack.settings import StackError, StackSettings

logger = logging.getLogger(__name__)

# Settings whose change needs the running Airflow restarted: its own configuration and connections,
# and what the project reads from the environment at import time.
_FINGERPRINTED_PREFIXES = ("AIRFLOW__", "AIRFLOW_CONN_", "DBT_", "PIPELINE_", "PYTHONPATH")
_FINGERPRINT_FILE = "started_with.json"


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_ports(settings: StackSettings, *, airflow_running: bool, postgres_running: bool) -> None:
    """The ports this stack listens on are free, or held by this stack's own servers."""
    wanted = [
        (settings.api_port, "AIRFLOW_API_PORT", "the Airflow api-server", airflow_running),
        (settings.postgres_port, "LOCAL_POSTGRES_PORT", "the embedded PostgreSQL", postgres_running),
    ]
    for port, variable, purpose, ours in wanted:
        if not ours and not port_is_free(port):
            raise StackError(
                f"Port {port} ({variable}, for {purpose}) is already in use by another program: stop it, or "
                f"choose a free port, e.g. `{variable}={_suggest_port(port)} make run` (and the same for `make stop`)."
            )


def _suggest_port(port: int) -> int:
    for candidate in range(port + 1, port + 100):
        if port_is_free(candidate):
            return candidate
    return port + 100


def check_tables_config() -> int:
    """The table configuration (and its `schedule:`) can be read; returns how many tables it lists.

    Read afresh (not the path the modules computed when first imported): PIPELINE_ENVIRONMENT may have changed.
    """
    from include.copy_engine import ConfigError, load_config

    try:
        from include.ingestion import pipeline_schedule
        from include.pipeline import tables_config_path

        path = tables_config_path()
        tables = load_config(path).tables
        pipeline_schedule(path)
    except (FileNotFoundError, ValueError, ConfigError) as error:  # ConfigFileMissing, ScheduleError, a bad table
        raise StackError(f"Configuration: {error}") from None
    return len(tables)


def check_dag_files(env: Mapping[str, str], dags_folder: Path) -> None:
    """Import every DAG file as the dag-processor will, before Airflow starts: one line per distinct error."""
    script = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "bag = DagBag(dag_folder=sys.argv[1])\n"
        "print('DAGBAG ' + json.dumps(bag.import_errors))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(dags_folder)], env=dict(env), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("DAGBAG ")]
    if result.returncode != 0 or not lines:
        raise StackError(f"The DAG files could not be checked:\n{result.stderr[-3000:]}")
    errors: dict[str, str] = json.loads(lines[-1].removeprefix("DAGBAG "))
    if errors:
        reasons: dict[str, list[str]] = {}
        for path, trace in sorted(errors.items()):
            reasons.setdefault(last_line(trace), []).append(Path(path).name)
        raise StackError("A DAG file does not import, so Airflow was not started:\n" + "\n".join(
            f"  {', '.join(files)}: {reason}" for reason, files in reasons.items()))


def last_line(trace: str) -> str:
    """`ErrorClass: message` of a traceback (its last non-empty line)."""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    return lines[-1] if lines else trace


def run_together(*checks: Callable[[], None]) -> None:
    """Run slow checks (each mostly a subprocess) at the same time; raise the first failure."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        futures = [pool.submit(check) for check in checks]
    for future in futures:
        future.result()


# --- is the running Airflow still current? -----------------------------------------------------


def fingerprint(env: Mapping[str, str], root: Path) -> dict[str, str]:
    """A digest per setting the running Airflow depends on, and of the Python code it imports."""
    digests = {key: _digest(value.encode()) for key, value in env.items() if key.startswith(_FINGERPRINTED_PREFIXES)}
    for folder in ("include", "plugins", "config"):
        # The local stack's own code runs in `make run`, never inside Airflow.
        files = sorted(p for p in (root / folder).rglob("*.py")
                       if "__pycache__" not in p.parts and "local_stack" not in p.parts)  # fmt: skip
        digests[f"{folder}/ (Python code)"] = _digest(b"".join(p.read_bytes() for p in files))
    return digests


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def record_fingerprint(run_dir: Path, digests: Mapping[str, str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / _FINGERPRINT_FILE).write_text(json.dumps(dict(digests), sort_keys=True))


def started_with(run_dir: Path, env: Mapping[str, str], key: str) -> bool:
    """Whether the running Airflow was started with this value of `key` (e.g. its api-server port)."""
    path = run_dir / _FINGERPRINT_FILE
    return path.exists() and json.loads(path.read_text()).get(key) == _digest(env.get(key, "").encode())


def changed_since_start(run_dir: Path, digests: Mapping[str, str]) -> list[str]:
    """What changed since the running Airflow was started (everything, when that is not known)."""
    path = run_dir / _FINGERPRINT_FILE
    if not path.exists():
        return ["its settings (not recorded when it started)"]
    before = json.loads(path.read_text())
    return sorted(key for key in set(before) | set(digests) if before.get(key) != digests.get(key))
