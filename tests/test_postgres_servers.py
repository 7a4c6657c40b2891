"""The fixtures themselves: both server versions answer, so no database test can silently skip."""

import psycopg


def test_both_server_versions_are_real(pg18, pg15):
    assert pg18.major_version == 18
    assert pg15.major_version == 15


def test_database_fixture_is_fresh_and_writable(database):
    with psycopg.connect(database) as conn:
        assert conn.execute("select count(*) from pg_tables where schemaname = 'public'").fetchone() == (0,)
        conn.execute("create table t (id int primary key)")
        conn.execute("insert into t values (1), (2)")
        assert conn.execute("select sum(id) from t").fetchone() == (3,)
