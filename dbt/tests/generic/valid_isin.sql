{#-
    Fails for every value that is not an ISIN: two letters, nine letters or digits, and a check
    digit that matches the Luhn sum of the body with letters expanded to 10..35.
-#}
{% test valid_isin(model, column_name) %}

with

candidates as (

    select distinct {{ column_name }} as isin
    from {{ model }}
    where {{ column_name }} is not null

),

expanded as (

    select
        candidates.isin,
        string_agg(
            case
                when chars.ch between '0' and '9' then chars.ch
                else (ascii(chars.ch) - 55)::text
            end,
            '' order by chars.ord
        ) as digits
    from candidates
    cross join lateral unnest(
        regexp_split_to_array(left(candidates.isin, 11), '')
    ) with ordinality as chars (ch, ord)
    where candidates.isin ~ '^[A-Z]{2}[A-Z0-9]{9}[0-9]$'
    group by candidates.isin

),

checked as (

    select
        expanded.isin,
        (10 - sum(
            case
                when (length(expanded.digits) - positions.pos) % 2 = 0
                    then (substr(expanded.digits, positions.pos, 1)::integer * 2) / 10
                    + (substr(expanded.digits, positions.pos, 1)::integer * 2) % 10
                else substr(expanded.digits, positions.pos, 1)::integer
            end
        ) % 10) % 10 as check_digit
    from expanded
    cross join lateral generate_series(1, length(expanded.digits)) as positions (pos)
    group by expanded.isin

)

select candidates.isin
from candidates
left join checked on candidates.isin = checked.isin
where checked.isin is null or right(candidates.isin, 1)::integer <> checked.check_digit

{% endtest %}
