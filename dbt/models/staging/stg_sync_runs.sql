with

source as (

    select * from {{ source('copy_engine', 'sync_runs') }}

),

renamed as (

    select
        -- ids
        run_id,
        table_name,
        source as source_relation,
        target_table,

        -- strings
        mode as sync_mode,
        status as run_status,
        error as error_message,

        -- numerics
        rows_read,
        rows_inserted,
        rows_updated,
        rows_deleted,
        rows_replaced,
        rows_inserted + rows_updated + rows_deleted as rows_changed,
        bytes as bytes_copied,
        duration_s as duration_seconds,
        attempts,
        jsonb_array_length(schema_changes) as schema_change_count,
        (report ->> 'slot_retained_wal_bytes')::bigint as slot_retained_wal_bytes,
        (report ->> 'slot_lag_bytes')::bigint as slot_lag_bytes,

        -- booleans
        status = 'success' as is_success,
        validation_match,

        -- timestamps
        watermark_before,
        watermark_after,
        started_at,
        finished_at

    from source

)

select * from renamed
