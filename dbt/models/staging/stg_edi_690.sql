with

source as (

    select * from {{ source('raw', 'edi_690') }}

),

renamed as (

    select
        -- ids
        event_id,
        security_id,

        -- strings
        event_code,
        {{ event_type_name('event_code') }} as event_type,
        action_flag::text as action_flag,
        currency::text as currency_code,

        -- numerics
        ratio_old,
        ratio_new,
        gross_amount,

        -- booleans
        action_flag = 'U' as is_amended,
        action_flag = 'D' as is_deleted,
        action_flag = 'C' as is_cancelled,
        -- The one definition of a live event: every model and test downstream uses this column.
        action_flag not in ('D', 'C') as is_live,
        gross_amount is not null as is_cash_event,

        -- dates
        announcement_date,
        ex_date,
        record_date,
        pay_date,

        -- timestamps
        created_at,
        changed_at

    from source

)

select * from renamed
