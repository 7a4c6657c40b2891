"""Source and target databases on the same server, once per server version."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from tests.conftest import PostgresServer


@dataclass(frozen=True)
class Pair:
    server: PostgresServer
    source: str
    target: str

    def run(self, dsn: str, statement: str, params: tuple[object, ...] | None = None) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement, params)

    def rows(self, dsn: str, query: str) -> list[tuple[object, ...]]:
        with psycopg.connect(dsn) as conn:
            return conn.execute(query).fetchall()

    def scalar(self, dsn: str, query: str) -> object:
        return self.rows(dsn, query)[0][0]


@pytest.fixture
def pair(postgres_server: PostgresServer) -> Iterator[Pair]:
    source = postgres_server.new_database("src")
    target = postgres_server.new_database("dst")
    yield Pair(postgres_server, source, target)
    postgres_server.drop_database(source)
    postgres_server.drop_database(target)
