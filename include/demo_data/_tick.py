"""One realistic batch of changes at the source, as a day of a corporate-action feed brings."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from include.demo_data._errors import DemoDataError
from include.demo_data._exchanges import tick_exchanges
from include.demo_data._functions import install_helpers
from include.demo_data._generate import EVENTS_SELECT, event_params, name_params

logger = logging.getLogger(__name__)

_STATE = """
select
    (select count(*) from {stock_master}) as securities,
    (select coalesce(max(security_id), 0) from {stock_master}) as max_security_id,
    (select count(*) from {edi_690}) as events,
    (select coalesce(max(event_id), 0) from {edi_690}) as max_event_id,
    greatest(
        (select max(updated_at) from {stock_master}),
        (select max(changed_at) from {edi_690})
    ) as latest_change_at
"""

# Securities are ranked once by a digest of the tick seed: the first `renamed` get new names, the
# next `ticker_changed` new tickers, so one tick never counts a security twice.
_RANKED_SECURITIES = """
ranked as (
    select
        security_id,
        row_number() over (order by md5(%(seed)s || ':tick-security:' || security_id)) as rank,
        md5(%(seed)s || ':tick-security-change:' || security_id) as digest
    from {stock_master}
)
"""

_RENAME = """
with {ranked},

renamed as (
    select
        ranked.security_id,
        (%(prefixes_en)s::text[])[1 + floor(pg_temp.demo_uniform(ranked.digest, 0)
            * cardinality(%(prefixes_en)s::text[]))::integer]
        || ' ' || (%(suffixes_en)s::text[])[1 + floor(pg_temp.demo_uniform(ranked.digest, 1)
            * cardinality(%(suffixes_en)s::text[]))::integer] as base_en,
        (%(prefixes_ko)s::text[])[1 + floor(pg_temp.demo_uniform(ranked.digest, 0)
            * cardinality(%(prefixes_ko)s::text[]))::integer]
        || (%(suffixes_ko)s::text[])[1 + floor(pg_temp.demo_uniform(ranked.digest, 1)
            * cardinality(%(suffixes_ko)s::text[]))::integer] as base_ko
    from ranked
    where ranked.rank <= %(renamed)s
),

named as (
    select
        renamed.security_id,
        renamed.base_en || case securities.security_type
            when 'PRF' then ' Pref' when 'ETF' then ' ETF' else '' end as new_en,
        renamed.base_ko || case securities.security_type
            when 'PRF' then '우' when 'ETF' then ' ETF' else '' end as new_ko
    from renamed
    inner join {stock_master} as securities on renamed.security_id = securities.security_id
)

update {stock_master} as securities
set
    name_en = case when named.new_en = securities.name_en then named.new_en || ' Holdings' else named.new_en end,
    name_ko = case when named.new_ko = securities.name_ko then named.new_ko || ' 홀딩스' else named.new_ko end,
    updated_at = %(tick_at)s
from named
where securities.security_id = named.security_id
returning securities.security_id
"""

_CHANGE_TICKER = """
with {ranked},

changed as (
    select
        ranked.security_id,
        pg_temp.demo_uniform(ranked.digest, 2) as u_ticker
    from ranked
    where ranked.rank > %(renamed)s and ranked.rank <= %(renamed)s + %(ticker_changed)s
),

coded as (
    select
        changed.security_id,
        case
            when securities.exchange_mic in ('XKRX', 'XKOS')
                then lpad((10000 + floor(changed.u_ticker * 90000))::text, 5, '0') || right(securities.ticker, 1)
            when securities.exchange_mic = 'XTKS' then (1000 + floor(changed.u_ticker * 9000))::text
            when securities.exchange_mic = 'XHKG' then lpad(floor(changed.u_ticker * 10000)::text, 4, '0')
            else pg_temp.demo_letters(floor(changed.u_ticker * 456976)::bigint)
        end as new_ticker
    from changed
    inner join {stock_master} as securities on changed.security_id = securities.security_id
)

update {stock_master} as securities
set
    ticker = case when coded.new_ticker = securities.ticker then coded.new_ticker || 'X' else coded.new_ticker end,
    updated_at = %(tick_at)s
from coded
where securities.security_id = coded.security_id
returning securities.security_id
"""

_DELIST = """
with {ranked},

candidates as (
    select ranked.security_id
    from ranked
    inner join {stock_master} as securities on ranked.security_id = securities.security_id
    where ranked.rank > %(renamed)s + %(ticker_changed)s and securities.status = 'active'
    order by ranked.rank
    limit %(delisted)s
)

update {stock_master} as securities
set status = 'inactive', updated_at = %(tick_at)s
from candidates
where securities.security_id = candidates.security_id
returning securities.security_id
"""

# Live events (flag I or U) ranked by a digest of the tick seed: amended first, then deleted,
# then cancelled.
_CHANGE_EVENTS = """
with ranked as (
    select
        event_id,
        row_number() over (order by md5(%(seed)s || ':tick-event:' || event_id)) as rank,
        pg_temp.demo_uniform(md5(%(seed)s || ':tick-event-change:' || event_id), 0) as u_shift
    from {edi_690}
    where action_flag in ('I', 'U')
),

changes as (
    select
        event_id,
        u_shift,
        case
            when rank <= %(amended)s then 'U'
            when rank <= %(amended)s + %(deleted)s then 'D'
            else 'C'
        end as new_flag
    from ranked
    where rank <= %(amended)s + %(deleted)s + %(cancelled)s
)

update {edi_690} as events
set
    action_flag = changes.new_flag,
    ex_date = case when changes.new_flag = 'U' then events.ex_date + 1 + floor(changes.u_shift * 5)::integer
        else events.ex_date end,
    record_date = case when changes.new_flag = 'U' then events.record_date + 1 + floor(changes.u_shift * 5)::integer
        else events.record_date end,
    pay_date = case when changes.new_flag = 'U' then events.pay_date + 1 + floor(changes.u_shift * 5)::integer
        else events.pay_date end,
    gross_amount = case when changes.new_flag = 'U' then round(events.gross_amount * 1.1, 2)
        else events.gross_amount end,
    changed_at = %(tick_at)s
from changes
where events.event_id = changes.event_id
returning changes.new_flag
"""


def tick(
    dsn: str,
    *,
    seed: int,
    schema: str = "public",
    now: datetime | None = None,
) -> dict[str, int]:
    """Apply one batch of source changes to the tables `generate` made; return counts per kind.

    Every changed row gets the same change timestamp: `now` if given (but always after the latest
    existing change), else one day after the latest change, so the result depends only on the
    seed and the current table contents.
    """
    stock_master = sql.Identifier(schema, "stock_master")
    edi_690 = sql.Identifier(schema, "edi_690")
    exchanges = sql.Identifier(schema, "exchanges")
    tables = {"stock_master": stock_master, "edi_690": edi_690}
    with psycopg.connect(dsn) as conn:
        install_helpers(conn)
        try:
            state = conn.execute(sql.SQL(_STATE).format(**tables)).fetchone()
        except psycopg.errors.UndefinedTable as error:
            raise DemoDataError(f"no demo tables in schema {schema}: run generate first") from error
        assert state is not None
        securities, max_security_id, events, max_event_id, latest_change_at = state
        if not securities:
            raise DemoDataError(f"{schema}.stock_master is empty: run generate first")
        if now is None:
            tick_at = latest_change_at + timedelta(days=1)
        else:
            tick_at = max(now, latest_change_at + timedelta(seconds=1))
        params: dict[str, Any] = {
            "seed": str(seed),
            "tick_at": tick_at,
            "renamed": max(2, securities // 500),
            "ticker_changed": max(2, securities // 1000),
            "delisted": max(2, securities // 1000),
            "amended": max(5, events // 500),
            "deleted": max(3, events // 1000),
            "cancelled": max(3, events // 1000),
            **name_params(),
        }
        ranked = sql.SQL(_RANKED_SECURITIES).format(**tables)
        renamed_ids = [
            row[0] for row in conn.execute(sql.SQL(_RENAME).format(ranked=ranked, **tables), params).fetchall()
        ]
        ticker_ids = [
            row[0] for row in conn.execute(sql.SQL(_CHANGE_TICKER).format(ranked=ranked, **tables), params).fetchall()
        ]
        delisted = len(conn.execute(sql.SQL(_DELIST).format(ranked=ranked, **tables), params).fetchall())
        flags = [row[0] for row in conn.execute(sql.SQL(_CHANGE_EVENTS).format(**tables), params).fetchall()]
        # New events: announced in the last three days, so their ex dates lie after the tick, and
        # a third of them on securities that changed in this tick, whose new version they must get.
        batch = max(10, events // 200)
        insert_events = sql.SQL("insert into {table} ").format(table=edi_690) + sql.SQL(EVENTS_SELECT).format(
            created_at=sql.SQL("%(tick_at)s::timestamptz"),
            changed_at=sql.SQL("%(tick_at)s::timestamptz"),
            securities_table=stock_master,
        )
        inserted = conn.execute(
            insert_events,
            {
                **event_params(seed, "tick-event", max_security_id),
                "security_pool": renamed_ids + ticker_ids,
                "pool_share": 0.3,
                "share_inserted": 1.0,
                "first_announcement": tick_at.date() - timedelta(days=3),
                "announcement_days": 3,
                "first_event_id": max_event_id + 1,
                "last_event_id": max_event_id + batch,
                "tick_at": tick_at,
            },
        )
        # Fewer than the batch only if the source lost securities (ids drawn for them are skipped).
        new_events = inserted.rowcount
        try:
            venues = tick_exchanges(conn, exchanges, stock_master, seed=seed, tick_at=tick_at)
        except psycopg.errors.UndefinedTable as error:
            raise DemoDataError(f"no table {schema}.exchanges (a demo source made before it existed): "
                                "run generate again") from error
    changes = {
        "new_events": new_events,
        "amended_events": flags.count("U"),
        "deleted_events": flags.count("D"),
        "cancelled_events": flags.count("C"),
        "renamed_securities": len(renamed_ids),
        "ticker_changes": len(ticker_ids),
        "delisted_securities": delisted,
        **venues,
    }
    logger.info("tick at %s in schema %s: %s", tick_at.isoformat(), schema, changes)
    return changes
