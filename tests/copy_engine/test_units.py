"""Pieces that need no database: DSN masking, widening rules, report shape."""

from __future__ import annotations

import json

import pytest

from include.copy_engine import SyncReport, mask_dsn
from include.copy_engine._schema import is_safe_widening


@pytest.mark.parametrize(("dsn", "masked"), [
    ("postgresql://etl:p%40ss@db:5432/src", "postgresql://etl:***@db:5432/src"),
    ("host=db user=etl password=secret dbname=src", "host=db user=etl password=*** dbname=src"),
    ("host=db password='a b' dbname=src", "host=db password=*** dbname=src"),
    ("postgresql://db/src?user=etl&password=secret&sslmode=require",
     "postgresql://db/src?user=etl&password=***&sslmode=require"),
    ("postgresql://etl@db/src", "postgresql://etl@db/src"),
])
def test_mask_dsn(dsn, masked):
    assert mask_dsn(dsn) == masked


@pytest.mark.parametrize(("old", "new", "safe"), [
    ("integer", "bigint", True), ("smallint", "numeric", True), ("bigint", "integer", False),
    ("real", "double precision", True), ("double precision", "real", False),
    ("numeric(10,2)", "numeric(12,4)", True), ("numeric(10,2)", "numeric(10,4)", False),
    ("numeric(10,2)", "numeric", True), ("numeric", "numeric(38,10)", False),
    ("character varying(10)", "character varying(50)", True), ("character varying(10)", "text", True),
    ("character varying(50)", "character varying(10)", False), ("text", "integer", False),
    ("bit varying(3)", "bit varying", True), ("timestamp without time zone", "timestamp with time zone", False),
])
def test_widening_rules(old, new, safe):
    assert is_safe_widening(old, new) is safe


def test_report_is_json_with_a_one_line_summary():
    report = SyncReport(table="t", source="public.t", target="raw.t", mode="incremental", status="success",
                        rows_read=5, rows_inserted=3, rows_updated=2, duration_s=0.5, rows_per_s=10)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["validation"]["match"] is None and data["validation"]["skipped"] is True
    assert report.summary() == ("t [incremental] success: read 5, inserted 3, updated 2, deleted 0 in 0.50s "
                                "(10 rows/s), validation off")
