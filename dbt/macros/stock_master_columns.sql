{#- The securities master's columns, renamed and categorised once for stg_stock_master and for the
    snapshot-based dim_securities, which cannot select from staging (snapshots read raw). -#}

{% macro stock_master_columns() -%}
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
{%- endmacro %}
