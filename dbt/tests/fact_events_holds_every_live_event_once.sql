-- fact_events holds exactly the events of stg_edi_690 that are neither deleted nor cancelled.
with

events as (

    select * from {{ ref('stg_edi_690') }}

),

facts as (

    select * from {{ ref('fact_events') }}

),

expected as (

    select event_id
    from events
    where is_live

),

missing as (

    select
        expected.event_id,
        'missing from fact_events' as problem
    from expected
    left join facts on expected.event_id = facts.event_id
    where facts.event_id is null

),

unexpected as (

    select
        facts.event_id,
        'deleted, cancelled or unknown event in fact_events' as problem
    from facts
    left join expected on facts.event_id = expected.event_id
    where expected.event_id is null

),

final as (

    select * from missing
    union all
    select * from unexpected

)

select * from final
