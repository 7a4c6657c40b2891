"""Connections with fixed output settings, DSN masking and the mapping of driver errors."""

from __future__ import annotations

import re
from typing import NoReturn

import psycopg
from psycopg import errors as pg_errors

from ._errors import (
    ConnectionFailedError,
    ConnectionRejectedError,
    CopyEngineError,
    SourceError,
    TerminalError,
    TransientError,
)

# Text output of dates, intervals, floats and bytea depends on these; both ends use the same ones
# so text COPY and the validation checksums are exact.
SESSION_OPTIONS = (
    "-c DateStyle=ISO,YMD -c IntervalStyle=postgres -c TimeZone=UTC -c extra_float_digits=3 "
    "-c bytea_output=hex -c client_encoding=UTF8 -c temp_buffers=64MB"
)

_URI_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)(@)")
_KEYWORD_PASSWORD = re.compile(r"(?<![?&])(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ***, safe to log."""
    masked = _URI_PASSWORD.sub(r"\1***\3", dsn)
    masked = _KEYWORD_PASSWORD.sub(r"\1***", masked)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", masked)


_REJECTED = ("does not exist", "authentication failed", "no pg_hba.conf entry", "permission denied")


def connect(dsn: str, *, role: str, table: str | None, application_name: str = "copy_engine") -> psycopg.Connection:
    try:
        return psycopg.connect(
            dsn, options=SESSION_OPTIONS, application_name=application_name, connect_timeout=10
        )
    except psycopg.OperationalError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        reason = reason.replace(dsn, mask_dsn(dsn))
        if any(marker in reason for marker in _REJECTED):
            raise ConnectionRejectedError(
                f"the {role} database {mask_dsn(dsn)} refused the connection ({reason}); fix the connection "
                "string, the database name or the credentials",
                table=table,
            ) from error
        raise ConnectionFailedError(
            f"cannot connect to the {role} database {mask_dsn(dsn)} ({reason}); check that the server "
            "is running and the connection string is right",
            table=table,
        ) from error


_TRANSIENT = (
    pg_errors.SerializationFailure,
    pg_errors.DeadlockDetected,
    pg_errors.LockNotAvailable,
    pg_errors.AdminShutdown,
    pg_errors.CrashShutdown,
    pg_errors.CannotConnectNow,
    pg_errors.TooManyConnections,
)


def raise_classified(error: BaseException, *, table: str, doing: str) -> NoReturn:
    """Re-raise a driver error as a transient or terminal CopyEngineError naming the table."""
    if isinstance(error, CopyEngineError):
        raise error
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    sqlstate = getattr(error, "sqlstate", None)
    connection_lost = isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)) and (
        sqlstate is None or sqlstate[:2] in ("08", "53") or sqlstate.startswith("57P")
    )
    if isinstance(error, _TRANSIENT) or connection_lost:
        raise TransientError(f"{doing} failed transiently ({text}); the run will be retried", table=table) \
            from error
    if isinstance(error, (pg_errors.UndefinedTable, pg_errors.UndefinedColumn, pg_errors.SyntaxError,
                          pg_errors.UndefinedFunction, pg_errors.InsufficientPrivilege)):
        raise SourceError(f"{doing} failed: {text}; fix the table name or the custom SQL in the configuration",
                          table=table) from error
    raise TerminalError(f"{doing} failed: {text}", table=table) from error
