"""Create and fill the source tables."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from include.demo_data._errors import DemoDataError
from include.demo_data._exchanges import create_exchanges
from include.demo_data._functions import install_helpers
from include.demo_data._vocabulary import NAME_PREFIXES, NAME_SUFFIXES

logger = logging.getLogger(__name__)

# Creation and update timestamps fall in the two years before this instant. A fixed default keeps
# the data byte-for-byte deterministic; pass `now` to anchor it to the wall clock instead.
DEFAULT_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

_CREATE_STOCK_MASTER = """
create table {table} (
    security_id bigint primary key,
    isin char(12) not null,
    ticker text not null,
    name_en text not null,
    name_ko text not null,
    exchange_mic char(4) not null,
    currency char(3) not null,
    security_type text not null,
    status text not null,
    listing_date date not null,
    created_at timestamptz not null,
    updated_at timestamptz not null
)
"""

_CREATE_EDI_690 = """
create table {table} (
    event_id bigint primary key,
    event_code text not null,
    security_id bigint not null,
    action_flag char(1) not null,
    announcement_date date not null,
    ex_date date not null,
    record_date date not null,
    pay_date date,
    ratio_old numeric(18, 6),
    ratio_new numeric(18, 6),
    gross_amount numeric(18, 6),
    currency char(3),
    created_at timestamptz not null,
    changed_at timestamptz not null
)
"""

# Exchanges: KOSPI 40 %, KOSDAQ 30 %, NYSE 10 %, Nasdaq 10 %, Tokyo 5 %, Hong Kong 5 %.
_INSERT_STOCK_MASTER = """
insert into {table}
-- Materialized CTEs: inlined, every use of a number would compute its digest again.
with drawn as materialized (
    select
        ids.id as security_id,
        md5(%(seed)s || ':security:' || ids.id) as digest_a,
        md5(%(seed)s || ':security-b:' || ids.id) as digest_b
    from generate_series(1::bigint, %(securities)s::bigint) as ids (id)
),

numbers as materialized (
    select
        security_id,
        pg_temp.demo_uniform(digest_a, 0) as u_exchange,
        pg_temp.demo_uniform(digest_a, 1) as u_type,
        pg_temp.demo_uniform(digest_a, 2) as u_prefix,
        pg_temp.demo_uniform(digest_a, 3) as u_suffix,
        pg_temp.demo_uniform(digest_b, 0) as u_status,
        pg_temp.demo_uniform(digest_b, 1) as u_listing,
        pg_temp.demo_uniform(digest_b, 2) as u_created,
        pg_temp.demo_uniform(digest_b, 3) as u_updated
    from drawn
),

classified as (
    select
        numbers.*,
        case
            when u_exchange < 0.40 then 'XKRX'
            when u_exchange < 0.70 then 'XKOS'
            when u_exchange < 0.80 then 'XNYS'
            when u_exchange < 0.90 then 'XNAS'
            when u_exchange < 0.95 then 'XTKS'
            else 'XHKG'
        end as exchange_mic,
        case
            when u_type < 0.80 then 'EQS'
            when u_type < 0.88 then 'PRF'
            when u_type < 0.96 then 'ETF'
            else 'REIT'
        end as security_type,
        1 + floor(u_prefix * cardinality(%(prefixes_ko)s::text[]))::integer as prefix_index,
        1 + floor(u_suffix * cardinality(%(suffixes_ko)s::text[]))::integer as suffix_index
    from numbers
),

coded as (
    select
        classified.*,
        case exchange_mic
            when 'XKRX' then 'KR' when 'XKOS' then 'KR' when 'XTKS' then 'JP'
            when 'XHKG' then 'HK' else 'US'
        end as country_code,
        case exchange_mic
            when 'XKRX' then 'KRW' when 'XKOS' then 'KRW' when 'XTKS' then 'JPY'
            when 'XHKG' then 'HKD' else 'USD'
        end as currency,
        case
            when exchange_mic in ('XKRX', 'XKOS')
                then lpad(((security_id * 7919) %% 90000 + 10000)::text, 5, '0')
                    || case when security_type = 'PRF' then '5' else '0' end
            when exchange_mic = 'XTKS' then (1000 + (security_id * 7919) %% 9000)::text
            when exchange_mic = 'XHKG' then lpad(((security_id * 7919) %% 10000)::text, 4, '0')
            else pg_temp.demo_letters((security_id * 7919) %% 456976)
        end as ticker
    from classified
),

bodies as (
    select
        coded.*,
        country_code
        || case country_code when 'KR' then '7' when 'JP' then '3' else '0' end
        || lpad(security_id::text, 8, '0') as isin_body
    from coded
)

select
    security_id,
    isin_body || pg_temp.demo_isin_check_digit(isin_body)::text as isin,
    ticker,
    (%(prefixes_en)s::text[])[prefix_index] || ' ' || (%(suffixes_en)s::text[])[suffix_index]
    || case security_type when 'PRF' then ' Pref' when 'ETF' then ' ETF' else '' end as name_en,
    (%(prefixes_ko)s::text[])[prefix_index] || (%(suffixes_ko)s::text[])[suffix_index]
    || case security_type when 'PRF' then '우' when 'ETF' then ' ETF' else '' end as name_ko,
    exchange_mic,
    currency,
    security_type,
    case when u_status < 0.96 then 'active' else 'inactive' end as status,
    date '1990-01-01' + floor(u_listing * 12784)::integer as listing_date,
    date_trunc('second', %(epoch)s::timestamptz - interval '730 days' + u_created * interval '365 days')
        as created_at,
    date_trunc(
        'second',
        %(epoch)s::timestamptz - interval '730 days' + u_created * interval '365 days'
        + u_updated * interval '360 days'
    ) as updated_at
from bodies
"""

# Event mix: dividends 55 %, splits 8 %, consolidations 5 %, bonus issues 8 %, rights issues 7 %,
# mergers 5 %, demergers 4 %, capital reductions 8 %. Flags: I 88 %, U 6 %, D 3 %, C 3 %.
EVENTS_SELECT = """
-- Materialized CTEs: inlined, every use of a number would compute its digest again.
with drawn as materialized (
    select
        ids.id as event_id,
        md5(%(seed)s || ':' || %(salt)s || ':' || ids.id) as digest_a,
        md5(%(seed)s || ':' || %(salt)s || '-b:' || ids.id) as digest_b,
        md5(%(seed)s || ':' || %(salt)s || '-c:' || ids.id) as digest_c
    from generate_series(%(first_event_id)s::bigint, %(last_event_id)s::bigint) as ids (id)
),

numbers as materialized (
    select
        event_id,
        pg_temp.demo_uniform(digest_a, 0) as u_security,
        pg_temp.demo_uniform(digest_a, 1) as u_code,
        pg_temp.demo_uniform(digest_a, 2) as u_flag,
        pg_temp.demo_uniform(digest_a, 3) as u_announcement,
        pg_temp.demo_uniform(digest_b, 0) as u_ex,
        pg_temp.demo_uniform(digest_b, 1) as u_pay,
        pg_temp.demo_uniform(digest_b, 2) as u_ratio,
        pg_temp.demo_uniform(digest_b, 3) as u_amount,
        pg_temp.demo_uniform(digest_c, 0) as u_created,
        pg_temp.demo_uniform(digest_c, 1) as u_changed,
        pg_temp.demo_uniform(digest_c, 2) as u_pick
    from drawn
),

classified as (
    select
        numbers.*,
        case
            -- Each pooled security gets at least one event, then a share of the rest.
            when event_id - %(first_event_id)s < cardinality(%(security_pool)s::bigint[])
                then (%(security_pool)s::bigint[])[event_id - %(first_event_id)s + 1]
            when cardinality(%(security_pool)s::bigint[]) > 0 and u_pick < %(pool_share)s
                then (%(security_pool)s::bigint[])[
                    1 + floor(u_security * cardinality(%(security_pool)s::bigint[]))::integer
                ]
            else 1 + floor(u_security * %(securities)s)::bigint
        end as security_id,
        case
            when u_code < 0.55 then 'DIV'
            when u_code < 0.63 then 'SD'
            when u_code < 0.68 then 'CONSD'
            when u_code < 0.76 then 'BON'
            when u_code < 0.83 then 'RTS'
            when u_code < 0.88 then 'MRGR'
            when u_code < 0.92 then 'DMRGR'
            else 'CAPRD'
        end as event_code,
        case
            when u_flag < %(share_inserted)s then 'I'
            when u_flag < %(share_inserted)s + (1 - %(share_inserted)s) / 2 then 'U'
            when u_flag < %(share_inserted)s + (1 - %(share_inserted)s) * 3 / 4 then 'D'
            else 'C'
        end as action_flag,
        %(first_announcement)s::date + floor(u_announcement * %(announcement_days)s)::integer
            as announcement_date
    from numbers
),

dated as (
    select
        classified.*,
        announcement_date + 7 + floor(u_ex * 35)::integer as ex_date
    from classified
)

select
    dated.event_id,
    dated.event_code,
    dated.security_id,
    dated.action_flag,
    dated.announcement_date,
    dated.ex_date,
    dated.ex_date + 1 as record_date,
    case
        when dated.event_code = 'DIV' then dated.ex_date + 15 + floor(dated.u_pay * 45)::integer
        when dated.event_code in ('SD', 'CONSD', 'BON', 'RTS') then dated.ex_date + 21
    end as pay_date,
    case dated.event_code
        when 'SD' then 1
        when 'CONSD' then (array[2, 5, 10, 20])[1 + floor(dated.u_ratio * 4)::integer]
        when 'BON' then 10
        when 'RTS' then 10
        when 'MRGR' then 1
        when 'DMRGR' then 1
        when 'CAPRD' then (array[2, 4, 5, 10])[1 + floor(dated.u_ratio * 4)::integer]
    end::numeric(18, 6) as ratio_old,
    case dated.event_code
        when 'SD' then (array[2, 3, 4, 5, 10])[1 + floor(dated.u_ratio * 5)::integer]
        when 'CONSD' then 1
        when 'BON' then 11 + floor(dated.u_ratio * 5)::integer
        when 'RTS' then 1 + floor(dated.u_ratio * 5)::integer
        when 'MRGR' then round((0.2 + dated.u_ratio * 2)::numeric, 6)
        when 'DMRGR' then round((0.1 + dated.u_ratio * 0.9)::numeric, 6)
        when 'CAPRD' then 1
    end::numeric(18, 6) as ratio_new,
    case
        when dated.event_code <> 'DIV' then null
        when securities.currency = 'KRW' then 50 + floor(dated.u_amount * 100) * 50
        when securities.currency = 'JPY' then 5 + floor(dated.u_amount * 100)
        else round((0.05 + dated.u_amount * 2.95)::numeric, 2)
    end::numeric(18, 6) as gross_amount,
    case when dated.event_code = 'DIV' then securities.currency end as currency,
    {created_at} as created_at,
    {changed_at} as changed_at
from dated
inner join {securities_table} as securities
    on dated.security_id = securities.security_id
"""

_GENERATED_CREATED_AT = (
    "date_trunc('second', %(epoch)s::timestamptz - interval '365 days' + dated.u_created * interval '300 days')"
)
_GENERATED_CHANGED_AT = (
    "date_trunc('second', %(epoch)s::timestamptz - interval '365 days' + dated.u_created * interval '300 days'"
    " + case when dated.action_flag = 'I' then interval '0' else dated.u_changed * interval '60 days' end)"
)


def event_params(seed: int, salt: str, securities: int) -> dict[str, Any]:
    return {
        "seed": str(seed),
        "salt": salt,
        "securities": securities,
        "security_pool": [],
        "pool_share": 0.0,
        "share_inserted": 0.88,
        "first_announcement": "2016-01-01",
        "announcement_days": 3650,
    }


def name_params() -> dict[str, Any]:
    return {
        "prefixes_ko": [ko for ko, _ in NAME_PREFIXES],
        "prefixes_en": [en for _, en in NAME_PREFIXES],
        "suffixes_ko": [ko for ko, _ in NAME_SUFFIXES],
        "suffixes_en": [en for _, en in NAME_SUFFIXES],
    }


def generate(
    dsn: str,
    *,
    securities: int = 10_000,
    events: int = 100_000,
    seed: int = 42,
    schema: str = "public",
    now: datetime | None = None,
) -> dict[str, int]:
    """Create or replace `stock_master`, `edi_690` and `exchanges` in `schema`; return the row counts.

    The same arguments give the same rows. Timestamps lie in the two years before `now`
    (default `DEFAULT_EPOCH`).
    """
    if securities < 1 or events < 0:
        raise DemoDataError(f"need at least one security and no negative events, got {securities}/{events}")
    epoch = now or DEFAULT_EPOCH
    stock_master = sql.Identifier(schema, "stock_master")
    edi_690 = sql.Identifier(schema, "edi_690")
    exchanges = sql.Identifier(schema, "exchanges")
    with psycopg.connect(dsn) as conn:
        install_helpers(conn)
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("drop table if exists {}, {}, {}").format(edi_690, stock_master, exchanges))
        venues = create_exchanges(conn, exchanges)
        conn.execute(sql.SQL(_CREATE_STOCK_MASTER).format(table=stock_master))
        conn.execute(sql.SQL(_CREATE_EDI_690).format(table=edi_690))
        conn.execute(
            sql.SQL(_INSERT_STOCK_MASTER).format(table=stock_master),
            {"seed": str(seed), "securities": securities, "epoch": epoch, **name_params()},
        )
        insert_events = sql.SQL("insert into {table} ").format(table=edi_690) + sql.SQL(EVENTS_SELECT).format(
            created_at=sql.SQL(_GENERATED_CREATED_AT),
            changed_at=sql.SQL(_GENERATED_CHANGED_AT),
            securities_table=stock_master,
        )
        if events:
            conn.execute(
                insert_events,
                {
                    **event_params(seed, "event", securities),
                    "first_event_id": 1,
                    "last_event_id": events,
                    "epoch": epoch,
                },
            )
        for table in (stock_master, edi_690, exchanges):
            conn.execute(sql.SQL("analyze {}").format(table))
    logger.info("generated %s securities and %s events in schema %s", securities, events, schema)
    return {"stock_master": securities, "edi_690": events, "exchanges": venues}
