with

source as (

    select * from {{ source('raw', 'stock_master') }}

),

renamed as (

    select
        {{ stock_master_columns() }}

    from source

)

select * from renamed
