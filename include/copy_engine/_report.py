"""The run report: what one sync or validation did, as a summary line and as JSON."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["success", "failed"]


@dataclass
class RangeDifference:
    """One primary-key range whose row count or checksum differs between source and target."""

    lower: str | None
    upper: str | None
    source_rows: int
    target_rows: int


@dataclass
class ValidationResult:
    match: bool | None
    skipped: bool = False
    source_rows: int | None = None
    target_rows: int | None = None
    ranges_checked: int = 0
    differing_ranges: list[RangeDifference] = field(default_factory=list)
    differing_keys: list[list[str | None]] = field(default_factory=list)
    duration_s: float = 0.0

    @classmethod
    def skipped_result(cls) -> ValidationResult:
        return cls(match=None, skipped=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SyncReport:
    """The result of one run for one table. `to_dict()` is JSON-serialisable and holds no secrets."""

    table: str
    source: str
    target: str
    mode: str
    status: Status = "failed"
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    finished_at: dt.datetime | None = None
    rows_read: int = 0
    rows_inserted: int = 0
    rows_updated: int = 0
    rows_deleted: int = 0
    rows_replaced: int = 0  # a full copy: rows written in place of a row with the same key
    bytes: int = 0
    duration_s: float = 0.0
    rows_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    watermark_before: str | None = None
    watermark_after: str | None = None
    schema_changes: list[str] = field(default_factory=list)
    validation: ValidationResult = field(default_factory=ValidationResult.skipped_result)
    copy_format: str | None = None
    attempts: int = 0
    workers: int = 1
    error: str | None = None
    error_type: str | None = None
    run_id: int | None = None  # the run's row in _copy_engine.sync_runs
    # CDC only, as the run left the slot: WAL the source keeps for it, and WAL it has not confirmed.
    slot_retained_wal_bytes: int | None = None
    slot_lag_bytes: int | None = None
    # What an operator must know about this run, such as a CDC slot found invalidated.
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        data["validation"] = self.validation.to_dict()
        return data

    def summary(self) -> str:
        if self.status == "failed" and self.validation.match is None:
            check = "not validated"
        elif self.validation.skipped:
            check = "validation off"
        elif self.validation.match:
            check = "validated"
        elif self.validation.match is None:
            check = "not validated"
        else:
            check = f"VALIDATION MISMATCH in {len(self.validation.differing_ranges)} range(s)"
        replaced = f", replaced {self.rows_replaced}" if self.rows_replaced else ""
        line = (
            f"{self.table} [{self.mode}] {self.status}: read {self.rows_read}, inserted {self.rows_inserted}, "
            f"updated {self.rows_updated}, deleted {self.rows_deleted}{replaced} in {self.duration_s:.2f}s "
            f"({self.rows_per_s:,.0f} rows/s), {check}"
        )
        if self.schema_changes:
            line += f", {len(self.schema_changes)} schema change(s)"
        if self.notes:
            line += "; " + "; ".join(self.notes)
        if self.error:
            line += f"; error: {self.error}"
        return line
