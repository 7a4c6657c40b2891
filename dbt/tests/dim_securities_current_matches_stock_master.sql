-- The current version of every security equals the securities master as it is now, and a
-- security has a current version exactly when the master still holds it.
with

securities as (

    select * from {{ ref('dim_securities') }}
    where is_current

),

stock_master as (

    select * from {{ ref('stg_stock_master') }}

),

final as (

    select
        coalesce(securities.security_id, stock_master.security_id) as security_id,
        securities.security_version_id
    from securities
    full outer join stock_master on securities.security_id = stock_master.security_id
    where
        securities.security_id is null
        or stock_master.security_id is null
        or securities.isin <> stock_master.isin
        or securities.ticker <> stock_master.ticker
        or securities.security_name_en <> stock_master.security_name_en
        or securities.security_name_ko <> stock_master.security_name_ko
        or securities.is_active <> stock_master.is_active
        or securities.updated_at <> stock_master.updated_at

)

select * from final
