"""Full copy of one large table by key ranges, every worker reading one exported snapshot.

The workers COPY their ranges into an unlogged staging table in the warehouse in parallel; one
final transaction then replaces the target's rows from it, so readers still see the old rows or
the new ones. A run killed before that transaction leaves only the staging table, which the next
run drops and recreates.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ._config import TableConfig
from ._connect import connect
from ._errors import SourceError
from ._report import SyncReport
from ._schema import Shape, TargetPlan, describe_source, ensure_types, prepare_target, user_types
from ._state import STATE_SCHEMA, ensure_state_tables, write_state
from ._validate import RowSet, boundaries

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyRange:
    """Rows with `lower <= key < upper` on the first primary-key column; None is unbounded."""

    lower: str | None
    upper: str | None

    def condition(self, key: str, key_type: str) -> tuple[list[sql.Composable], dict[str, object]]:
        conditions: list[sql.Composable] = []
        params: dict[str, object] = {}
        if self.lower is not None:
            conditions.append(sql.SQL("{} >= %(lower)s::{}").format(sql.Identifier(key), sql.SQL(key_type)))
            params["lower"] = self.lower
        if self.upper is not None:
            conditions.append(sql.SQL("{} < %(upper)s::{}").format(sql.Identifier(key), sql.SQL(key_type)))
            params["upper"] = self.upper
        return conditions, params


def split_ranges(bounds: list[str]) -> list[KeyRange]:
    edges: list[str | None] = [None, *bounds, None]
    return [KeyRange(edges[index], edges[index + 1]) for index in range(len(edges) - 1)]


def _stage_name(table: TableConfig) -> sql.Identifier:
    schema, relation = table.target_schema_table
    return sql.Identifier(STATE_SCHEMA, f"stage_{schema}_{relation}"[:63])


def _copy_range(source_dsn: str, target_dsn: str, table: TableConfig, snapshot: str, shape: Shape,
                plan: TargetPlan, key_range: KeyRange) -> tuple[int, int]:
    from ._sync import _Names, _stream

    names = _Names(table)
    key = shape.column(shape.primary_key[0])
    assert key is not None
    with connect(source_dsn, role="source", table=table.name) as src, \
            connect(target_dsn, role="target", table=table.name) as tgt:
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        src.read_only = True
        src.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(snapshot)))
        conditions, params = key_range.condition(key.name, key.type_sql)
        result = _stream(src, names.copy_source(plan.columns, *conditions), params, tgt, _stage_name(table),
                         plan.columns, binary=plan.binary)
        tgt.commit()
        src.rollback()
    return result


def attempt_parallel(source_dsn: str, target_dsn: str, table: TableConfig, report: SyncReport,
                     validate: bool) -> None:
    from ._sync import (
        _acquire_run_lock,
        _column_list,
        _drop_primary_key,
        _Names,
        _open_snapshot,
        _release_run_lock,
        _set_lock_timeout,
        _validate_in_snapshot,
    )

    names = _Names(table)
    stage = _stage_name(table)
    with connect(target_dsn, role="target", table=table.name) as tgt, \
            connect(source_dsn, role="source", table=table.name) as src:
        ensure_state_tables(tgt)
        _acquire_run_lock(tgt, table, names.target_text)
        try:
            schema_name, relation = table.source_schema_table
            shape = describe_source(src, table=table.name, schema_name=schema_name, relation=relation,
                                    select=names.select_from_base(), where=names.where(),
                                    primary_key=table.primary_key)
            if not shape.primary_key:
                raise SourceError("a parallel copy splits by primary key and the source has none; set "
                                  "primary_key or parallel: 1", table=table.name)
            with src.transaction(force_rollback=True):
                types = user_types(src, shape.columns, table=table.name)
            target_schema, target_relation = table.target_schema_table
            with tgt.transaction():
                report.schema_changes.extend(ensure_types(tgt, types))
                plan = prepare_target(tgt, shape, table=table.name, schema_name=target_schema,
                                      relation=target_relation, soft_delete=False, need_key=True)
                report.schema_changes.extend(plan.changes)
                report.copy_format = "binary" if plan.binary else "text"
                tgt.execute(sql.SQL("drop table if exists {}").format(stage))
                tgt.execute(sql.SQL("create unlogged table {} as select {} from {} with no data").format(
                    stage, _column_list(plan.columns), names.target))
            _open_snapshot(src)
            row = src.execute("select pg_export_snapshot()").fetchone()
            assert row is not None
            snapshot = str(row[0])
            key = shape.column(shape.primary_key[0])
            assert key is not None
            bounds = boundaries(src, RowSet(sql.SQL("({})").format(names.source_rows([key.name]))), key.name,
                                 key.type_sql, table.parallel)
            ranges = split_ranges(bounds)
            logger.info("%s: copying %d key range(s) with %d worker(s)", table.name, len(ranges), table.parallel)
            with ThreadPoolExecutor(max_workers=table.parallel) as pool:
                results = list(pool.map(
                    lambda part: _copy_range(source_dsn, target_dsn, table, snapshot, shape, plan, part), ranges))
            report.rows_read = sum(rows for rows, _ in results)
            report.bytes = sum(size for _, size in results)
            with tgt.transaction():
                _set_lock_timeout(tgt, table)
                tgt.execute(sql.SQL("lock table {} in access exclusive mode").format(names.target))
                before = tgt.execute(sql.SQL("select count(*) from {}").format(names.target)).fetchone()
                report.rows_deleted = int(before[0]) if before else 0
                constraint = _drop_primary_key(tgt, names, shape)
                tgt.execute(sql.SQL("truncate {}").format(names.target))
                inserted = tgt.execute(sql.SQL("insert into {} ({}) select {} from {}").format(
                    names.target, _column_list(plan.columns), _column_list(plan.columns), stage))
                report.rows_inserted = max(inserted.rowcount, 0)
                if constraint:
                    tgt.execute(sql.SQL("alter table {} add constraint {} primary key ({})").format(
                        names.target, sql.Identifier(constraint), _column_list(list(shape.primary_key))))
                tgt.execute(sql.SQL("drop table {}").format(stage))
                write_state(tgt, report, table.cursor_column)
            if validate:
                report.validation = _validate_in_snapshot(src, tgt, table, names, shape, plan)
            src.rollback()
        finally:
            _release_run_lock(tgt, names.target_text)
