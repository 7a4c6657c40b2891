with

source as (

    select * from {{ source('raw', 'stock_master') }}

),

renamed as (

    select
        -- ids
        security_id,

        -- strings
        isin::text as isin,
        ticker,
        name_en as security_name_en,
        name_ko as security_name_ko,
        exchange_mic::text as exchange_mic,
        currency::text as currency_code,
        security_type as security_type_code,
        {{ security_type_name('security_type') }} as security_type,

        -- booleans
        status = 'active' as is_active,

        -- dates
        listing_date,

        -- timestamps
        created_at,
        updated_at

    from source

)

select * from renamed
