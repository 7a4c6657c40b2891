"""The trading venues: small reference data with no change timestamp, synced by change data capture.

Nothing in a row says when it changed, so a cursor cannot find its updates and only a full copy or
the source's own change stream (`mode: cdc`) can. `tick` lists a venue or two, moves the closing
time of two and removes one that no security lists on.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from include.demo_data._vocabulary import EXCHANGES, INITIAL_EXCHANGES

_CREATE = """
create table {table} (
    mic char(4) primary key,
    exchange_name text not null,
    country_code char(2) not null,
    city text not null,
    time_zone text not null,
    currency char(3) not null,
    opens_at time not null,
    closes_at time not null
)
"""
_INSERT = "insert into {table} values (%s, %s, %s, %s, %s, %s, %s, %s)"


def create_exchanges(conn: psycopg.Connection[Any], table: sql.Composable) -> int:
    """Create `table` with the first venues; return how many."""
    conn.execute(sql.SQL(_CREATE).format(table=table))
    with conn.cursor() as cursor:
        cursor.executemany(sql.SQL(_INSERT).format(table=table), EXCHANGES[:INITIAL_EXCHANGES])
    return INITIAL_EXCHANGES


def tick_exchanges(conn: psycopg.Connection[Any], table: sql.Composable, stock_master: sql.Composable, *,
                   seed: int, tick_at: datetime) -> dict[str, int]:
    """Remove one venue no security lists on, move two closing times, list up to two new venues."""
    def rank(mic: str) -> str:
        # Seeded by the tick's instant too, so that each tick picks other venues.
        return hashlib.md5(f"{seed}:tick-exchange:{tick_at.isoformat()}:{mic}".encode()).hexdigest()

    present = sorted((row[0] for row in conn.execute(sql.SQL("select mic from {}").format(table))), key=rank)
    listed = {row[0] for row in conn.execute(sql.SQL("select distinct exchange_mic from {}").format(stock_master))}
    removed = [mic for mic in present if mic not in listed][:1]
    changed = [mic for mic in present if mic not in removed][:2]
    new = sorted((venue for venue in EXCHANGES if venue[0] not in present), key=lambda venue: rank(venue[0]))[:2]
    conn.execute(sql.SQL("delete from {} where mic = any(%s)").format(table), (removed,))
    conn.execute(sql.SQL("update {} set closes_at = closes_at + interval '30 minutes' where mic = any(%s)")
                 .format(table), (changed,))
    with conn.cursor() as cursor:
        cursor.executemany(sql.SQL(_INSERT).format(table=table), new)
    return {"new_exchanges": len(new), "changed_exchanges": len(changed), "removed_exchanges": len(removed)}


def ensure_exchanges(dsn: str, *, schema: str = "public") -> bool:
    """Create the venues in a demo source made before they existed; True when it created them."""
    table = sql.Identifier(schema, "exchanges")
    with psycopg.connect(dsn) as conn:
        if conn.execute("select to_regclass(%s) is not null", (f"{schema}.exchanges",)).fetchone()[0]:  # type: ignore[index]
            return False
        create_exchanges(conn, table)
    return True
