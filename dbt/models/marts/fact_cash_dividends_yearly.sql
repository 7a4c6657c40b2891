with

events as (

    select * from {{ ref('fact_events') }}

),

dividends as (

    select *
    from events
    where event_type = 'dividend' and gross_amount is not null

),

yearly as (

    select
        -- ids
        security_id,

        -- strings
        currency_code,

        -- numerics
        extract(year from ex_date)::integer as dividend_year,
        count(*) as dividend_count,
        sum(gross_amount)::numeric(18, 6) as gross_amount_per_share,

        -- dates
        min(ex_date) as first_ex_date,
        max(ex_date) as last_ex_date

    from dividends
    group by security_id, currency_code, extract(year from ex_date)

)

select * from yearly
