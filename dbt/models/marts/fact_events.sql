with

events as (

    select * from {{ ref('stg_edi_690') }}

),

securities as (

    select * from {{ ref('dim_securities') }}

),

live_events as (

    select
        events.*,
        -- The version of the security in force when the ex date began (UTC).
        events.ex_date::timestamp at time zone 'UTC' as ex_at
    from events
    where events.is_live

),

final as (

    select
        -- ids
        live_events.event_id,
        live_events.security_id,
        securities.security_version_id,

        -- strings
        live_events.event_code,
        live_events.event_type,
        live_events.action_flag,
        securities.isin,
        securities.ticker,
        securities.security_name_en,
        securities.security_name_ko,
        securities.exchange_mic,
        live_events.currency_code,

        -- numerics
        live_events.ratio_old,
        live_events.ratio_new,
        live_events.gross_amount,
        -- Factor that makes prices before the ex date comparable with prices after it.
        case
            when
                live_events.event_type in ('split', 'consolidation', 'bonus_issue', 'capital_reduction')
                and live_events.ratio_new > 0
                then round(live_events.ratio_old / live_events.ratio_new, 12)
        end::numeric(24, 12) as price_adjustment_factor,

        -- booleans
        live_events.is_amended,
        live_events.is_cash_event,

        -- dates
        live_events.announcement_date,
        live_events.ex_date,
        live_events.record_date,
        live_events.pay_date,

        -- timestamps
        live_events.created_at,
        live_events.changed_at

    from live_events
    left join securities
        on
            live_events.security_id = securities.security_id
            and live_events.ex_at >= securities.valid_from
            and (securities.valid_to is null or live_events.ex_at < securities.valid_to)

)

select * from final
