"""Sync one table: stream COPY from a source snapshot into the target in one transaction.

Full mode truncates the target and COPYs straight into it inside one transaction (with the
primary key dropped during the load and rebuilt after, which is about twice as fast as
maintaining it row by row). The table itself is never dropped or renamed, so views on it keep
working, and readers wait on the lock and then see the old rows or the new ones.

Incremental mode COPYs the changed rows into a temporary staging table and upserts them with
`insert ... on conflict do update ... where <row changed>`, so unchanged rows are not rewritten.
The watermark is written in the same transaction as the rows.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import resource
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg import pq, sql

from ._config import TableConfig
from ._connect import connect, mask_dsn, raise_classified
from ._errors import (
    ConcurrentRunError,
    CopyEngineError,
    MissingPrimaryKeyError,
    SourceError,
    TerminalError,
    TransientError,
    ValidationMismatchError,
)
from ._report import SyncReport, ValidationResult
from ._schema import (
    SOFT_DELETE_COLUMN,
    Shape,
    TargetPlan,
    describe_source,
    ensure_types,
    prepare_target,
    user_types,
)
from ._state import ensure_state_tables, read_watermark, save_run, write_state
from ._validate import RowSet, boundaries, bucket_expression, compare, key_checksum, range_sums

logger = logging.getLogger(__name__)

_WRITE_BATCH = 256 * 1024
PROGRESS_EVERY_S = 5.0  # how often a running COPY logs its rows, MB and rate
_STAGE = "_copy_engine_stage"
_KEYS = "_copy_engine_keys"
_GONE = "_copy_engine_gone"
_DELETE_RANGES = 256
_KEYS_PER_DELETE_RANGE = 250
_TIME_TYPES = ("date", "timestamp", "timestamptz")


def user_sql(text: str) -> sql.SQL:
    """User SQL from the configuration, as a fragment; `%` is escaped because queries take parameters."""
    return sql.SQL(text.strip().rstrip(";").replace("%", "%%"))


class _TableColumns(sql.Composed):
    """`table (columns)`: a whole source table, for the plain `COPY table TO` form."""

    def __init__(self, table: sql.Composable, columns: list[str]) -> None:
        super().__init__([table, sql.SQL(" ("), sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                          sql.SQL(")")])


@dataclass(frozen=True)
class _Names:
    table: TableConfig

    @property
    def target(self) -> sql.Identifier:
        return sql.Identifier(*self.table.target_schema_table)

    @property
    def target_text(self) -> str:
        return ".".join(self.table.target_schema_table)

    def base(self) -> sql.Composable:
        if self.table.select:
            return sql.SQL("({})").format(user_sql(self.table.select))
        return sql.Identifier(*self.table.source_schema_table)

    def select_from_base(self) -> sql.Composable | None:
        return user_sql(self.table.select) if self.table.select else None

    def where(self) -> sql.Composable | None:
        return user_sql(self.table.where) if self.table.where else None

    def copy_source(self, columns: list[str], *extra: sql.Composable, shape: Shape | None = None) -> sql.Composable:
        """What `COPY … TO STDOUT` reads: the plain `table (columns)` form when nothing filters it and the
        source's shape allows it (see `Shape.read_reason`)."""
        if not extra and not self.table.where and not self.table.select and (shape is None or not shape.read_reason):
            return _TableColumns(self.base(), columns)
        return self.source_rows(columns, *extra, shape=shape)

    def source_rows(self, columns: list[str], *extra: sql.Composable, shape: Shape | None = None) -> sql.Composable:
        """`select <columns> from <source or custom select> where <custom where> and <extra>`."""
        conditions: list[sql.Composable] = []
        if self.table.where:
            conditions.append(sql.SQL("({})").format(user_sql(self.table.where)))
        conditions.extend(extra)
        query = sql.SQL("select {} from {} as _source").format(
            shape.read_list(columns) if shape else sql.SQL(", ").join(sql.Identifier(c) for c in columns), self.base())
        if conditions:
            query = sql.SQL("{} where {}").format(query, sql.SQL(" and ").join(conditions))
        return query


def _peak_memory_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _lock_key(target: str) -> str:
    return f"copy_engine:{target}"


def _acquire_run_lock(conn: psycopg.Connection, table: TableConfig, target: str) -> None:
    """Session advisory lock on the target table; waits up to `lock_wait_s`, then fails clearly."""
    started = time.monotonic()
    while True:
        row = conn.execute("select pg_try_advisory_lock(hashtextextended(%s, 0))", (_lock_key(target),)).fetchone()
        conn.commit()
        if row and row[0]:
            return
        waited = time.monotonic() - started
        if waited >= table.lock_wait_s:
            raise ConcurrentRunError(
                f"another run is syncing {target} and still holds its lock after {waited:.1f}s; "
                "let it finish, or raise lock_wait_s",
                table=table.name, waited_s=waited)
        time.sleep(min(0.2, max(0.01, table.lock_wait_s - waited)))


def _release_run_lock(conn: psycopg.Connection, target: str) -> None:
    if conn.closed:
        return
    try:
        conn.rollback()
        conn.execute("select pg_advisory_unlock(hashtextextended(%s, 0))", (_lock_key(target),))
        conn.commit()
    except psycopg.Error:
        logger.debug("could not release the run lock on %s; the session end releases it", target)


class _Progress:
    """Logs a running COPY's rows, MB and rate every PROGRESS_EVERY_S seconds, under `label`."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = self.logged = time.monotonic()

    def update(self, rows: int, size: int) -> None:
        now = time.monotonic()
        if now - self.logged < PROGRESS_EVERY_S:
            return
        self.logged = now
        elapsed = now - self.started
        logger.info("%s: copying, %d rows, %.1f MB so far (%.0f rows/s, %.1f MB/s)", self.label, rows,
                    size / 1e6, rows / elapsed, size / 1e6 / elapsed)


def _stream(src: psycopg.Connection, query: sql.Composable, params: dict[str, object],
            tgt: psycopg.Connection, into: sql.Composable, columns: list[str], *, binary: bool,
            progress: str | None = None, freeze: bool = False) -> tuple[int, int]:
    """COPY the query's rows from `src` into `into` on `tgt`; returns (rows, bytes). Memory stays bounded.

    With a `progress` label, a long COPY logs how far it got every few seconds.
    """
    options = [sql.SQL("format binary")] if binary else []
    in_options = list(options) + ([sql.SQL("freeze")] if freeze else [])
    source = query if isinstance(query, _TableColumns) else sql.SQL("({})").format(query)
    copy_out = sql.SQL("copy {} to stdout {}").format(
        source, sql.SQL("({})").format(sql.SQL(", ").join(options)) if options else sql.SQL(""))
    copy_in = sql.SQL("copy {} ({}) from stdin {}").format(
        into, sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.SQL("({})").format(sql.SQL(", ").join(in_options)) if in_options else sql.SQL(""))
    # The COPY is driven on libpq directly: psycopg's Copy iterator costs microseconds per row in
    # Python, which at millions of rows is most of the run. Parameters are merged client-side, as
    # psycopg does for COPY; a non-empty mapping also turns the escaped `%%` back into `%`.
    out_query = psycopg.ClientCursor(src).mogrify(copy_out, params or {"_unused": None}).encode()
    in_query = copy_in.as_bytes(tgt)
    return _pump(src, out_query, tgt, in_query, _Progress(progress) if progress else None)


def _result_error(conn: psycopg.Connection, result: pq.abc.PGresult | None) -> psycopg.Error:
    if result is None:
        raw: str | bytes = conn.pgconn.get_error_message()
        message = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw).strip()
        return psycopg.OperationalError(message or "the connection was lost during COPY")
    return psycopg.errors.error_from_result(result, encoding=conn.info.encoding)


def _pump(src: psycopg.Connection, out_query: bytes, tgt: psycopg.Connection, in_query: bytes,
          progress: _Progress | None = None) -> tuple[int, int]:
    source, target = src.pgconn, tgt.pgconn
    blocking = source.nonblocking, target.nonblocking
    source.nonblocking = target.nonblocking = 0
    total = 0
    try:
        source.send_query(out_query)
        started = source.get_result()
        if started is None or started.status != pq.ExecStatus.COPY_OUT:
            raise _drain_error(src, started)
        target.send_query(in_query)
        accepting = target.get_result()
        if accepting is None or accepting.status != pq.ExecStatus.COPY_IN:
            _abandon_copy_out(src)
            raise _drain_error(tgt, accepting)
        failure: psycopg.Error | None = None
        try:
            # The source sends one CopyData message per row; the target gets them joined into
            # _WRITE_BATCH-sized messages, which saves the target backend a message per row.
            batch: list[memoryview] = []
            pending = messages = 0
            read, keep, batch_size = source.get_copy_data, batch.append, _WRITE_BATCH  # locals: once a row
            while True:
                size, data = read(0)
                if size < 0:
                    break
                keep(data)
                pending += size
                if pending >= batch_size:
                    if target.put_copy_data(b"".join(batch)) != 1:
                        raise _result_error(tgt, None)
                    total += pending
                    messages += len(batch)  # one CopyData message per row, plus a binary header
                    batch.clear()
                    pending = 0
                    if progress is not None:
                        progress.update(messages, total)
            if pending:
                if target.put_copy_data(b"".join(batch)) != 1:
                    raise _result_error(tgt, None)
                total += pending
            if size == -2:
                failure = _result_error(src, None)
            else:
                finished = source.get_result()
                if finished is None or finished.status != pq.ExecStatus.COMMAND_OK:
                    failure = _drain_error(src, finished)
                else:
                    while source.get_result() is not None:
                        pass
        except BaseException:
            target.put_copy_end(b"copy engine: source stream failed")
            _drain(tgt)
            raise
        if failure is not None:
            target.put_copy_end(b"copy engine: source stream failed")
            _drain(tgt)
            raise failure
        target.put_copy_end()
        result = target.get_result()
        if result is None or result.status != pq.ExecStatus.COMMAND_OK:
            raise _drain_error(tgt, result)
        rows = int(result.command_tuples or 0)
        _drain(tgt)
        return rows, total
    finally:
        source.nonblocking, target.nonblocking = blocking


def _drain(conn: psycopg.Connection) -> None:
    while conn.pgconn.get_result() is not None:
        pass


def _drain_error(conn: psycopg.Connection, result: pq.abc.PGresult | None) -> psycopg.Error:
    error = _result_error(conn, result)
    if conn.pgconn.status == pq.ConnStatus.OK:
        _drain(conn)
    return error


def _abandon_copy_out(src: psycopg.Connection) -> None:
    """Stop a COPY TO whose target refused: cancel it and consume the rest."""
    src.cancel_safe(timeout=10)
    while src.pgconn.get_copy_data(0)[0] >= 0:
        pass
    _drain(src)


def _set_lock_timeout(conn: psycopg.Connection, table: TableConfig) -> None:
    conn.execute("select set_config('lock_timeout', %s, true)", (f"{int(table.lock_timeout_s * 1000)}ms",))


def _column_list(names: list[str], prefix: str | None = None) -> sql.Composable:
    if prefix:
        return sql.SQL(", ").join(sql.Identifier(prefix, n) for n in names)
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


# --- full ---------------------------------------------------------------------------------------


def _load_full(src: psycopg.Connection, tgt: psycopg.Connection, table: TableConfig, names: _Names,
               shape: Shape, plan: TargetPlan, report: SyncReport) -> None:
    target = names.target
    _set_lock_timeout(tgt, table)
    tgt.execute(sql.SQL("lock table {} in access exclusive mode").format(target))
    before = tgt.execute(sql.SQL("select count(*) from {}").format(target)).fetchone()
    report.rows_deleted = int(before[0]) if before else 0
    key_constraint = _drop_primary_key(tgt, names, shape)
    tgt.execute(sql.SQL("truncate {}").format(target))
    # FREEZE (allowed: the table was truncated in this transaction) writes the rows frozen and their
    # pages all-visible, so the first reader sets no hint bits, vacuum need not freeze them, and the
    # next full sync counts the old rows from the key index. Like TRUNCATE, it lets a transaction whose
    # snapshot is older than the commit see the new rows; readers still never see a partial table.
    rows, size = _stream(src, names.copy_source(plan.columns, shape=shape), {}, tgt, target, plan.columns,
                         binary=plan.binary, progress=table.name, freeze=plan.ordinary_table)
    if key_constraint:
        add_primary_key(tgt, target, key_constraint, shape, table)
    report.rows_read = rows
    report.rows_inserted = rows
    report.bytes = size


def add_primary_key(tgt: psycopg.Connection, relation: sql.Composable, constraint: str, shape: Shape,
                    table: TableConfig) -> None:
    """Build the primary key on freshly loaded rows; a repeated key value is the source's error."""
    # One in-memory sort for the key index (the default 64MB spills at a few million rows).
    tgt.execute("select set_config('maintenance_work_mem', '256MB', true)")
    try:
        with tgt.transaction():
            tgt.execute(sql.SQL("alter table {} add constraint {} primary key ({})").format(
                relation, sql.Identifier(constraint), _column_list(list(shape.primary_key))))
    except psycopg.errors.UniqueViolation as error:
        raise SourceError(
            f"the source rows repeat a primary key value ({', '.join(shape.primary_key)}): "
            f"{(str(error).splitlines() or [''])[-1]}; fix the custom select or primary_key",
            table=table.name) from error


def _drop_primary_key(tgt: psycopg.Connection, names: _Names, shape: Shape) -> str | None:
    """Drop the target's primary key for the load and return its name, unless something depends on it."""
    if not shape.primary_key:
        return None
    row = tgt.execute(
        "select c.conname from pg_constraint as c join pg_class as r on r.oid = c.conrelid "
        "join pg_namespace as n on n.oid = r.relnamespace "
        "where n.nspname = %s and r.relname = %s and c.contype = 'p'", names.table.target_schema_table).fetchone()
    if row is None:
        return None
    try:
        with tgt.transaction():
            tgt.execute(sql.SQL("alter table {} drop constraint {}").format(names.target, sql.Identifier(row[0])))
    except psycopg.errors.DependentObjectsStillExist:
        logger.info("%s: primary key has dependents (foreign keys); loading with the index in place",
                    names.table.name)
        return None
    return str(row[0])


# --- incremental --------------------------------------------------------------------------------


def _cursor_filter(shape: Shape, table: TableConfig, watermark: str | None) -> tuple[list[sql.Composable],
                                                                                     dict[str, object]]:
    if watermark is None:
        return [], {}
    assert table.cursor_column is not None
    cursor = shape.column(table.cursor_column)
    assert cursor is not None
    type_sql = sql.SQL(cursor.type_sql)
    if table.lookback:
        is_time = cursor.type_sql.startswith(("date", "timestamp"))
        step = sql.SQL("%(lookback)s::interval") if is_time else sql.SQL("%(lookback)s::{}").format(type_sql)
        bound = sql.SQL("(%(watermark)s::{} - {})").format(type_sql, step)
        params: dict[str, object] = {"watermark": watermark, "lookback": table.lookback}
    else:
        bound = sql.SQL("%(watermark)s::{}").format(type_sql)
        params = {"watermark": watermark}
    return [sql.SQL("{} > {}").format(sql.Identifier(cursor.name), bound)], params


def _load_incremental(src: psycopg.Connection, tgt: psycopg.Connection, table: TableConfig, names: _Names,
                      shape: Shape, plan: TargetPlan, report: SyncReport,
                      dsns: tuple[str, str] | None = None) -> None:
    assert table.cursor_column is not None
    if shape.column(table.cursor_column) is None:
        raise SourceError(
            f"cursor_column {table.cursor_column} is not a source column ({', '.join(shape.names)})",
            table=table.name)
    target = names.target
    cursor = sql.Identifier(table.cursor_column)
    empty = tgt.execute(sql.SQL("select not exists (select from {})").format(target)).fetchone()
    key_is_unique = table.select is None and table.primary_key is None  # the source table's own key
    if report.watermark_before is None and empty and empty[0] and key_is_unique:
        # The first load into an empty table: a full load gives the same rows at COPY speed.
        _load_full(src, tgt, table, names, shape, plan, report)
        row = tgt.execute(sql.SQL("select max({})::text from {}").format(cursor, target)).fetchone()
        report.watermark_after = row[0] if row else None
        return
    pool = ThreadPoolExecutor(max_workers=1)
    finished = False
    try:
        beside: Future[_KeySums] | None = None
        if table.delete_detection != "none" and dsns is not None and not plan.changes:
            # Deleted keys are the target's keys missing from the source, before the upsert as after
            # it (the upsert only writes keys of this snapshot), so the per-range key sums of both
            # sides run on their own connections while the changed rows are copied and upserted.
            row = src.execute("select pg_export_snapshot()").fetchone()  # not in a savepoint: it refuses
            assert row is not None
            beside = pool.submit(_key_sums_beside, dsns, str(row[0]), table, names, shape)
        _copy_changes(src, tgt, table, names, shape, plan, report)
        if table.delete_detection != "none":
            sums = None
            if beside is not None:
                try:
                    sums = beside.result()
                except (psycopg.Error, CopyEngineError) as error:
                    # A locked target, or a pooler that cannot share the snapshot: the sync's own
                    # transaction sums the keys instead (and fails there if the server is gone).
                    logger.warning("%s: summing the keys beside the sync failed (%s); summing them in the "
                                   "sync's transaction", table.name, (str(error).splitlines() or [""])[0])
            report.rows_deleted = _detect_deletes(src, tgt, table, names, shape, plan, sums)
        finished = True
    finally:
        # A failed run does not wait for the sums beside it: their thread closes its connections
        # when its queries end.
        pool.shutdown(wait=finished)


def _copy_changes(src: psycopg.Connection, tgt: psycopg.Connection, table: TableConfig, names: _Names,
                  shape: Shape, plan: TargetPlan, report: SyncReport) -> None:
    """COPY the rows past the watermark into a staging table and upsert them into the target."""
    assert table.cursor_column is not None
    target = names.target
    cursor = sql.Identifier(table.cursor_column)
    stage = sql.Identifier(_STAGE)
    tgt.execute(sql.SQL("create temporary table {} on commit drop as select {} from {} with no data").format(
        stage, _column_list(plan.columns), target))
    conditions, params = _cursor_filter(shape, table, report.watermark_before)
    rows, size = _stream(src, names.copy_source(plan.columns, *conditions, shape=shape), params, tgt, stage,
                         plan.columns,
                         binary=plan.binary, progress=table.name)
    report.rows_read, report.bytes = rows, size
    cursor_type = sql.SQL(shape.column(table.cursor_column).type_sql)  # type: ignore[union-attr]
    row = tgt.execute(sql.SQL("select greatest(max({}), %s::{})::text from {}").format(cursor, cursor_type, stage),
                      (report.watermark_before,)).fetchone()
    report.watermark_after = row[0] if row else report.watermark_before
    _set_lock_timeout(tgt, table)
    if rows:
        report.rows_inserted, report.rows_updated = _upsert(tgt, names, shape, plan, cursor)


def _upsert(tgt: psycopg.Connection, names: _Names, shape: Shape, plan: TargetPlan,
            cursor: sql.Identifier) -> tuple[int, int]:
    key = list(shape.primary_key)
    values = [c for c in plan.columns if c not in key]
    # Columns the source no longer has, and the soft-delete mark, are reset on every written row.
    reset = list(plan.extra_columns)
    setters = [sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in values]
    setters += [sql.SQL("{} = null").format(sql.Identifier(c)) for c in reset]
    # Text comparison: exact for every type (also -0 vs 0, 1.0 vs 1.00) and works for json and xml,
    # which have no equality operator.
    changed = [sql.SQL("({} is distinct from {})").format(shape.as_text(c, "t"), shape.as_text(c, "excluded"))
               for c in values]
    changed += [sql.SQL("t.{} is not null").format(sql.Identifier(c)) for c in reset]
    if setters:
        action: sql.Composable = sql.SQL("do update set {} where {}").format(
            sql.SQL(", ").join(setters), sql.SQL(" or ").join(changed) if changed else sql.SQL("false"))
    else:
        action = sql.SQL("do nothing")
    query = sql.SQL(
        """with written as (
               insert into {target} as t ({columns})
               select distinct on ({key}) {columns} from {stage}
               order by {key}, {cursor} desc nulls last
               on conflict ({key}) {action}
               returning (xmax = 0) as inserted
           )
           select count(*) filter (where inserted), count(*) filter (where not inserted) from written"""
    ).format(target=names.target, columns=_column_list(plan.columns), key=_column_list(key),
             stage=sql.Identifier(_STAGE), cursor=cursor, action=action)
    # The batch is sorted by key in memory (at the default 4MB a 1% batch of 2M rows sorted on disk).
    tgt.execute("select set_config('work_mem', '64MB', true)")
    row = tgt.execute(query).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@dataclass(frozen=True)
class _Spans:
    """Disjoint ranges `lower <= key < upper` of the first key column (None: unbounded), as text."""

    key: str
    key_type: str
    spans: list[tuple[str | None, str | None]]

    @classmethod
    def of_ranges(cls, key: str, key_type: str, bounds: list[str], numbers: list[int]) -> _Spans:
        """The ranges numbered as `bucket_expression` numbers them, adjacent ones merged."""
        spans: list[tuple[str | None, str | None]] = []
        for number in sorted(numbers):
            lower = bounds[number - 1] if 0 < number <= len(bounds) else None
            upper = bounds[number] if number < len(bounds) else None
            if spans and spans[-1][1] is not None and spans[-1][1] == lower:
                spans[-1] = (spans[-1][0], upper)
            else:
                spans.append((lower, upper))
        return cls(key, key_type, spans)

    def rows(self, rows: sql.Composable, columns: list[str], prefix: str) -> tuple[sql.Composable, dict[str, object]]:
        """`select <columns> from <rows>` limited to the spans.

        The bounded spans are joined from an array of bounds, so each is one index range scan (a
        long `or` of ranges is evaluated row by row over the whole table); the open-ended first and
        last spans are separate branches.
        """
        column = sql.SQL("_rows.{}").format(sql.Identifier(self.key))
        key_type = sql.SQL(self.key_type)
        select = sql.SQL("select {} from {} as _rows").format(_column_list(columns, "_rows"), rows)
        bounded = [(lower, upper) for lower, upper in self.spans if lower is not None and upper is not None]
        params: dict[str, object] = {}
        branches: list[sql.Composable] = []
        if bounded:
            params[f"{prefix}_lowers"] = [lower for lower, _ in bounded]
            params[f"{prefix}_uppers"] = [upper for _, upper in bounded]
            branches.append(sql.SQL(
                "{select} join unnest({lowers}::text[]::{type}[], {uppers}::text[]::{type}[]) as _spans(lower, upper) "
                "on {column} >= _spans.lower and {column} < _spans.upper").format(
                select=select, lowers=sql.Placeholder(f"{prefix}_lowers"), uppers=sql.Placeholder(f"{prefix}_uppers"),
                type=key_type, column=column))
        for index, (lower, upper) in enumerate(self.spans):
            if lower is not None and upper is not None:
                continue
            parts: list[sql.Composable] = []
            if lower is not None:
                name = f"{prefix}_from_{index}"
                params[name] = lower
                parts.append(sql.SQL("{} >= {}::{}").format(column, sql.Placeholder(name), key_type))
            if upper is not None:
                name = f"{prefix}_below_{index}"
                params[name] = upper
                parts.append(sql.SQL("{} < {}::{}").format(column, sql.Placeholder(name), key_type))
            branches.append(sql.SQL("{} where {}").format(select, sql.SQL(" and ").join(parts)) if parts else select)
        if not branches:
            return sql.SQL("{} where false").format(select), params
        return sql.SQL(" union all ").join(branches), params


@dataclass(frozen=True)
class _KeySums:
    """Per-range (count, key hash sum) of both sides, ranges split at `bounds` of the first key column."""

    bounds: list[str]
    source: dict[int | None, tuple[int, int]]
    target: dict[int | None, tuple[int, int]]


def _key_rows(names: _Names, shape: Shape, soft: bool) -> tuple[RowSet, RowSet]:
    key = list(shape.primary_key)
    source_keys = RowSet(sql.SQL("({})").format(names.source_rows(key)))
    live = sql.SQL(" where {} is null").format(sql.Identifier(SOFT_DELETE_COLUMN)) if soft else sql.SQL("")
    target_keys = RowSet(sql.SQL("(select {} from {}{})").format(_column_list(key), names.target, live))
    return source_keys, target_keys


def _key_sums(src: psycopg.Connection, tgt: psycopg.Connection, table: TableConfig, names: _Names,
              shape: Shape) -> _KeySums:
    """Both sides sum a hash of their keys per key range, inside each database and at the same time."""
    key = list(shape.primary_key)
    first = shape.column(key[0])
    assert first is not None
    source_keys, target_keys = _key_rows(names, shape, table.delete_detection == "soft")
    # reltuples is -1 until the first analyze; the table's size in bytes / 100 stands in for it.
    estimate = tgt.execute("select (case when reltuples >= 0 then reltuples else pg_relation_size(oid) / 100 end)"
                           "::bigint from pg_class where oid = %s::regclass", (names.target.as_string(tgt),)).fetchone()
    # A few hundred keys per range, so scattered deletes pull over only the ranges they touch; more
    # ranges cost the aggregation little (measured: 8,000 instead of 2,000 ranges on 2M keys, no change).
    ranges = min(max(int(estimate[0]) // _KEYS_PER_DELETE_RANGE if estimate else 0, _DELETE_RANGES), 32768)
    bounds = boundaries(src, source_keys, first.name, first.type_sql, ranges)
    bucket = bucket_expression(first.name, first.type_sql, bounds)
    checksum = key_checksum(key, first.type_sql)
    with ThreadPoolExecutor(max_workers=1) as pool:
        target_future = pool.submit(range_sums, tgt, target_keys, checksum, bucket, bounds)
        source_sums = range_sums(src, source_keys, checksum, bucket, bounds)
        target_sums = target_future.result()
    return _KeySums(bounds, source_sums, target_sums)


def _key_sums_beside(dsns: tuple[str, str], snapshot: str, table: TableConfig, names: _Names,
                     shape: Shape) -> _KeySums:
    """`_key_sums` on two more connections: the source on the sync's snapshot, the target as committed."""
    source_dsn, target_dsn = dsns
    with connect(source_dsn, role="source", table=table.name) as src, \
            connect(target_dsn, role="target", table=table.name) as tgt:
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        src.read_only = True
        src.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(snapshot)))
        # Never wait behind the sync's own transaction (it would wait for this one): give up and let
        # the sync sum the target itself.
        tgt.execute("select set_config('lock_timeout', '1s', false)")
        sums = _key_sums(src, tgt, table, names, shape)
        src.rollback()
        tgt.rollback()
    return sums


def _detect_deletes(src: psycopg.Connection, tgt: psycopg.Connection, table: TableConfig, names: _Names,
                    shape: Shape, plan: TargetPlan, sums: _KeySums | None = None) -> int:
    """Find target keys missing from the source snapshot and delete (or mark) those rows.

    Only the keys of ranges whose key sums differ are copied over (read through the key index) and
    anti-joined, so a table without deletes costs one pass over the keys on each side.
    """
    key = list(shape.primary_key)
    first = shape.column(key[0])
    assert first is not None
    soft = table.delete_detection == "soft"
    source_keys, target_keys = _key_rows(names, shape, soft)
    if sums is None:
        sums = _key_sums(src, tgt, table, names, shape)
    differing = [n for n in set(sums.target) | set(sums.source) if sums.target.get(n) != sums.source.get(n)]
    differing = [n for n in differing if n in sums.target]  # a range the target lacks has nothing to delete
    if not differing:
        return 0
    logger.info("%s: %d of %d key range(s) differ; comparing their keys", table.name, len(differing),
                len(sums.target))
    bounds = sums.bounds
    spans = _Spans.of_ranges(first.name, first.type_sql, bounds, [n for n in differing if n is not None])
    keys = sql.Identifier(_KEYS)
    tgt.execute(sql.SQL("create temporary table {} on commit drop as select {} from {} with no data").format(
        keys, _column_list(key), names.target))
    source_in_spans, source_params = spans.rows(source_keys.query, key, "source")
    _stream(src, source_in_spans, source_params, tgt, keys, key, binary=plan.binary)
    tgt.execute(sql.SQL("analyze {}").format(keys))
    tgt.execute("select set_config('work_mem', '256MB', true)")  # one in-memory hash for the anti-join
    target_in_spans, target_params = spans.rows(target_keys.query, key, "target")
    # The missing keys go into a table of their own first: the planner cannot estimate the span join
    # and would otherwise hash the whole target to delete a handful of rows.
    gone = sql.Identifier(_GONE)
    tgt.execute(sql.SQL(
        "create temporary table {gone} on commit drop as select * from ({candidates}) as _candidates "
        "where not exists (select from {keys} as k where {in_keys})").format(
        gone=gone, candidates=target_in_spans, keys=keys,
        in_keys=sql.SQL(" and ").join(sql.SQL("k.{0} = _candidates.{0}").format(sql.Identifier(c)) for c in key)),
        target_params)
    tgt.execute(sql.SQL("analyze {}").format(gone))
    match = sql.SQL(" and ").join(sql.SQL("t.{0} = _gone.{0}").format(sql.Identifier(c)) for c in key)
    if not soft:
        statement = sql.SQL("delete from {} as t using {} as _gone where {}").format(names.target, gone, match)
    else:
        statement = sql.SQL("update {} as t set {} = now() from {} as _gone where {} and t.{} is null").format(
            names.target, sql.Identifier(SOFT_DELETE_COLUMN), gone, match, sql.Identifier(SOFT_DELETE_COLUMN))
    cursor = tgt.execute(statement)
    return max(cursor.rowcount, 0)


# --- one attempt, retries, the public entry point ----------------------------------------------


def _open_snapshot(src: psycopg.Connection) -> None:
    src.rollback()
    src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    src.read_only = True
    src.execute("select 1")


def _target_rows(names: _Names, shape: Shape, plan: TargetPlan) -> RowSet:
    query = sql.SQL("(select {} from {}{})").format(
        _column_list(shape.names), names.target,
        sql.SQL(" where {} is null").format(sql.Identifier(SOFT_DELETE_COLUMN))
        if SOFT_DELETE_COLUMN in plan.extra_columns else sql.SQL(""))
    return RowSet(query)


def _validate_in_snapshot(src: psycopg.Connection, tgt: psycopg.Connection, table: TableConfig, names: _Names,
                          shape: Shape, plan: TargetPlan) -> ValidationResult:
    return compare(
        src, tgt,
        source_rows=RowSet(sql.SQL("({})").format(names.source_rows(shape.names))),
        target_rows=_target_rows(names, shape, plan),
        shape=shape, ranges=table.validation_ranges,
        count_query=user_sql(table.count_query) if table.count_query else None)


def _attempt(source_dsn: str, target_dsn: str, table: TableConfig, report: SyncReport, validate: bool) -> None:
    names = _Names(table)
    with connect(target_dsn, role="target", table=table.name) as tgt, \
            connect(source_dsn, role="source", table=table.name) as src:
        ensure_state_tables(tgt)
        _acquire_run_lock(tgt, table, names.target_text)
        try:
            schema_name, relation = table.source_schema_table
            shape = describe_source(src, table=table.name, schema_name=schema_name, relation=relation,
                                    select=names.select_from_base(), where=names.where(), primary_key=table.primary_key)
            needs_key = table.mode == "incremental"
            if needs_key and not shape.primary_key:
                raise MissingPrimaryKeyError(
                    f"mode incremental needs a primary key and {table.source} has none; set primary_key",
                    table=table.name)
            with src.transaction(force_rollback=True):
                types = user_types(src, shape.columns, table=table.name)
            with tgt.transaction():
                report.schema_changes.extend(ensure_types(tgt, types, table=table.name))
            _open_snapshot(src)
            target_schema, target_relation = table.target_schema_table
            with tgt.transaction():
                plan = prepare_target(tgt, shape, table=table.name, schema_name=target_schema,
                                      relation=target_relation, soft_delete=table.delete_detection == "soft",
                                      need_key=needs_key)
                report.schema_changes.extend(plan.changes)
                report.copy_format = "binary" if plan.binary else "text"
                report.watermark_before = read_watermark(tgt, names.target_text) if table.mode == "incremental" \
                    else None
                if table.mode == "full":
                    _load_full(src, tgt, table, names, shape, plan, report)
                else:
                    _load_incremental(src, tgt, table, names, shape, plan, report, (source_dsn, target_dsn))
                write_state(tgt, report, table.cursor_column)
                record_committed(tgt, report)
            logger.info("%s: committed %d row(s) into %s", table.name, report.rows_read, names.target_text)
            if validate:
                report.validation = _validate_in_snapshot(src, tgt, table, names, shape, plan)
            src.rollback()
        finally:
            _release_run_lock(tgt, names.target_text)


def _reset_counts(report: SyncReport) -> None:
    report.rows_read = report.rows_inserted = report.rows_updated = report.rows_deleted = report.bytes = 0
    report.schema_changes = []
    report.watermark_before = report.watermark_after = None
    report.validation = ValidationResult.skipped_result()


def record_committed(tgt: psycopg.Connection, report: SyncReport) -> None:
    """Write the run's audit row inside the data transaction, so that it commits with the data.

    It says success so far; `_record` brings it up to date after the commit (validation, end time).
    """
    report.status = "success"
    report.finished_at = dt.datetime.now(dt.UTC)
    report.duration_s = round((report.finished_at - report.started_at).total_seconds(), 3)
    save_run(tgt, report)


def _record(target_dsn: str, report: SyncReport) -> None:
    """The run's final audit row: the committed row updated, or a new row for a run that committed nothing."""
    try:
        with psycopg.connect(target_dsn, connect_timeout=10, application_name="copy_engine") as conn:
            ensure_state_tables(conn)
            save_run(conn, report)
    except (psycopg.Error, CopyEngineError) as error:
        logger.warning("%s: could not append the run to _copy_engine.sync_runs: %s", report.table,
                       (str(error).splitlines() or [""])[0])


def sync_table(
    source_dsn: str,
    target_dsn: str,
    table: TableConfig,
    *,
    validate: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncReport:
    """Copy one table from the source database into the warehouse and return the run report.

    Raises a `CopyEngineError` subclass on failure (its `.report` holds the failed run's report):
    `TransientError` after the retries are spent, `TerminalError` at once.
    """
    source = table.source if not table.select else f"{table.source} (custom select)"
    report = SyncReport(table=table.name, source=source, target=".".join(table.target_schema_table), mode=table.mode)
    if table.large and table.parallel == 1 and table.mode == "full":
        table = table.with_overrides(parallel=2)
    report.workers = table.parallel
    should_validate = table.validate if validate is None else validate
    started = time.monotonic()
    logger.info("%s: %s sync %s -> %s (target %s)", table.name, table.mode, report.source, report.target,
                mask_dsn(target_dsn))
    try:
        for attempt in range(1, table.retries + 2):
            report.attempts = attempt
            try:
                try:
                    if report.workers > 1:
                        from ._parallel import attempt_parallel

                        attempt_parallel(source_dsn, target_dsn, table, report, should_validate)
                    else:
                        _attempt(source_dsn, target_dsn, table, report, should_validate)
                except psycopg.Error as error:
                    raise_classified(error, table=table.name, doing="the sync")
                break
            except TransientError as error:
                if isinstance(error, ConcurrentRunError) or attempt > table.retries:
                    raise
                delay = table.retry_backoff_s * (2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                logger.warning("%s: attempt %d failed (%s); retrying in %.1fs", table.name, attempt, error.message,
                               delay)
                _reset_counts(report)
                sleep(delay)
        if report.validation.match is False:
            raise ValidationMismatchError(
                f"validation found {len(report.validation.differing_ranges)} differing key range(s) "
                f"(source {report.validation.source_rows} rows, target {report.validation.target_rows}); "
                f"first differing keys {report.validation.differing_keys[:5]}; check for writes to the target "
                "outside the engine and run a full sync",
                table=table.name, details=report.validation.to_dict())
        report.status = "success"
    except CopyEngineError as error:
        report.status = "failed"
        report.error = str(error)
        report.error_type = type(error).__name__
        error.report = report
        _finish(report, started)
        logger.error("%s", report.summary())
        _record(target_dsn, report)
        raise
    _finish(report, started)
    logger.info("%s", report.summary())
    _record(target_dsn, report)
    return report


def _finish(report: SyncReport, started: float) -> None:
    report.finished_at = dt.datetime.now(dt.UTC)
    report.duration_s = round(time.monotonic() - started, 3)
    report.rows_per_s = round(report.rows_read / report.duration_s, 1) if report.duration_s > 0 else 0.0
    report.peak_memory_mb = _peak_memory_mb()


def validate_table(source_dsn: str, target_dsn: str, table: TableConfig) -> ValidationResult:
    """Compare source and target now, without syncing."""
    names = _Names(table)
    try:
        with connect(target_dsn, role="target", table=table.name) as tgt, \
                connect(source_dsn, role="source", table=table.name) as src:
            schema_name, relation = table.source_schema_table
            shape = describe_source(src, table=table.name, schema_name=schema_name, relation=relation,
                                    select=names.select_from_base(), where=names.where(), primary_key=table.primary_key)
            target_schema, target_relation = table.target_schema_table
            with tgt.transaction(force_rollback=True):
                from ._schema import relation_oid

                if relation_oid(tgt, target_schema, target_relation) is None:
                    raise TerminalError(f"target table {names.target_text} does not exist; run a sync first",
                                        table=table.name)
                has_soft = tgt.execute(
                    "select 1 from information_schema.columns where table_schema = %s and table_name = %s "
                    "and column_name = %s", (target_schema, target_relation, SOFT_DELETE_COLUMN)).fetchone()
            plan = TargetPlan(shape.names, [SOFT_DELETE_COLUMN] if has_soft else [], True)
            _open_snapshot(src)
            result = _validate_in_snapshot(src, tgt, table, names, shape, plan)
            src.rollback()
            return result
    except psycopg.Error as error:
        raise_classified(error, table=table.name, doing="the validation")

