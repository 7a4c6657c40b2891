with

source as (

    select * from {{ source('raw', 'exchanges') }}

),

renamed as (

    select
        -- ids
        mic::text as exchange_mic,

        -- strings
        exchange_name,
        country_code::text as country_code,
        city,
        time_zone,
        currency::text as currency_code,

        -- numerics
        -- A session that ends after midnight (local) still has a positive length.
        ((extract(epoch from closes_at - opens_at) / 60)::integer + 1440) % 1440 as session_minutes,

        -- times of day, local to the venue
        opens_at,
        closes_at

    from source

)

select * from renamed
