"""What the DAGs share: the raw tables' Assets, database DSNs from Airflow connections, and checks.

Nothing here touches a database or the Airflow metadata at import time: DAG files import this
module on every parse.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "include" / "config"
SETTINGS_FILE = PROJECT_ROOT / "airflow_settings.yaml"
ENVIRONMENT_VARIABLE = "PIPELINE_ENVIRONMENT"
# The first retry's delay (doubled for each next one, up to the DAG's max_retry_delay). The e2e
# tests shorten it: they wait for failed tasks' retries, which prove nothing about the delay.
RETRY_DELAY_VARIABLE = "PIPELINE_RETRY_DELAY_S"

logger = logging.getLogger(__name__)


class ConfigFileMissing(FileNotFoundError):
    """The environment named a table configuration that does not exist."""


def tables_config_path(environment: str | None = None) -> Path:
    """include/config/<environment>/tables.yml for a named environment, else include/config/tables.yml.

    The environment comes from PIPELINE_ENVIRONMENT (e.g. `production` on a Deployment), so one
    image serves every environment with its own list of tables.
    """
    if environment is None:
        environment = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if not environment:
        return CONFIG_DIR / "tables.yml"
    path = CONFIG_DIR / environment / "tables.yml"
    if not path.is_file():
        raise ConfigFileMissing(
            f"{ENVIRONMENT_VARIABLE}={environment!r} but {path.relative_to(PROJECT_ROOT)} does not exist; "
            f"create it (the format is in docs/copy_engine.md) or unset {ENVIRONMENT_VARIABLE}")
    return path


TABLES_CONFIG = tables_config_path()

SOURCE_CONN_ID = "source_postgres"
WAREHOUSE_CONN_ID = "warehouse_postgres"
SOURCE_POOL = "source_postgres"


class ConnectionProblem(RuntimeError):
    """A database behind an Airflow connection cannot be used; the message says how to fix it."""


@cache
def warehouse_location() -> tuple[str, int, str]:
    """Host, port and database of the warehouse, for Asset URIs, read without a metadata lookup.

    The environment's connection URI wins (the local runner, Astro Deployment variables);
    otherwise airflow_settings.yaml, which `astro dev start` loads.
    """
    uri = os.environ.get("AIRFLOW_CONN_WAREHOUSE_POSTGRES")
    if uri and "://" in uri:
        parts = urlsplit(uri)
        return parts.hostname or "localhost", parts.port or 5432, parts.path.lstrip("/")
    with SETTINGS_FILE.open() as handle:
        connections = yaml.safe_load(handle)["airflow"]["connections"]
    conn = next(c for c in connections if c["conn_id"] == WAREHOUSE_CONN_ID)
    return conn["conn_host"], int(conn["conn_port"]), conn["conn_schema"]


def retry_delay() -> timedelta:
    """30 s, or PIPELINE_RETRY_DELAY_S seconds."""
    value = os.environ.get(RETRY_DELAY_VARIABLE, "30")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise ValueError(f"{RETRY_DELAY_VARIABLE}={value!r}: give the first retry's delay in seconds (default 30)")
    return timedelta(seconds=seconds)


def task_defaults(owner: str, *, retries: int, max_retry_delay: timedelta) -> dict[str, Any]:
    """The DAGs' shared task policy: retries with exponential backoff, and alerts on failure."""
    from include.alerts import failure_callbacks

    return {
        "owner": owner,
        "retries": retries,
        "retry_delay": retry_delay(),
        "retry_exponential_backoff": True,
        "max_retry_delay": max_retry_delay,
        "on_failure_callback": failure_callbacks(),
    }


def warehouse_table_uri(table: str) -> str:
    """`postgres://host:port/database/schema/table` for a warehouse table `schema.table`.

    The form Cosmos gives the Assets it emits for dbt models, so one function names both the raw
    tables the ingestion emits and the marts a downstream DAG waits for.
    """
    host, port, database = warehouse_location()
    schema, _, name = table.rpartition(".")
    return f"postgres://{host}:{port}/{database}/{schema or 'public'}/{name}"


def warehouse_table_asset(table: str):  # -> airflow.sdk.Asset
    """The Asset of a warehouse table (a raw table, or a mart that Cosmos emits)."""
    from airflow.sdk import Asset

    return Asset(uri=warehouse_table_uri(table))


def describe_asset_events(events_by_key: Mapping[Any, Iterable[Any]]) -> list[str]:
    """One log line per triggering Asset event: which table, what changed, which run made it."""
    lines = []
    for key, events in events_by_key.items():
        for event in events:
            asset = getattr(event, "asset", None)
            uri = getattr(asset, "uri", None) or getattr(key, "uri", None) or getattr(key, "name", str(key))
            lines.append(f"{uri}: {dict(event.extra or {})} (from {event.source_dag_id} run {event.source_run_id})")
    for line in lines:
        logger.info("triggered by %s", line)
    return lines


LIBPQ_EXTRA_KEYS = ("sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "passfile", "options",
                    "connect_timeout", "keepalives_idle", "target_session_attrs", "gssencmode", "channel_binding")


def database_dsn(conn_id: str) -> str:
    """A libpq DSN for an Airflow connection (at task run time only)."""
    from airflow.sdk import BaseHook
    from psycopg.conninfo import make_conninfo

    conn = BaseHook.get_connection(conn_id)
    params = {
        "host": conn.host,
        "port": conn.port,
        "dbname": conn.schema,
        "user": conn.login,
        "password": conn.password,
        "application_name": f"airflow:{conn_id}",
    }
    # The connection's extra carries the libpq settings a server may need (sslmode, client
    # certificates, a passfile, options), as the Postgres provider's hook reads them.
    extra = conn.extra_dejson
    params.update({key: str(extra[key]) for key in LIBPQ_EXTRA_KEYS if extra.get(key) not in (None, "")})
    return make_conninfo(**{k: v for k, v in params.items() if v not in (None, "")})


def check_database(conn_id: str, dsn: str) -> str:
    """Connect once; on failure raise one message naming the connection and how to fix it."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    where = f"{params.get('user', '')}@{params.get('host', '')}:{params.get('port', 5432)}/{params.get('dbname', '')}"
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            version = conn.info.server_version
    except psycopg.OperationalError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ConnectionProblem(
            f"Airflow connection '{conn_id}' ({where}) cannot be reached: {reason}. "
            f"Fix host, port, database or login of '{conn_id}' in airflow_settings.yaml "
            f"(or AIRFLOW_CONN_{conn_id.upper()}), and check that the server is running."
        ) from None
    return f"{conn_id}: {where} (PostgreSQL {version // 10000}.{version % 10000})"


# The settings a DAG file reads from the environment: a DAG built under other values is not reused.
_DAG_SETTINGS_PREFIXES = ("DBT_", "PIPELINE_", "AIRFLOW_CONN_WAREHOUSE_POSTGRES")
_built_dags: dict[tuple[str, str, str], tuple[tuple[Any, ...], Any]] = {}


def _mtime_ns(path: str | Path) -> int | None:
    try:
        return Path(path).stat().st_mtime_ns
    except FileNotFoundError:  # an input not there (yet): building tells what is missing
        return None


def built_once(build: Callable[[], Any], *inputs: str | Path) -> Any:
    """The DAG `build()` returns, built once per process for the same input files and settings.

    A task process parses its DAG file only to find its own task. Forked from a scheduler (or worker)
    that already parsed the DAG files (config/airflow_local_settings.py), it gets that DAG object
    back instead of rendering every Cosmos task again: for a project of N nodes that is one O(N)
    render per scheduler start instead of one per task. The dag-processor's parses of an unchanged
    DAG file are forked the same way. Any change to an input file (the DAG file, the dbt manifest,
    tables.yml) or to a setting builds it anew; an input not there counts as one more state.
    """
    key = (
        *((str(path), _mtime_ns(path)) for path in inputs),
        *sorted((k, v) for k, v in os.environ.items() if k.startswith(_DAG_SETTINGS_PREFIXES)),
    )
    slot = (build.__module__, build.__qualname__, str(inputs[0]) if inputs else "")
    built = _built_dags.get(slot)
    if built is None or built[0] != key:
        built = _built_dags[slot] = (key, build())
    return built[1]

