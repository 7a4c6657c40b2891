"""A client of the streaming replication protocol for a logical slot, for the CDC bench's comparison of
reading methods (psycopg's libpq calls: psycopg 3 has no replication client).

The walsender sends each transaction as soon as it has decoded its commit, so the client can decode the
first transactions while the server still decodes the later ones, where
`pg_logical_slot_peek_binary_changes` (what the engine uses) returns its first row only after decoding
everything. psycopg2's LogicalReplicationConnection is not used: it confirms a keepalive's position by
itself when no data message came before it (`explicitly_flushed_lsn` in its replication cursor), which
would move the slot past changes that were never applied.

Nothing is confirmed here: every status update reports position 0 (InvalidXLogRecPtr), which the server
takes as "nothing flushed", so the slot's `confirmed_flush_lsn` does not move.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Iterator

import psycopg
from psycopg import pq, sql

from include.copy_engine._cdc import lsn_int, lsn_text

_LSN = struct.Struct("!Q").unpack_from
# Standby status update: 'r', written, flushed and applied positions (0: none), the client's clock
# (microseconds since 2000-01-01), no reply wanted.
_STATUS = struct.Struct("!cQQQqB")
_POSTGRES_EPOCH = 946_684_800  # 2000-01-01 in Unix seconds
_XLOG_DATA, _KEEPALIVE = ord("w"), ord("k")
_HEADER = 25  # 'w', data start, WAL end, send time
_BEGIN, _COMMIT = ord("B"), ord("C")


def stream_changes(conn: psycopg.Connection, name: str, start: str, upto: str, *,
                   binary: bool = False) -> Iterator[bytes]:
    """The slot's pgoutput messages of transactions that commit before `upto`, on a replication connection
    (`replication="database"`) the caller owns; the stream is ended when the iterator is closed or done.

    `start`: the position already applied. The server starts at the slot's `confirmed_flush_lsn` when that
    is later, and skips the transactions that commit before `start` when it is earlier.
    Stops at the first transaction that commits at or after `upto`, or at a keepalive that reports
    having decoded the WAL up to `upto` (every transaction committed before it was sent before it).
    """
    end = lsn_int(upto)
    options = [("proto_version", "1"), ("publication_names", name), *([("binary", "true")] if binary else [])]
    command = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
        sql.Identifier(name), sql.SQL(lsn_text(lsn_int(start))),
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(option), sql.Literal(value))
                           for option, value in options))
    pgconn = conn.pgconn
    result = pgconn.exec_(command.as_bytes(conn))
    if result.status != pq.ExecStatus.COPY_BOTH:
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    try:
        in_transaction = False
        while True:
            size, data = _next(pgconn)
            if size == -1:
                _raise_end(conn, "the server ended the slot's stream before reaching " + upto)
            if data[0] == _XLOG_DATA:
                kind = data[_HEADER]
                if kind == _BEGIN:
                    if _LSN(data, _HEADER + 1)[0] >= end:  # the transaction's commit position
                        return
                    in_transaction = True
                elif kind == _COMMIT:
                    in_transaction = False
                yield bytes(data[_HEADER:])
            elif data[0] == _KEEPALIVE:
                if not in_transaction and _LSN(data, 1)[0] >= end:
                    return
                # Answered every time: servers before 15 ping once until the client speaks, and one that
                # asks for a reply ends the connection without one.
                _send_status(pgconn)
    finally:
        _end_stream(conn)


def _next(pgconn: pq.abc.PGconn) -> tuple[int, memoryview]:
    """The next CopyData message, waiting for the socket without holding the GIL; -1 when the server
    ended the stream."""
    while True:
        size, data = pgconn.get_copy_data(1)
        if size != 0:
            return size, data
        select.select([pgconn.socket], [], [])
        pgconn.consume_input()


def _send_status(pgconn: pq.abc.PGconn) -> None:
    now = int((time.time() - _POSTGRES_EPOCH) * 1_000_000)
    pgconn.put_copy_data(_STATUS.pack(b"r", 0, 0, 0, now, 0))
    pgconn.flush()


def _raise_end(conn: psycopg.Connection, message: str) -> None:
    result = conn.pgconn.get_result()
    if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    raise psycopg.OperationalError(message)


def _end_stream(conn: psycopg.Connection) -> None:
    """End the stream with CopyDone and wait for the server's end of it: the walsender releases the slot
    before it answers, so the slot is free again when this returns."""
    pgconn = conn.pgconn
    if pgconn.status != pq.ConnStatus.OK:
        return
    try:
        pgconn.put_copy_end()
        pgconn.flush()
        while _next(pgconn)[0] != -1:
            pass  # the rest of a transaction the server was sending
        while pgconn.get_result() is not None:
            pass
    except psycopg.Error:
        pass  # the connection is closed next anyway; the server then releases the slot by itself
