{#-
    A custom schema is used as it is (`staging`, not `analytics_staging`): the warehouse has one
    set of schemas, named as the folder layout says. Models without one go to the target schema.
-#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
