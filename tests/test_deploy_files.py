"""The deploy files cannot be run here (no Docker), so they are checked for agreement instead."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(3)
    return found


def test_every_requirement_is_pinned_exactly():
    for name in ("requirements.txt", "requirements-local.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r "):
                assert "==" in line, f"{name}: {line!r} is not pinned"


def test_local_install_runs_the_versions_the_deploy_files_pin():
    for package, pinned in {**pins(ROOT / "requirements.txt"), **pins(ROOT / "requirements-local.txt")}.items():
        assert version(package) == pinned, f"{package}: installed {version(package)}, pinned {pinned}"


def test_constraints_lock_agrees_with_the_pins():
    locked = pins(ROOT / "constraints.txt")
    for package, pinned in {**pins(ROOT / "requirements.txt"), **pins(ROOT / "requirements-local.txt")}.items():
        assert locked.get(package) == pinned, f"constraints.txt locks {package}=={locked.get(package)}, pinned {pinned}"


def test_stack_versions_are_the_ones_this_project_supports():
    deploy = pins(ROOT / "requirements.txt")
    local = pins(ROOT / "requirements-local.txt")
    assert local["apache-airflow"].startswith("3.3.")
    assert deploy["astronomer-cosmos"] == "1.15.1"
    assert deploy["dbt-core"].startswith("1.11."), "dbt-core 1.12 downloads a parser at build time"
    assert deploy["dbt-postgres"] == "1.11.0"


def test_dockerfile_uses_astro_runtime_for_airflow_3_3_and_builds_the_manifest():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM astrocrpublic\.azurecr\.io/runtime:3\.3-\d+$", dockerfile, re.M)
    assert re.search(r"^RUN python -m include\.dbt_project manifest$", dockerfile, re.M)


def test_the_manifest_is_parsed_with_the_profile_cosmos_builds(tmp_path):
    """dbt reuses the saved parse in each task only for the same profile, target and address: the
    Dockerfile's parse, `make manifest` and Cosmos' profile all come from include/dbt_project.py."""
    from include.dbt_config import profile_config
    from include.dbt_project import DBT_PROFILE, DBT_TARGET, dbt_invocation, settings_warehouse_dsn

    assert (DBT_PROFILE, DBT_TARGET) == (profile_config.profile_name, profile_config.target_name)
    warehouse = next(c for c in yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())["airflow"]["connections"]
                     if c["conn_id"] == "warehouse_postgres")
    dbt_invocation(settings_warehouse_dsn(), tmp_path)
    output = yaml.safe_load((tmp_path / "profiles.yml").read_text())[DBT_PROFILE]["outputs"][DBT_TARGET]
    assert (output["host"], output["port"], output["user"], output["dbname"], output["schema"]) == (
        warehouse["conn_host"], warehouse["conn_port"], warehouse["conn_login"], warehouse["conn_schema"], "analytics")
    for path in (ROOT / "dbt").rglob("profiles.yml"):
        raise AssertionError(f"{path}: the profile is generated, none lives in the dbt project")


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".data", "dbt/target"} <= ignored


def test_airflow_settings_parse_as_astro_expects():
    document = yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())
    section = document["airflow"]
    for connection in section["connections"]:
        assert {"conn_id", "conn_type", "conn_host", "conn_schema", "conn_login", "conn_port"} <= set(connection)
        assert connection["conn_type"] == "postgres"
    for pool in section["pools"]:
        assert isinstance(pool["pool_slot"], int) and pool["pool_slot"] > 0


def test_astro_project_layout_is_complete():
    for path in ("dags", "include", "dbt", "plugins", "tests", "bench", "Dockerfile", "requirements.txt",
                 "packages.txt", "airflow_settings.yaml", ".astro/config.yaml", ".dockerignore", ".gitignore",
                 "README.md", "Makefile"):  # fmt: skip
        assert (ROOT / path).exists(), f"{path} is missing"
    assert yaml.safe_load((ROOT / ".astro" / "config.yaml").read_text())["project"]["name"]


def test_the_dbt_docs_entry_is_keyed_by_the_manifests_project_name_in_the_image_and_the_local_stack(tmp_path):
    """Cosmos serves the docs of the `[cosmos] dbt_docs_projects` entry whose key the docs task looks up
    (include/dbt_config.py: the dbt project's name, from the manifest); nowhere is the name written."""
    from include.dbt_config import DBT_DOCS_PROJECT
    from include.dbt_project import main
    from include.local_stack.airflow import airflow_environment
    from include.local_stack.settings import StackSettings

    project = json.loads((ROOT / "dbt" / "target" / "manifest.json").read_text())["metadata"]["project_name"]
    assert DBT_DOCS_PROJECT == project
    for path in ("Dockerfile", "include/dbt_config.py", "include/local_stack/airflow.py"):
        assert project not in (ROOT / path).read_text(), f"{path} names the dbt project"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "python -m include.dbt_project docs-setting --docs-dir /usr/local/airflow/include/dbt_docs" in dockerfile
    assert "dbt_docs_projects = %s" in dockerfile and 'airflow.cfg"' in dockerfile
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["docs-setting", "--docs-dir", "/usr/local/airflow/include/dbt_docs"]) == 0
    image_entry = json.loads(printed.getvalue())
    local = StackSettings(data_dir=tmp_path / "data")
    local_entry = json.loads(airflow_environment(local)["AIRFLOW__COSMOS__DBT_DOCS_PROJECTS"])
    assert list(image_entry) == list(local_entry) == [project]
    assert image_entry[project]["dir"] == "/usr/local/airflow/include/dbt_docs"  # inside the Astro project
    assert local_entry[project]["dir"] == str(tmp_path / "data" / "dbt_docs")
    assert image_entry[project]["name"] == local_entry[project]["name"] == f"dbt Docs ({project})"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_celery_provider_and_everything_it_needs_are_locked_at_versions_it_accepts():
    """The CeleryExecutor of the local stack: its provider pinned for the local install, and every package
    it pulls in (with the extras asked for, `celery[redis]`, `kombu[redis]`) locked at a version it accepts."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    local = pins(ROOT / "requirements-local.txt")
    assert local["apache-airflow-providers-celery"] == "3.26.0"
    locked = {_canonical(name): pinned for name, pinned in pins(ROOT / "constraints.txt").items()}
    seen: set[tuple[str, str]] = set()
    todo = [("apache-airflow-providers-celery", "")]
    while todo:
        package, extra = todo.pop()
        if (package, extra) in seen:
            continue
        seen.add((package, extra))
        for line in requires(package) or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
                continue
            name = _canonical(requirement.name)
            assert name in locked, f"{package}[{extra}] needs {requirement}; constraints.txt does not lock it"
            assert requirement.specifier.contains(locked[name], prereleases=True), (
                f"{package}[{extra}] needs {requirement}; constraints.txt locks {name}=={locked[name]}")
            todo.extend((name, wanted) for wanted in requirement.extras or {""})
    assert {"celery", "kombu", "redis", "amqp", "apache-airflow"} <= {package for package, _ in seen}


def test_the_deploy_images_bring_their_own_celery_provider_and_the_docs_say_so():
    """Astro Runtime and MWAA run their workers with the provider of their Airflow: a pin would fight it."""
    for path in (ROOT / "requirements.txt", ROOT / "mwaa" / "requirements.txt"):
        assert "providers-celery" not in path.read_text(), path
    deploy_doc = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    assert "`apache-airflow-providers-celery==3.26.0`" in deploy_doc
    assert "Astro Runtime ships it" in deploy_doc and "MWAA's image runs its workers with it" in deploy_doc


def test_the_image_and_the_local_stack_set_the_watcher_producer_alike():
    from include.local_stack.airflow import WATCHER_PRODUCER_SETTINGS

    dockerfile = (ROOT / "Dockerfile").read_text()
    for name, value in WATCHER_PRODUCER_SETTINGS.items():
        assert f"ENV {name}={value}" in dockerfile, name
