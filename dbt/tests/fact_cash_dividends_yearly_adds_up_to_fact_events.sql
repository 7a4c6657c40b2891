-- Per security, the yearly dividend totals add up to the live cash dividends in fact_events.
with

yearly as (

    select * from {{ ref('fact_cash_dividends_yearly') }}

),

facts as (

    select * from {{ ref('fact_events') }}

),

yearly_totals as (

    select
        security_id,
        sum(dividend_count) as dividend_count,
        sum(gross_amount_per_share) as gross_amount_per_share
    from yearly
    group by security_id

),

event_totals as (

    select
        security_id,
        count(*) as dividend_count,
        sum(gross_amount) as gross_amount_per_share
    from facts
    where event_type = 'dividend' and gross_amount is not null
    group by security_id

),

final as (

    select coalesce(yearly_totals.security_id, event_totals.security_id) as security_id
    from yearly_totals
    full outer join event_totals on yearly_totals.security_id = event_totals.security_id
    where
        yearly_totals.security_id is null
        or event_totals.security_id is null
        or yearly_totals.dividend_count <> event_totals.dividend_count
        or yearly_totals.gross_amount_per_share <> event_totals.gross_amount_per_share

)

select * from final
