"""The command line: the last line of standard output is the JSON report; exit 0 only on success."""

from __future__ import annotations

import json
import subprocess
import sys

from .test_full import make_stock


def cli(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "include.copy_engine", *args], capture_output=True, text=True,
                            timeout=120, env=env)
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_sync_validate_and_config(pair, tmp_path, monkeypatch):
    make_stock(pair, 30)
    code, report, _ = cli("sync", "--source", pair.source, "--target", pair.target, "--table", "public.stock_master",
                          "--mode", "incremental", "--cursor-column", "updated_at", "--delete-detection", "hard",
                          "--where", "security_id <= 20")
    assert code == 0
    assert (report["status"], report["rows_read"], report["rows_inserted"], report["target"]) == (
        "success", 20, 20, "public.stock_master")
    assert report["validation"]["match"] is True

    code, result, _ = cli("validate", "--source", pair.source, "--target", pair.target, "--table",
                          "public.stock_master")
    assert code == 1  # the source has 30 rows and the target, filtered, only 20
    assert (result["status"], result["validation"]["source_rows"], result["validation"]["target_rows"]) == (
        "failed", 30, 20)

    config = tmp_path / "tables.yml"
    config.write_text("tables:\n  - name: stock\n    source: public.stock_master\n    target: raw.stock\n")
    env = {"SOURCE_DATABASE_URL": pair.source, "WAREHOUSE_DATABASE_URL": pair.target, "PATH": "/usr/bin:/bin"}
    code, report, _ = cli("sync", "--config", str(config), "--table", "stock", "--no-validate", env=env)
    assert code == 0
    assert (report["table"], report["rows_read"], report["validation"]) == (
        "stock", 30, {"match": None, "skipped": True, "source_rows": None, "target_rows": None,
                      "ranges_checked": 0, "differing_ranges": [], "differing_keys": [], "duration_s": 0.0})


def test_failure_prints_one_error_line_and_the_report(pair):
    code, report, stderr = cli("sync", "--source", pair.source, "--target", pair.target, "--table", "public.nope")
    assert code == 1
    assert report["status"] == "failed"
    assert report["error"] == "public.nope: source table public.nope does not exist; check `source` in the " \
                              "configuration"
    assert stderr.strip().splitlines()[-1] == f"error: {report['error']}"
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [f"error: {report['error']}"]
