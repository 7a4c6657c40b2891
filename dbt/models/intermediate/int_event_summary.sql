with

events as (

    select * from {{ ref('stg_edi_690') }}

),

summarised as (

    select
        -- ids
        security_id,
        (array_agg(event_id order by announcement_date, event_id))[1] as first_event_id,
        (array_agg(event_id order by announcement_date desc, event_id desc))[1] as latest_event_id,

        -- strings
        event_type,
        max(currency_code) as currency_code,

        -- numerics
        count(*) as event_count,
        count(*) filter (where is_live) as live_event_count,
        count(*) filter (where is_amended) as amended_event_count,
        count(*) filter (where is_deleted) as deleted_event_count,
        count(*) filter (where is_cancelled) as cancelled_event_count,
        coalesce(sum(gross_amount) filter (where is_live), 0)::numeric(18, 6) as cash_paid_per_share,

        -- dates
        min(announcement_date) as first_announcement_date,
        max(announcement_date) as latest_announcement_date,
        max(ex_date) filter (where is_live) as latest_ex_date,

        -- timestamps
        max(changed_at) as latest_changed_at

    from events
    group by security_id, event_type

)

select * from summarised
