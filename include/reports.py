"""What the example consumer DAG reads from the marts."""

from __future__ import annotations

import psycopg


def live_events_by_type(warehouse_dsn: str) -> dict[str, int]:
    """Live corporate-action events per event type, from `marts.fact_events`."""
    with psycopg.connect(warehouse_dsn) as conn:
        rows = conn.execute(
            "select event_type, count(*) from marts.fact_events group by event_type order by event_type"
        ).fetchall()
    return {event_type: int(count) for event_type, count in rows}
