"""The Amazon MWAA files cannot be deployed from here (no AWS, no network): they are checked for agreement
with the pinned versions, and the packaging script is run for real into a temporary folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.test_deploy_files import pins as exact_pins

ROOT = Path(__file__).resolve().parents[1]
MWAA = ROOT / "mwaa"
PACKAGE_SCRIPT = MWAA / "package.py"
CONSTRAINTS_LINE = (
    '--constraint "https://raw.githubusercontent.com/apache/airflow/constraints-3.3.1/constraints-3.12.txt"'
)
# In Airflow's constraints file, so listed without a version: the constraints file pins them (docs/deploy.md).
LEFT_TO_THE_CONSTRAINTS = {
    "apache-airflow-providers-postgres",
    "apache-airflow-providers-slack",
    "apache-airflow-providers-smtp",
    "psycopg2-binary",
    "pyyaml",
}
# Installed by mwaa/startup.sh into dbt's own virtualenv, not by requirements.txt.
IN_THE_DBT_VIRTUALENV = {"dbt-core", "dbt-postgres"}
EXPECTED_DAG_FILES = {"ingest_raw_tables.py", "transform_dbt.py", "dbt_docs.py", "report_corporate_actions.py"}


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def package_name(line: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", line).group(0)).lower()


def mwaa_requirements() -> dict[str, str | None]:
    listed: dict[str, str | None] = {}
    for line in requirement_lines(MWAA / "requirements.txt"):
        if not line.startswith("-"):
            listed[package_name(line)] = line.split("==", 1)[1] if "==" in line else None
    return listed


def startup_pins() -> dict[str, str]:
    found = re.findall(r'"([A-Za-z0-9_.\-]+)==([^"\s]+)"', (MWAA / "startup.sh").read_text())
    return {name.lower(): version for name, version in found}


def run_package(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PACKAGE_SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def manifest() -> Path:
    """`make manifest`'s file, built here when a test run starts without it (`make test` builds it first)."""
    path = ROOT / "dbt" / "target" / "manifest.json"
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "include.local_stack", "manifest"], cwd=ROOT, check=True)
    return path


def test_requirements_have_exactly_one_constraints_line_for_airflow_3_3_1_on_python_3_12():
    options = [line for line in requirement_lines(MWAA / "requirements.txt") if line.startswith("-")]
    assert options == [CONSTRAINTS_LINE]


def test_no_package_is_listed_twice():
    names = [package_name(line) for line in requirement_lines(MWAA / "requirements.txt") if not line.startswith("-")]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)


def test_every_pin_agrees_with_requirements_txt_and_every_requirement_is_accounted_for():
    deploy = exact_pins(ROOT / "requirements.txt")
    listed = mwaa_requirements()
    pinned = {name: version for name, version in listed.items() if version}
    assert pinned == {"astronomer-cosmos": "1.15.1", "psycopg": "3.3.9"}
    for name, version in pinned.items():
        assert deploy[name] == version, f"{name}: mwaa pins {version}, requirements.txt {deploy[name]}"
    assert {name for name, version in listed.items() if version is None} == LEFT_TO_THE_CONSTRAINTS
    assert set(deploy) == set(listed) | IN_THE_DBT_VIRTUALENV, "a package of requirements.txt is missing on MWAA"


def test_the_exceptions_are_documented():
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    for name in LEFT_TO_THE_CONSTRAINTS | IN_THE_DBT_VIRTUALENV:
        spelled = "PyYAML" if name == "pyyaml" else name
        assert spelled in deploy_doc, f"docs/deploy.md does not explain {spelled}"
    assert "protobuf" in deploy_doc


def test_startup_script_is_valid_bash_and_installs_the_pinned_dbt_into_its_own_virtualenv():
    script = MWAA / "startup.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    deploy = exact_pins(ROOT / "requirements.txt")
    assert startup_pins() == {name: deploy[name] for name in IN_THE_DBT_VIRTUALENV}
    text = script.read_text()
    assert "export DBT_EXECUTION_MODE=virtualenv" in text
    assert 'export DBT_EXECUTABLE="${DBT_VENV_PATH}/bin/dbt"' in text
    assert not re.search(r"^\s*(set -e|exit\b)", text, re.M), "a startup script must not end the shell it runs in"
    dbt_config = (ROOT / "include" / "dbt_config.py").read_text()
    assert '"virtualenv"' in dbt_config and 'os.environ.get("DBT_EXECUTABLE")' in dbt_config


def test_packaging_lays_out_the_bucket_with_the_manifest_and_nothing_local(manifest, tmp_path):
    out = tmp_path / "mwaa"
    result = run_package("--out", str(out))
    assert result.returncode == 0, result.stderr
    files = {path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()}

    has_plugins = any(p.name != ".gitkeep" for p in (ROOT / "plugins").rglob("*") if p.is_file())
    assert {path.split("/")[0] for path in files} == {"dags", "requirements.txt", "startup.sh"} | (
        {"plugins.zip"} if has_plugins else set()
    )
    assert (out / "requirements.txt").read_bytes() == (MWAA / "requirements.txt").read_bytes()
    assert (out / "startup.sh").read_bytes() == (MWAA / "startup.sh").read_bytes()
    assert {path for path in files if path.count("/") == 1 and path.endswith(".py")} == {
        f"dags/{name}" for name in EXPECTED_DAG_FILES
    }
    assert {"dags/include/pipeline.py", "dags/include/dbt_config.py", "dags/include/config/tables.yml",
            "dags/include/copy_engine/__init__.py", "dags/dbt/dbt_project.yml"} <= files  # fmt: skip
    assert json.loads((out / "dags/dbt/target/manifest.json").read_text()) == json.loads(manifest.read_text())
    assert {p for p in files if p.startswith("dags/dbt/target/")} <= {
        "dags/dbt/target/manifest.json",
        "dags/dbt/target/partial_parse.msgpack",
    }
    assert (out / "dags/.airflowignore").read_text().split() == ["include/", "dbt/"]
    for path in files:
        parts = path.split("/")
        assert not {".venv", ".data", "__pycache__", "logs", "local_stack", "demo_data"} & set(parts), path
        assert not parts[-1].startswith(".env") and not parts[-1].endswith((".pyc", ".pem", ".key")), path
    assert "dags/dbt/profiles.yml" not in files


def test_packaged_settings_keep_the_warehouse_location_and_no_credentials(manifest, tmp_path):
    out = tmp_path / "mwaa"
    assert run_package("--out", str(out)).returncode == 0
    shipped = yaml.safe_load((out / "dags/airflow_settings.yaml").read_text())["airflow"]
    source = yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())["airflow"]
    assert [c["conn_id"] for c in shipped["connections"]] == [c["conn_id"] for c in source["connections"]]
    for kept, original in zip(shipped["connections"], source["connections"], strict=True):
        assert set(kept) == {"conn_id", "conn_type", "conn_host", "conn_port", "conn_schema"}
        assert {key: original[key] for key in kept} == kept
    assert shipped["pools"] == source["pools"]
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".py", ".sh", ".txt"}:
            assert "conn_password" not in path.read_text(), path


def test_packaging_leaves_out_secrets_and_local_state_planted_in_a_copy_of_the_project(manifest, tmp_path):
    project = tmp_path / "project"
    for name in ("dags", "include", "dbt", "plugins", "mwaa"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "airflow_settings.yaml", project / "airflow_settings.yaml")
    planted = {
        "include/.env": "WAREHOUSE_PASSWORD=hunter2",
        "dags/.env.production": "AIRFLOW_CONN_WAREHOUSE_POSTGRES=postgres://u:hunter2@h/db",
        "include/config/deploy.pem": "-----BEGIN PRIVATE KEY-----",
        "include/.venv/bin/python": "",
        "dags/.data/postgres/PG_VERSION": "18",
        "dbt/logs/dbt.log": "hunter2",
        "dbt/target/run_results.json": "{}",
        "include/__pycache__/pipeline.cpython-312.pyc": "",
        "plugins/hooks/custom_hook.py": "VALUE = 1\n",
    }
    for relative, content in planted.items():
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        (project / relative).write_text(content)

    out = tmp_path / "mwaa"
    result = run_package("--project-root", str(project), "--out", str(out))
    assert result.returncode == 0, result.stderr
    for path in out.rglob("*"):
        if path.is_file() and path.suffix != ".zip":
            assert "hunter2" not in path.read_text(errors="replace"), path
    files = {path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()}
    assert not [p for p in files if any(s in p for s in (".env", ".pem", ".venv", ".data", "logs/", "run_results"))]
    with zipfile.ZipFile(out / "plugins.zip") as archive:
        assert archive.namelist() == ["hooks/custom_hook.py"]


def test_packaging_refuses_without_the_manifest_and_names_the_command(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "dbt", project / "dbt", ignore=shutil.ignore_patterns("target"))
    result = run_package("--project-root", str(project), "--out", str(tmp_path / "mwaa"))
    assert result.returncode == 1
    assert "manifest.json is missing" in result.stderr and "make manifest" in result.stderr
    assert not (tmp_path / "mwaa").exists()


def test_constraints_check_names_each_pin_the_constraints_file_would_refuse(manifest, tmp_path):
    constraints = tmp_path / "constraints-3.12.txt"
    constraints.write_text("# generated\nastronomer-cosmos==1.9.0\npsycopg==3.3.9\nprotobuf==4.25.8\nPyYAML==6.0.3\n")
    result = run_package("--constraints", str(constraints), "--out", str(tmp_path / "mwaa"))
    assert result.returncode == 1
    assert "astronomer-cosmos: mwaa/requirements.txt pins 1.15.1, the constraints file 1.9.0" in result.stderr
    assert "psycopg:" not in result.stderr and "pyyaml" not in result.stderr.lower()
    assert not (tmp_path / "mwaa").exists(), "nothing is packaged when a pin conflicts"
    constraints.write_text("astronomer-cosmos==1.15.1\nPyYAML==6.0.3\n")
    result = run_package("--constraints", str(constraints), "--out", str(tmp_path / "mwaa"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mwaa" / "requirements.txt").is_file()


def test_the_packaged_dags_folder_parses_on_its_own_as_mwaa_would_load_it(manifest, tmp_path):
    """Only the bundle on sys.path, no connection in the environment, dbt mode as startup.sh sets it."""
    out = tmp_path / "mwaa"
    assert run_package("--out", str(out)).returncode == 0
    dags = out / "dags"
    script = (
        "import json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(dags)!r})\n"
        "import include.pipeline\n"
        "print(json.dumps({'dags': sorted(bag.dag_ids), 'errors': {k: str(v) for k, v in bag.import_errors.items()},"
        " 'files': len(bag.dagbag_stats), 'root': str(include.pipeline.PROJECT_ROOT)}))\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW_CONN_", "DBT_"))}
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow_home"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'airflow.db'}",
        PYTHONPATH=str(dags),
        DBT_EXECUTION_MODE="virtualenv",
        DBT_EXECUTABLE="/usr/local/airflow/dbt_venv/bin/dbt",
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed["errors"] == {}
    assert parsed["dags"] == ["dbt_docs", "ingest_raw_tables", "report_corporate_actions", "transform_dbt"]
    assert parsed["files"] == len(EXPECTED_DAG_FILES), ".airflowignore let include/ or dbt/ be parsed as DAG files"
    assert parsed["root"] == str(dags)
