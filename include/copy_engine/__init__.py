"""Exact, crash-safe, incremental PostgreSQL-to-PostgreSQL table sync at COPY speed.

    from include.copy_engine import load_config, sync_table
    config = load_config("include/config/tables.yml")
    report = sync_table(source_dsn, target_dsn, config.table("stock_master"))

See docs/copy_engine.md for the modes, the configuration format and the report.
"""

from __future__ import annotations

from ._api import drop_unconfigured_replication, finish_parallel_copy, sync_table, validate_table
from ._config import EngineConfig, TableConfig, load_config, parse_config
from ._connect import mask_dsn
from ._errors import (
    ConcurrentRunError,
    ConfigError,
    ConnectionFailedError,
    ConnectionRejectedError,
    CopyEngineError,
    MissingPrimaryKeyError,
    SchemaConflictError,
    SnapshotReleasedError,
    SourceError,
    TerminalError,
    TransientError,
    ValidationMismatchError,
)
from ._parallel import ParallelPlan, abandon_parallel_copy, copy_range, hold_snapshot, plan_parallel_copy
from ._report import RangeDifference, SyncReport, ValidationResult

__all__ = [
    "ConcurrentRunError",
    "ConfigError",
    "ConnectionFailedError",
    "ConnectionRejectedError",
    "CopyEngineError",
    "EngineConfig",
    "MissingPrimaryKeyError",
    "ParallelPlan",
    "RangeDifference",
    "SchemaConflictError",
    "SnapshotReleasedError",
    "SourceError",
    "SyncReport",
    "TableConfig",
    "TerminalError",
    "TransientError",
    "ValidationMismatchError",
    "ValidationResult",
    "abandon_parallel_copy",
    "copy_range",
    "drop_unconfigured_replication",
    "finish_parallel_copy",
    "hold_snapshot",
    "load_config",
    "mask_dsn",
    "parse_config",
    "plan_parallel_copy",
    "sync_table",
    "validate_table",
]
