{#- Readable categories for the feed's codes, shared by staging and the snapshot-based dimension. -#}

{% macro security_type_name(code_column) -%}
    case {{ code_column }}
        when 'EQS' then 'equity'
        when 'PRF' then 'preferred'
        when 'ETF' then 'etf'
        when 'REIT' then 'reit'
        else 'other'
    end
{%- endmacro %}

{% macro event_type_name(code_column) -%}
    case {{ code_column }}
        when 'DIV' then 'dividend'
        when 'SD' then 'split'
        when 'CONSD' then 'consolidation'
        when 'BON' then 'bonus_issue'
        when 'RTS' then 'rights_issue'
        when 'MRGR' then 'merger'
        when 'DMRGR' then 'demerger'
        when 'CAPRD' then 'capital_reduction'
        else 'other'
    end
{%- endmacro %}
