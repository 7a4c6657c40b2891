"""The COPY pump: a source `COPY … TO STDOUT` streamed into a target `COPY … FROM STDIN`.

The rows pass through as bytes (binary or text COPY format): nothing is decoded in Python, and
memory stays bounded whatever the table's size.
"""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg import pq, sql

logger = logging.getLogger(__name__)

_WRITE_BATCH = 256 * 1024
PROGRESS_EVERY_S = 5.0  # how often a running COPY logs its rows, MB and rate


class TableColumns(sql.Composed):
    """`table (columns)`: a whole source table, for the plain `COPY table TO` form."""

    def __init__(self, table: sql.Composable, columns: list[str]) -> None:
        super().__init__([table, sql.SQL(" ("), sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                          sql.SQL(")")])



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


def stream(src: psycopg.Connection, query: sql.Composable, params: dict[str, object],
            tgt: psycopg.Connection, into: sql.Composable, columns: list[str], *, binary: bool,
            progress: str | None = None, freeze: bool = False) -> tuple[int, int]:
    """COPY the query's rows from `src` into `into` on `tgt`; returns (rows, bytes). Memory stays bounded.

    With a `progress` label, a long COPY logs how far it got every few seconds.
    """
    options = [sql.SQL("format binary")] if binary else []
    in_options = list(options) + ([sql.SQL("freeze")] if freeze else [])
    source = query if isinstance(query, TableColumns) else sql.SQL("({})").format(query)
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
