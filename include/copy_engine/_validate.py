"""Validation: row counts and checksums per primary-key range, computed inside each database.

Each side hashes every row with `hash_record_extended` (each column by its type's own hash
function where that tells apart every two values whose text differs, about three times faster
than hashing the row's text) and sums the hashes per range; only (range, count, sum) travel to
Python. Every other column is hashed by its text (numeric by its value and scale), which both
sessions produce with the same output settings (see `_connect.SESSION_OPTIONS`). The differing
keys of a mismatched range are found by comparing the same per-row hash key by key, so the
drill-down agrees with the range sums for every type.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ._report import RangeDifference, ValidationResult
from ._schema import Shape

logger = logging.getLogger(__name__)

_INTEGER_TYPES = ("smallint", "integer", "bigint")
_MAX_KEYS_PER_RANGE = 200_000
_MAX_DIFFERING_KEYS = 20


@dataclass(frozen=True)
class RowSet:
    """A query over one side: the rows to compare, as a subquery composable."""

    query: sql.Composable


def row_checksum(shape: Shape, columns: list[str]) -> sql.Composable:
    """A 64-bit hash of a row that differs whenever a column's text differs (short of a hash collision).

    A column whose type's own hash is exact is hashed as itself, numeric as its value and its scale
    (1.0 and 1.00 hash alike), every other one as its text (see `_schema.type_facts`).
    """
    items: list[sql.Composable] = []
    for name in columns:
        column = shape.column(name)
        mode = column.hash_mode if column is not None else "text"
        if mode == "native":
            items.append(sql.Identifier(name))
        elif mode == "numeric":
            items.extend([sql.Identifier(name), sql.SQL("scale({})").format(sql.Identifier(name))])
        else:
            items.append(shape.as_text(name))
    # sum(bigint) accumulates in 128 bits: no overflow, and much faster than a numeric sum.
    return sql.SQL("hash_record_extended(row({}), 0)").format(sql.SQL(", ").join(items))


def boundaries(conn: psycopg.Connection, rows: RowSet, key: str, key_type: str, ranges: int) -> list[str]:
    """Range boundaries on the first key column, as text, ascending."""
    if ranges <= 1:
        return []
    column = sql.Identifier(key)
    if key_type in _INTEGER_TYPES:
        query = sql.SQL("select min({0}), max({0}) from {1} as _rows").format(column, rows.query)
        row = conn.execute(query, {}).fetchone()
        if row is None or row[0] is None:
            return []
        low, high = int(row[0]), int(row[1])
        step = max(1, (high - low + 1) // ranges)
        return [str(low + step * index) for index in range(1, ranges) if low + step * index <= high]
    fractions = [index / ranges for index in range(1, ranges)]
    row = conn.execute(
        sql.SQL("select (percentile_disc(%s::float8[]) within group (order by {}))::text[] from {} as _rows")
        .format(column, rows.query), (fractions,)).fetchone()
    values: list[str] = [] if row is None or row[0] is None else list(row[0])
    deduplicated: list[str] = []
    for value in values:
        if not deduplicated or deduplicated[-1] != value:
            deduplicated.append(value)
    return deduplicated


def bucket_expression(key: str, key_type: str, bounds: list[str]) -> sql.Composable:
    """The key range of a row, numbered as `width_bucket(key, bounds)` numbers them."""
    if not bounds:
        return sql.SQL("0")
    if key_type in _INTEGER_TYPES and len(bounds) >= 2:
        # Equal-width integer ranges: arithmetic instead of a binary search per row. The bounds are
        # integers computed here, so they are inlined as literals.
        step = int(bounds[1]) - int(bounds[0])
        low = int(bounds[0]) - step
        return sql.SQL("least(greatest(({}::bigint - {}) / {}, 0), {})").format(
            sql.Identifier(key), sql.Literal(low), sql.Literal(step), sql.Literal(len(bounds)))
    return sql.SQL("width_bucket({}, %(bounds)s::text[]::{}[])").format(sql.Identifier(key), sql.SQL(key_type))


def key_checksum(key: tuple[str, ...] | list[str], key_type: str) -> sql.Composable:
    """A 64-bit hash of the primary key, summed per range by delete detection."""
    if len(key) == 1 and key_type in _INTEGER_TYPES:
        return sql.SQL("hashint8extended({}::bigint, 0)").format(sql.Identifier(key[0]))
    return sql.SQL("hash_record_extended(row({}), 0)").format(sql.SQL(", ").join(sql.Identifier(k) for k in key))


def range_sums(conn: psycopg.Connection, rows: RowSet, checksum: sql.Composable, bucket: sql.Composable,
               bounds: list[str]) -> dict[int | None, tuple[int, int]]:
    """(row count, checksum) per key range; a hash aggregate, since the planner over-estimates ranges."""
    query = sql.SQL(
        "select {bucket} as bucket, count(*), coalesce(sum({checksum}), 0) from {rows} as _rows group by 1"
    ).format(bucket=bucket, checksum=checksum, rows=rows.query)
    conn.execute("select set_config('enable_sort', 'off', true)")
    result: dict[int | None, tuple[int, int]] = {}
    rows_found = conn.execute(query, {"bounds": bounds}).fetchall()
    conn.execute("select set_config('enable_sort', 'on', true)")
    for number, count, checksum_value in rows_found:
        result[number] = (int(count), int(checksum_value))
    return result


def _key_hashes(conn: psycopg.Connection, rows: RowSet, checksum: sql.Composable, key: tuple[str, ...],
                bucket: sql.Composable, bounds: list[str], number: int | None) -> dict[tuple[Any, ...], int]:
    """Each row's checksum in one range, by key: the very hash the range sums add up."""
    condition = sql.SQL("{} is null").format(bucket) if number is None else sql.SQL("{} = %(number)s").format(bucket)
    query = sql.SQL("select {keys}, {hash} from {rows} as _rows where {condition} limit {limit}").format(
        keys=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(name)) for name in key),
        hash=checksum, rows=rows.query, condition=condition, limit=sql.Literal(_MAX_KEYS_PER_RANGE))
    return {tuple(row[:-1]): row[-1] for row in conn.execute(query, {"bounds": bounds, "number": number})}


def compare(
    source: psycopg.Connection,
    target: psycopg.Connection,
    *,
    source_rows: RowSet,
    target_rows: RowSet,
    shape: Shape,
    ranges: int,
    count_query: sql.SQL | sql.Composed | None = None,
) -> ValidationResult:
    """Compare the two row sets; `source` may already be inside the sync's snapshot."""
    started = time.monotonic()
    columns = shape.names
    key = shape.primary_key
    key_column = shape.column(key[0]) if key else None
    bounds = boundaries(source, source_rows, key_column.name, key_column.type_sql, ranges) if key_column else []
    bucket = bucket_expression(key_column.name, key_column.type_sql, bounds) if key_column else sql.SQL("0")
    checksum = row_checksum(shape, columns)
    with ThreadPoolExecutor(max_workers=1) as pool:
        target_future = pool.submit(range_sums, target, target_rows, checksum, bucket, bounds)
        source_sums = range_sums(source, source_rows, checksum, bucket, bounds)
        target_sums = target_future.result()
    source_total = sum(count for count, _ in source_sums.values())
    target_total = sum(count for count, _ in target_sums.values())
    if count_query is not None:
        row = source.execute(count_query, {}).fetchone()
        source_total = int(row[0]) if row and row[0] is not None else 0
    differing: list[RangeDifference] = []
    numbers = sorted(set(source_sums) | set(target_sums), key=lambda n: (n is None, n or 0))
    for number in numbers:
        if source_sums.get(number) == target_sums.get(number):
            continue
        lower = bounds[number - 1] if isinstance(number, int) and 0 < number <= len(bounds) else None
        upper = bounds[number] if isinstance(number, int) and number < len(bounds) else None
        differing.append(RangeDifference(lower, upper, source_sums.get(number, (0, 0))[0],
                                         target_sums.get(number, (0, 0))[0]))
    differing_keys: list[list[str | None]] = []
    if differing and key:
        for number in [n for n in numbers if source_sums.get(n) != target_sums.get(n)][:3]:
            left = _key_hashes(source, source_rows, checksum, key, bucket, bounds, number)
            right = _key_hashes(target, target_rows, checksum, key, bucket, bounds, number)
            for item in sorted(set(left) | set(right), key=lambda k: tuple(str(v) for v in k)):
                if left.get(item) != right.get(item):
                    differing_keys.append(list(item))
                    if len(differing_keys) >= _MAX_DIFFERING_KEYS:
                        break
            if len(differing_keys) >= _MAX_DIFFERING_KEYS:
                break
    match = not differing and source_total == target_total
    result = ValidationResult(
        match=match, source_rows=source_total, target_rows=target_total, ranges_checked=len(numbers),
        differing_ranges=differing, differing_keys=differing_keys, duration_s=round(time.monotonic() - started, 3))
    if not match:
        logger.warning("validation mismatch: %d range(s) differ, source %d rows, target %d rows, keys %s",
                       len(differing), source_total, target_total, differing_keys[:5])
    return result
