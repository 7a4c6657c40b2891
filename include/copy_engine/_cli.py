"""`python -m include.copy_engine sync|validate|drop-replication ...`: the last line of standard output is JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._api import drop_unconfigured_replication, sync_table, validate_table
from ._config import TableConfig, load_config
from ._errors import ConfigError, CopyEngineError
from ._report import SyncReport

logger = logging.getLogger(__name__)

SOURCE_ENV = "SOURCE_DATABASE_URL"
TARGET_ENV = "WAREHOUSE_DATABASE_URL"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m include.copy_engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("sync", "validate"):
        command = commands.add_parser(name, help=f"{name} one table (or every configured table)")
        command.add_argument("--source", help=f"source DSN (default ${SOURCE_ENV} with --config)")
        command.add_argument("--target", help=f"warehouse DSN (default ${TARGET_ENV} with --config)")
        command.add_argument("--config", help="YAML table configuration")
        command.add_argument("--table", help="SCHEMA.NAME in the source, or a configured table name")
        command.add_argument("--target-table", help="SCHEMA.NAME in the target (default: same as --table)")
        command.add_argument("--primary-key", help="COL[,COL...] (default: the source's primary key)")
        command.add_argument("--select", help="custom select used as the source")
        command.add_argument("--where", help="custom where condition on the source rows")
        command.add_argument("--count", help="custom count query for validation")
        command.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
        if name == "sync":
            command.add_argument("--mode", choices=("full", "incremental", "cdc"))
            command.add_argument("--cursor-column")
            command.add_argument("--lookback", help="PostgreSQL interval, such as '1 hour'")
            command.add_argument("--delete-detection", choices=("hard", "soft", "none"))
            command.add_argument("--parallel", type=int, help="workers for a full copy of one large table")
            command.add_argument("--no-validate", action="store_true")
    drop = commands.add_parser(
        "drop-replication", help="drop the replication slot and publication of each CDC table no longer configured")
    drop.add_argument("--source", help=f"source DSN (default ${SOURCE_ENV})")
    drop.add_argument("--target", help=f"warehouse DSN (default ${TARGET_ENV})")
    drop.add_argument("--config", required=True, help="YAML table configuration: the tables to keep")
    drop.add_argument("--dry-run", action="store_true", help="only list what would be dropped")
    drop.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def _tables(args: argparse.Namespace) -> list[TableConfig]:
    overrides: dict[str, Any] = {
        "primary_key": args.primary_key, "select": args.select, "where": args.where, "count_query": args.count,
        "mode": getattr(args, "mode", None), "cursor_column": getattr(args, "cursor_column", None),
        "lookback": getattr(args, "lookback", None), "parallel": getattr(args, "parallel", None),
        "delete_detection": getattr(args, "delete_detection", None),
    }
    if args.target_table:
        overrides["target"] = args.target_table
    if args.config:
        config = load_config(args.config)
        tables = [config.table(args.table)] if args.table else list(config.tables)
        return [table.with_overrides(**overrides) for table in tables]
    if not args.table:
        raise ConfigError("give --table SCHEMA.NAME (or --config FILE)")
    overrides.setdefault("target", None)
    fields = {key: value for key, value in overrides.items() if value is not None}
    fields.setdefault("target", args.table)
    return [TableConfig(name=args.table, source=args.table, **fields)]


def _dsn(value: str | None, env: str, role: str, *, from_config: bool) -> str:
    if value:
        return value
    if from_config and os.environ.get(env):
        return os.environ[env]
    raise ConfigError(f"no {role} database: give --{role}" + (f" or set {env}" if from_config else ""))


def _failed_report(args: argparse.Namespace, error: CopyEngineError) -> dict[str, Any]:
    if error.report is not None:
        return error.report.to_dict()
    now = dt.datetime.now(dt.UTC)
    report = SyncReport(table=error.table or args.table or "?", source=args.table or "?",
                        target=args.target_table or args.table or "?", mode=getattr(args, "mode", None) or "full",
                        started_at=now, finished_at=now, error=str(error), error_type=type(error).__name__)
    return report.to_dict()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "drop-replication":
        return _drop_replication(args)
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        source = _dsn(args.source, SOURCE_ENV, "source", from_config=bool(args.config))
        target = _dsn(args.target, TARGET_ENV, "target", from_config=bool(args.config))
        tables = _tables(args)
    except CopyEngineError as error:
        print(f"error: {error}", file=sys.stderr)
        print(json.dumps(_failed_report(args, error)))
        return 2
    for table in tables:
        try:
            if args.command == "sync":
                report = sync_table(source, target, table, validate=False if args.no_validate else None)
                results.append(report.to_dict())
            else:
                result = validate_table(source, target, table)
                data = {"status": "success" if result.match else "failed", "table": table.name,
                        "target": table.target, "validation": result.to_dict()}
                if not result.match:
                    failures.append(f"{table.name}: validation mismatch in "
                                    f"{len(result.differing_ranges)} key range(s)")
                results.append(data)
        except CopyEngineError as error:
            failures.append(str(error))
            results.append(_failed_report(args, error))
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if len(results) == 1:
        print(json.dumps(results[0], default=str))
    else:
        summary: dict[str, Any] = {"status": "failed" if failures else "success", "tables": results}
        for key in ("rows_read", "rows_inserted", "rows_updated", "rows_deleted", "rows_replaced"):
            summary[key] = sum(int(item.get(key) or 0) for item in results)
        summary["duration_s"] = round(sum(float(item.get("duration_s") or 0) for item in results), 3)
        summary["validation"] = {"match": all(item.get("validation", {}).get("match") is not False
                                              for item in results)}
        print(json.dumps(summary, default=str))
    return 1 if failures else 0


def _drop_replication(args: argparse.Namespace) -> int:
    try:
        source = _dsn(args.source, SOURCE_ENV, "source", from_config=True)
        target = _dsn(args.target, TARGET_ENV, "target", from_config=True)
        dropped = drop_unconfigured_replication(source, target, load_config(args.config), dry_run=args.dry_run)
    except CopyEngineError as error:
        print(f"error: {error}", file=sys.stderr)
        print(json.dumps({"status": "failed", "error": str(error)}))
        return 1
    print(json.dumps({"status": "success", "dry_run": args.dry_run, "dropped": dropped}))
    return 0
