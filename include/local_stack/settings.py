"""Where the local stack keeps its files and which servers it talks to.

Everything lives below `.data/` in the project (git-ignored). The two databases default to the
embedded PostgreSQL; SOURCE_DATABASE_URL and WAREHOUSE_DATABASE_URL point them at servers of
your own instead.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from include.dbt_project import dbt_project_dir
from include.local_stack.celery import CeleryOptions, options_from_environment

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SETTINGS_FILE = PROJECT_ROOT / "airflow_settings.yaml"

SOURCE_CONN_ID = "source_postgres"
WAREHOUSE_CONN_ID = "warehouse_postgres"
_URL_VARIABLES = {SOURCE_CONN_ID: "SOURCE_DATABASE_URL", WAREHOUSE_CONN_ID: "WAREHOUSE_DATABASE_URL"}


class StackError(RuntimeError):
    """Set-up cannot go on; the message names what is wrong and what to do."""


def load_airflow_settings(path: Path = SETTINGS_FILE) -> dict[str, Any]:
    """The `airflow:` section of airflow_settings.yaml, as `astro dev start` reads it."""
    with path.open() as handle:
        document = yaml.safe_load(handle) or {}
    section = document.get("airflow") or {}
    return {
        "connections": [c for c in section.get("connections") or [] if c.get("conn_id")],
        "pools": [p for p in section.get("pools") or [] if p.get("pool_name")],
        "variables": [v for v in section.get("variables") or [] if v.get("variable_name")],
    }


def mask_password(dsn: str) -> str:
    """The DSN as it may appear in a log or a message: any password replaced."""
    params = conninfo_to_dict(dsn)
    if params.get("password"):
        params["password"] = "***"
    return make_conninfo(**params)


@dataclass(frozen=True)
class StackSettings:
    """Ports, folders and database URLs of one local stack (`make run`, or one e2e test)."""

    root: Path = PROJECT_ROOT
    data_dir: Path = PROJECT_ROOT / ".data"
    postgres_port: int = 55432
    api_port: int = 8080
    source_url: str | None = None
    warehouse_url: str | None = None
    demo_securities: int = 10_000
    demo_events: int = 100_000
    demo_seed: int = 42
    # The dbt project the stack runs: dbt/, or the folder DBT_PROJECT_DIR names.
    dbt_project_dir: Path = field(default_factory=dbt_project_dir)
    extra_env: dict[str, str] = field(default_factory=dict)
    # None: the LocalExecutor. AIRFLOW_EXECUTOR=celery: Celery workers (include/local_stack/celery.py).
    celery: CeleryOptions | None = None

    @classmethod
    def from_environment(cls) -> StackSettings:
        return cls(
            postgres_port=int(os.environ.get("LOCAL_POSTGRES_PORT", "55432")),
            api_port=int(os.environ.get("AIRFLOW_API_PORT", "8080")),
            source_url=os.environ.get("SOURCE_DATABASE_URL") or None,
            warehouse_url=os.environ.get("WAREHOUSE_DATABASE_URL") or None,
            demo_securities=int(os.environ.get("DEMO_SECURITIES", "10000")),
            demo_events=int(os.environ.get("DEMO_EVENTS", "100000")),
            celery=options_from_environment(),
            dbt_project_dir=dbt_project_dir(),
        )

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def airflow_home(self) -> Path:
        return self.data_dir / "airflow"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def embedded_dsn(self, database: str) -> str:
        password = quote(self.secret("postgres_password"), safe="")
        return f"postgresql://postgres:{password}@127.0.0.1:{self.postgres_port}/{database}"

    def database_url(self, conn_id: str) -> str:
        """The libpq URL behind an Airflow connection of this stack."""
        override = {SOURCE_CONN_ID: self.source_url, WAREHOUSE_CONN_ID: self.warehouse_url}[conn_id]
        if override:
            return override
        database = next(
            c.get("conn_schema") for c in load_airflow_settings()["connections"] if c["conn_id"] == conn_id
        )
        return self.embedded_dsn(database)

    def uses_embedded(self, conn_id: str) -> bool:
        return not {SOURCE_CONN_ID: self.source_url, WAREHOUSE_CONN_ID: self.warehouse_url}[conn_id]

    def secret(self, name: str) -> str:
        """A random secret made once per stack and kept in its data folder (JWT and Fernet keys)."""
        path = self.airflow_home / f".{name}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            if name == "fernet_key":
                from cryptography.fernet import Fernet

                value = Fernet.generate_key().decode()
            else:
                value = secrets.token_urlsafe(32)
            path.write_text(value)
            path.chmod(0o600)
        return path.read_text().strip()
