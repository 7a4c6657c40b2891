"""Fixtures shared by every test: real PostgreSQL servers, never stand-ins.

`pg18` is an embedded PostgreSQL 18 started for the session; `pg15` is the PostgreSQL 15 server
this machine runs on 127.0.0.1:5432 (override with PG15_DSN). `postgres_server` runs a test once on
each. Database tests never skip: a server that cannot be reached fails the test with the reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from include.local_stack.postgres import EmbeddedPostgres, create_database, free_port

PG15_DSN = os.environ.get("PG15_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class PostgresServer:
    """A running server that tests may create databases on."""

    name: str
    admin_dsn: str

    @property
    def major_version(self) -> int:
        with psycopg.connect(self.admin_dsn) as conn:
            return int(conn.info.server_version // 10000)

    def new_database(self, prefix: str = "test") -> str:
        """A fresh, empty database with a unique name; returns its DSN."""
        return create_database(self.admin_dsn, f"{prefix}_{uuid.uuid4().hex[:10]}")

    def drop_database(self, dsn: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def server_dirs() -> Iterator[Callable[[str], Path]]:
    """Folders for embedded servers, outside pytest's tmp tree.

    Every new pytest session chmods its `pytest-of-<user>` folder back to 0700, which would lock
    the servers' service user out of a data directory below it while another session runs.
    """
    made: list[Path] = []

    def make(prefix: str) -> Path:
        made.append(Path(tempfile.mkdtemp(prefix=f"{prefix}-")))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg18(server_dirs: Callable[[str], Path]) -> Iterator[PostgresServer]:
    server = EmbeddedPostgres(server_dirs("pg18") / "data", free_port(), throwaway=True)
    server.start()
    try:
        yield PostgresServer("pg18", server.dsn())
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg15() -> PostgresServer:
    try:
        with psycopg.connect(PG15_DSN, connect_timeout=5) as conn:
            version = conn.info.server_version
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL 15 at {PG15_DSN} is unreachable ({error}); start it or set PG15_DSN.")
    assert version // 10000 == 15, f"{PG15_DSN} runs PostgreSQL {version}, expected 15"
    return PostgresServer("pg15", PG15_DSN)


@pytest.fixture(params=["pg18", "pg15"], scope="session")
def postgres_server(request: pytest.FixtureRequest) -> PostgresServer:
    """Each test that uses this runs once on PostgreSQL 18 and once on PostgreSQL 15."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def database(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database on each server version, dropped after the test."""
    dsn = postgres_server.new_database()
    yield dsn
    postgres_server.drop_database(dsn)
