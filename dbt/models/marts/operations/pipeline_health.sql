{#-
    A view, not a table like the other marts: an operator reading it after a failed ingestion
    sees that failure at once, without waiting for the next transform run.
-#}
{{ config(materialized='view') }}

with

runs as (

    select * from {{ ref('stg_sync_runs') }}

),

ranked as (

    select
        *,
        row_number() over (partition by target_table order by finished_at desc, run_id desc) as recency,
        row_number() over (
            partition by target_table, is_success order by finished_at desc, run_id desc
        ) as recency_within_status
    from runs

),

per_table as (

    select
        target_table,
        count(*) as runs,
        count(*) filter (where not is_success) as failed_runs,
        count(*) filter (where not is_success and finished_at > now() - interval '24 hours')
            as failed_runs_last_24h,
        sum(rows_changed) filter (where is_success) as rows_changed_total,
        avg(duration_seconds) filter (where is_success) as avg_success_duration_seconds,
        max(duration_seconds) filter (where is_success) as max_success_duration_seconds,
        min(started_at) as first_run_at
    from runs
    group by target_table

),

last_run as (

    select * from ranked
    where recency = 1

),

last_success as (

    select * from ranked
    where is_success and recency_within_status = 1

),

final as (

    select
        per_table.target_table,
        last_run.table_name,
        last_run.source_relation,
        last_run.run_status as last_run_status,
        last_run.finished_at as last_run_at,
        case when not last_run.is_success then last_run.error_message end as last_error,
        last_success.finished_at as last_success_at,
        last_success.sync_mode as last_success_mode,
        last_success.rows_read as last_success_rows_read,
        last_success.rows_inserted as last_success_rows_inserted,
        last_success.rows_updated as last_success_rows_updated,
        last_success.rows_deleted as last_success_rows_deleted,
        last_success.rows_replaced as last_success_rows_replaced,
        last_success.duration_seconds as last_success_duration_seconds,
        last_success.watermark_after as last_success_watermark,
        last_success.validation_match as last_success_validation_match,
        last_success.slot_retained_wal_bytes,
        last_success.slot_lag_bytes,
        coalesce(
            last_success.slot_retained_wal_bytes > {{ var('cdc_slot_wal_alert_bytes') }}, false
        ) as is_slot_wal_over_limit,
        per_table.runs,
        per_table.failed_runs,
        per_table.failed_runs_last_24h,
        coalesce(per_table.rows_changed_total, 0) as rows_changed_total,
        per_table.avg_success_duration_seconds,
        per_table.max_success_duration_seconds,
        per_table.first_run_at
    from per_table
    inner join last_run on per_table.target_table = last_run.target_table
    left join last_success on per_table.target_table = last_success.target_table

)

select * from final
