"""Typed table configuration and the YAML file that holds it."""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from ._errors import ConfigError

Mode = Literal["full", "incremental", "cdc"]
DeleteDetection = Literal["hard", "soft", "none"]

_MODES = ("full", "incremental", "cdc")
_DELETE_DETECTIONS = ("hard", "soft", "none")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


def split_qualified(name: str, *, default_schema: str = "public") -> tuple[str, str]:
    """`schema.table` -> (schema, table); a bare name is in `default_schema`. Quotes are allowed."""
    parts = [part.strip() for part in _split_dotted(name)]
    if len(parts) == 1:
        return default_schema, parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise ConfigError(f"{name!r} is not a table name of the form schema.table")


def _split_dotted(name: str) -> list[str]:
    parts: list[str] = []
    current = ""
    quoted = False
    index = 0
    while index < len(name):
        char = name[index]
        if char == '"':
            if quoted and name[index + 1 : index + 2] == '"':
                current += '"'
                index += 1
            else:
                quoted = not quoted
        elif char == "." and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
        index += 1
    parts.append(current)
    return parts


@dataclass(frozen=True)
class TableConfig:
    """How one table is copied. Only `source` (or `name`) is required.

    `lookback` is a PostgreSQL interval (``"1 hour"``) subtracted from the watermark so rows that
    commit late are still picked up. `select`, `where` and `count_query` are user SQL by design.
    """

    name: str
    source: str = ""
    target: str = ""
    mode: Mode = "full"
    primary_key: tuple[str, ...] | None = None
    cursor_column: str | None = None
    lookback: str | None = None
    delete_detection: DeleteDetection = "none"
    select: str | None = None
    where: str | None = None
    count_query: str | None = None
    validate: bool = True
    parallel: int = 1
    retries: int = 3
    retry_backoff_s: float = 1.0
    lock_wait_s: float = 60.0
    lock_timeout_s: float = 30.0
    validation_ranges: int = 16

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("every table needs a name")
        source = self.source or self.name
        object.__setattr__(self, "source", source)
        if not self.target:
            object.__setattr__(self, "target", f"raw.{split_qualified(source)[1]}")
        split_qualified(self.target)
        if self.mode not in _MODES:
            raise ConfigError(f"mode must be one of {', '.join(_MODES)}, not {self.mode!r}", table=self.name)
        if self.delete_detection not in _DELETE_DETECTIONS:
            raise ConfigError(
                f"delete_detection must be one of {', '.join(_DELETE_DETECTIONS)}, not {self.delete_detection!r}",
                table=self.name,
            )
        if self.primary_key is not None:
            keys = (self.primary_key,) if isinstance(self.primary_key, str) else tuple(self.primary_key)
            keys = tuple(part.strip() for key in keys for part in key.split(",") if part.strip())
            if not keys:
                raise ConfigError("primary_key is empty", table=self.name)
            object.__setattr__(self, "primary_key", keys)
        if isinstance(self.lookback, dt.timedelta):
            object.__setattr__(self, "lookback", f"{self.lookback.total_seconds()} seconds")
        if self.mode == "incremental" and not self.cursor_column:
            raise ConfigError(
                "mode incremental needs cursor_column (the column such as updated_at that grows on change)",
                table=self.name,
            )
        if self.mode == "cdc" and (self.select or self.where):
            raise ConfigError("mode cdc reads the source table's own changes; it takes no select or where "
                              "(sync a view of it with mode full or incremental instead)", table=self.name)
        if self.mode == "cdc" and self.delete_detection == "soft":
            raise ConfigError("mode cdc applies the source's deletes as deletes; delete_detection soft is not "
                              "supported with it (leave delete_detection out)", table=self.name)
        if isinstance(self.parallel, bool) or not isinstance(self.parallel, int) or self.parallel < 1:
            raise ConfigError(f"parallel must be a whole number of key ranges, at least 1 (such as parallel: 4), "
                              f"not {self.parallel!r}", table=self.name)
        if self.mode == "cdc" and self.parallel > 1:
            raise ConfigError("mode cdc copies its first load in one stream from the replication slot's snapshot; "
                              "remove parallel", table=self.name)
        # An incremental table with `parallel` splits only its full copies (the first load).
        if self.retries < 0 or self.validation_ranges < 1:
            raise ConfigError("retries must be >= 0 and validation_ranges >= 1", table=self.name)

    @property
    def source_schema_table(self) -> tuple[str, str]:
        return split_qualified(self.source)

    @property
    def target_schema_table(self) -> tuple[str, str]:
        return split_qualified(self.target)

    def with_overrides(self, **changes: Any) -> TableConfig:
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None) -> TableConfig:
        known = {item.name for item in fields(cls)}
        merged = {**(defaults or {}), **raw}
        unknown = sorted(set(merged) - known)
        name = str(merged.get("name") or merged.get("source") or "?")
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                              table=name)
        if "name" not in merged and "source" in merged:
            merged["name"] = split_qualified(str(merged["source"]))[1]
        try:
            return cls(**merged)
        except TypeError as error:
            raise ConfigError(f"invalid table settings: {error}", table=name) from error


@dataclass(frozen=True)
class EngineConfig:
    """All configured tables, looked up by name with `table()`."""

    tables: list[TableConfig] = field(default_factory=list)
    path: str | None = None

    def table(self, name: str) -> TableConfig:
        for table in self.tables:
            if name in (table.name, table.source, table.target):
                return table
        known = ", ".join(table.name for table in self.tables) or "none"
        raise ConfigError(f"no table named {name!r} in {self.path or 'the configuration'}; configured: {known}")

    @property
    def names(self) -> list[str]:
        return [table.name for table in self.tables]


def parse_config(raw: Any, *, path: str | None = None) -> EngineConfig:
    where = path or "the configuration"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("tables"), list):
        raise ConfigError(f"{where} must be a mapping with a list under `tables:`")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"`defaults:` in {where} must be a mapping")
    tables: list[TableConfig] = []
    for index, entry in enumerate(raw["tables"]):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"entry {index} under `tables:` in {where} is not a mapping")
        tables.append(TableConfig.from_mapping(entry, defaults=defaults))
    _check_unique(table.name for table in tables)
    return EngineConfig(tables=tables, path=path)


def _check_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"table name {name!r} appears twice")
        seen.add(name)


def load_config(path: str | os.PathLike[str]) -> EngineConfig:
    """Read the YAML table configuration (see docs/copy_engine.md for the format)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read the configuration file {file}: {error.strerror}") from error
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{file} is not valid YAML: {error}") from error
    return parse_config(raw, path=str(file))


def is_simple_name(name: str) -> bool:
    return bool(_NAME.match(name))
