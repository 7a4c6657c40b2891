{#-
    dbt-postgres stamps snapshot rows it cannot date from the source (deletion rows under
    hard_deletes: new_record) with `now()::timestamp`, a time without zone, while the source's
    change timestamps are timestamptz. Stamping with timestamptz keeps one type in the snapshot
    columns and the deletion time independent of the session's time zone.
-#}
{% macro postgres__snapshot_get_time() -%}
    now()
{%- endmacro %}
