"""The dbt project without a database (parse, lint) and node by node, as Cosmos runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from include.dbt_project import dbt_arguments
from include.demo_data import generate
from tests.conftest import PostgresServer
from tests.dbt.conftest import DBT_PROJECT, EVENTS, SECURITIES, dbt_env, run_dbt


def test_parse_needs_no_database(tmp_path: Path) -> None:
    # Port 9 (discard) has no PostgreSQL: parse must not try to connect.
    run_dbt(["parse"], dsn="postgresql://nobody@127.0.0.1:9/nowhere", work_dir=tmp_path)
    manifest = json.loads((tmp_path / "target" / "manifest.json").read_text())
    assert manifest["metadata"]["project_name"] == "postgres_analytics"
    nodes = {node["name"]: node for node in manifest["nodes"].values()}
    for name, schema in {
        "snp_stock_master": "snapshots",
        "snp_edi_690": "snapshots",
        "stg_stock_master": "staging",
        "stg_edi_690": "staging",
        "stg_exchanges": "staging",
        "int_event_summary": "intermediate",
        "dim_securities": "marts",
        "fact_events": "marts",
        "fact_cash_dividends_yearly": "marts",
        "fact_split_adjustment_factors": "marts",
    }.items():
        assert nodes[name]["schema"] == schema, name
    assert {node["config"]["hard_deletes"] for node in nodes.values() if node["resource_type"] == "snapshot"} == {
        "new_record"
    }
    assert len(manifest["unit_tests"]) >= 5


def test_sql_passes_sqlfluff(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "sqlfluff"), "lint", "models", "snapshots", "tests", "--nocolor"],
        cwd=DBT_PROJECT,
        env=dbt_env(None, tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# One interpreter runs dbt's programmatic entry point for every node, as Cosmos's tasks would:
# `dbt build --select node` runs the node alone, then its unit and data tests.
_NODE_BY_NODE = textwrap.dedent(
    """
    import json, sys
    from dbt.cli.main import dbtRunner

    common = sys.argv[1:]
    runner = dbtRunner()
    failures = []
    for node in ["snp_stock_master", "snp_edi_690", "stg_exchanges", "stg_stock_master", "stg_edi_690",
                 "int_event_summary", "dim_securities", "fact_events", "fact_cash_dividends_yearly",
                 "fact_split_adjustment_factors"]:
        result = runner.invoke(["build", "--select", node, "--quiet", *common])
        if not result.success:
            failures.append(f"build {node}: {result.exception}")
    print(json.dumps(failures))
    """
)


def test_each_node_runs_alone_with_its_tests(pg18: PostgresServer, tmp_path: Path) -> None:
    dsn = pg18.new_database("dbt_nodes")
    try:
        generate(dsn, securities=SECURITIES // 3, events=EVENTS // 3, schema="raw")
        env = dbt_env(dsn, tmp_path)
        common = [
            *dbt_arguments(DBT_PROJECT, tmp_path / "profiles"),
            "--target-path",
            str(tmp_path / "target"),
            "--log-path",
            str(tmp_path / "logs"),
        ]
        result = subprocess.run(
            [sys.executable, "-c", _NODE_BY_NODE, *common],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == [], result.stdout[-4000:]
    finally:
        pg18.drop_database(dsn)
