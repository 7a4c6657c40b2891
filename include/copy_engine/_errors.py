"""The package's exceptions: one base, split into transient (retry) and terminal (fix something)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._report import SyncReport


class CopyEngineError(Exception):
    """Base of every error the copy engine raises; `table` names the table it concerns."""

    transient = False

    def __init__(self, message: str, *, table: str | None = None) -> None:
        self.table = table
        self.message = message
        self.report: SyncReport | None = None
        super().__init__(f"{table}: {message}" if table else message)


class TransientError(CopyEngineError):
    """A failure that may pass on its own (dropped connection, serialization failure, lock timeout)."""

    transient = True


class TerminalError(CopyEngineError):
    """A failure that repeats until someone fixes the configuration, the source or the target."""


class ConfigError(TerminalError):
    """The configuration file or a table's settings are invalid."""


class SourceError(TerminalError):
    """The source table or the custom SQL cannot be read (missing table, unknown column, bad SQL)."""


class MissingPrimaryKeyError(TerminalError):
    """An incremental table, delete detection or validation needs a primary key and none is known."""


class SchemaConflictError(TerminalError):
    """The target cannot take the source's shape, such as a column type change that is not a widening."""


class ConnectionFailedError(TransientError):
    """A server could not be reached or the connection dropped."""


class ConnectionRejectedError(TerminalError):
    """The server answered but refused the connection: unknown database or role, failed authentication."""


class ConcurrentRunError(TransientError):
    """Another run holds the target table's lock for longer than this run is willing to wait."""

    def __init__(self, message: str, *, table: str | None = None, waited_s: float = 0.0) -> None:
        super().__init__(message, table=table)
        self.waited_s = waited_s


class SnapshotReleasedError(TerminalError):
    """A range or finish step of a parallel copy found its snapshot no longer held.

    The ranges must all read one snapshot, so the copy has to start again from a new plan.
    """


class SwapRefusedError(CopyEngineError):
    """The catalog refused part of a swap; the caller rolls the swap back and writes in place.

    Raised and caught inside the engine: it never reaches a caller of the public API.
    """


class ValidationMismatchError(TerminalError):
    """The sync finished but the target's rows differ from the source's."""

    def __init__(self, message: str, *, table: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, table=table)
        self.details = details or {}
