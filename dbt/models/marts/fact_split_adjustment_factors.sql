with

events as (

    select * from {{ ref('fact_events') }}

),

share_events as (

    select
        security_id,
        ex_date,
        price_adjustment_factor
    from events
    where price_adjustment_factor is not null

),

daily as (

    -- Several share events on one ex date act together: their factors multiply.
    select
        security_id,
        ex_date,
        count(*) as event_count,
        exp(sum(ln(price_adjustment_factor))) as adjustment_factor
    from share_events
    group by security_id, ex_date

),

cumulative as (

    select
        -- ids
        security_id,

        -- numerics
        event_count,
        round(adjustment_factor, 12)::numeric(24, 12) as adjustment_factor,
        -- This ex date's factor times every later one: what a price quoted before this ex date
        -- (and on or after the previous one) is multiplied by to compare with prices today.
        round(
            exp(sum(ln(adjustment_factor)) over (
                partition by security_id
                order by ex_date desc
                rows between unbounded preceding and current row
            )),
            12
        )::numeric(24, 12) as cumulative_adjustment_factor,

        -- dates
        lag(ex_date) over (partition by security_id order by ex_date) as applies_from_date,
        ex_date

    from daily

)

select * from cumulative
