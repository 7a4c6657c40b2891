"""Session-local SQL helpers shared by `generate` and `tick`.

They live in `pg_temp`, so they vanish with the connection and never touch the source schema.
Every pseudo-random number is a slice of an md5 digest of (seed, purpose, row key): the same seed
gives the same numbers on every PostgreSQL version, unlike `random()` or `hashtext()`.
"""

from __future__ import annotations

import psycopg

_HELPERS = (
    # Eight hex digits of a digest as a uniform number in [0, 1); part 0..3 picks the slice.
    """
    create function pg_temp.demo_uniform(digest text, part integer)
    returns double precision
    language sql immutable parallel safe
    as $$
        select ('x' || substr(digest, part * 8 + 1, 8))::bit(32)::bigint::double precision
            / 4294967296.0::double precision
    $$
    """,
    # The ISIN check digit: letters become 10..35, then the Luhn sum doubles every second digit
    # starting with the rightmost digit of the body (the check digit will sit to its right).
    """
    create function pg_temp.demo_isin_check_digit(body text)
    returns integer
    language sql immutable parallel safe
    as $$
        with expanded as (
            select string_agg(
                case when chars.ch between '0' and '9' then chars.ch else (ascii(chars.ch) - 55)::text end,
                '' order by chars.ord
            ) as digits
            from unnest(regexp_split_to_array(body, '')) with ordinality as chars (ch, ord)
        )
        select ((10 - sum(
            case
                when (length(expanded.digits) - pos) % 2 = 0
                    then (substr(expanded.digits, pos, 1)::integer * 2) / 10
                        + (substr(expanded.digits, pos, 1)::integer * 2) % 10
                else substr(expanded.digits, pos, 1)::integer
            end
        ) % 10) % 10)::integer
        from expanded
        cross join generate_series(1, length(expanded.digits)) as pos
    $$
    """,
    # Four capital letters from a number, base 26 (for US tickers).
    """
    create function pg_temp.demo_letters(value bigint)
    returns text
    language sql immutable parallel safe
    as $$
        select chr(65 + ((value / 17576) % 26)::integer)
            || chr(65 + ((value / 676) % 26)::integer)
            || chr(65 + ((value / 26) % 26)::integer)
            || chr(65 + (value % 26)::integer)
    $$
    """,
)


def install_helpers(conn: psycopg.Connection) -> None:
    """Create the helper functions in this session's temporary schema."""
    for statement in _HELPERS:
        conn.execute(statement)
