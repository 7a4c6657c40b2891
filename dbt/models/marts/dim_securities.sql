with

snapshot as (

    select * from {{ ref('snp_stock_master') }}

),

versions as (

    select
        dbt_scd_id as security_version_id,
        {{ stock_master_columns() }},
        dbt_valid_from,
        dbt_valid_to

    from snapshot
    -- A deletion row only closes the version before it, which the snapshot already did.
    where coalesce(dbt_is_deleted, 'False') <> 'True'

),

numbered as (

    select
        versions.*,
        row_number() over (
            partition by versions.security_id
            order by versions.dbt_valid_from
        ) as version_number
    from versions

),

final as (

    select
        -- ids
        security_version_id,
        security_id,

        -- strings
        isin,
        ticker,
        security_name_en,
        security_name_ko,
        exchange_mic,
        currency_code,
        security_type_code,
        security_type,

        -- numerics
        version_number,

        -- booleans
        is_active,
        dbt_valid_to is null as is_current,

        -- dates
        listing_date,

        -- timestamps
        -- The master keeps no history before the first version we saw, so that version stands
        -- for all earlier time: events announced years ago still find the security.
        case
            when version_number = 1 then '1900-01-01 00:00:00+00'::timestamptz
            else dbt_valid_from
        end as valid_from,
        dbt_valid_to as valid_to,
        created_at,
        updated_at

    from numbered

)

select * from final
