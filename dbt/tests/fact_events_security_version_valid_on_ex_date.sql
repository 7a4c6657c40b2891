-- Each event's security version belongs to its security and is valid when the ex date begins.
with

facts as (

    select * from {{ ref('fact_events') }}

),

securities as (

    select * from {{ ref('dim_securities') }}

),

final as (

    select
        facts.event_id,
        facts.ex_date,
        securities.security_id,
        securities.valid_from,
        securities.valid_to
    from facts
    inner join securities on facts.security_version_id = securities.security_version_id
    where
        facts.security_id <> securities.security_id
        or facts.ex_date::timestamp at time zone 'UTC' < securities.valid_from
        or facts.ex_date::timestamp at time zone 'UTC' >= securities.valid_to

)

select * from final
