"""The Cosmos dbt docs plugin in the local stack's Airflow: it loads, its pages are registered for
this project, and the api-server app serves the docs the `dbt_docs` task publishes.

Runs in a child Python process with the environment `make run` gives every Airflow component
(include/local_stack/airflow.py), except that the metadata database is a throwaway sqlite: the
plugin manager and the api-server read their configuration once per process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from include.dbt_project import project_name
from include.local_stack.airflow import airflow_environment
from include.local_stack.settings import StackSettings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOCS_PROJECT = project_name()  # include.dbt_config.DBT_DOCS_PROJECT (the manifest's), without importing Cosmos

PROBE = textwrap.dedent(
    """
    import json

    from airflow import plugins_manager
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    info = {plugin["name"]: plugin for plugin in plugins_manager.get_plugin_info()}
    cosmos = info.get("cosmos", {})
    client = TestClient(create_app())
    pages = {}
    for page in ("dbt_docs_index.html", "manifest.json", "catalog.json", "dbt_docs"):
        response = client.get(f"/cosmos/{project}/{page}")
        pages[page] = {"status": response.status_code, "body": response.text[:3000],
                       "csp": response.headers.get("content-security-policy")}
    print("PROBE_RESULT " + json.dumps({
        "import_errors": {str(k): str(v) for k, v in plugins_manager.get_import_errors().items()},
        "source": str(cosmos.get("source")),
        "external_views": cosmos.get("external_views"),
        "fastapi_apps": [str(app) for app in cosmos.get("fastapi_apps") or []],
        "pages": pages,
    }))
    """
)


def run_probe(tmp_path: Path) -> dict:
    settings = StackSettings(data_dir=tmp_path / "stack", api_port=18080)
    docs = tmp_path / "stack" / "dbt_docs"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html><head><title>dbt Docs</title></head><body>docs</body></html>")
    (docs / "manifest.json").write_text(json.dumps({"nodes": {"model.postgres_analytics.fact_events": {}}}))
    (docs / "catalog.json").write_text(json.dumps({"nodes": {}, "sources": {}}))
    env = {key: value for key, value in airflow_environment(settings).items() if not key.startswith("AIRFLOW_CONN_")}
    env.update(
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'airflow.db'}",
        PYTHONPATH=str(PROJECT_ROOT),
    )
    done = subprocess.run(
        [sys.executable, "-c", PROBE.replace("{project}", DOCS_PROJECT)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    result = [line for line in done.stdout.splitlines() if line.startswith("PROBE_RESULT ")]
    assert done.returncode == 0 and result, f"probe failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return json.loads(result[-1].removeprefix("PROBE_RESULT "))


def test_local_stack_configures_the_plugin_and_the_api_server_serves_the_docs(tmp_path):
    probe = run_probe(tmp_path)
    assert probe["import_errors"] == {}
    assert "astronomer-cosmos" in probe["source"], probe["source"]  # the entry-point plugin of the package
    assert probe["external_views"] == [
        {"name": f"dbt Docs ({DOCS_PROJECT})", "category": "Browse",
         "href": f"/cosmos/{DOCS_PROJECT}/dbt_docs_index.html"}
    ]
    pages = probe["pages"]
    index = pages["dbt_docs_index.html"]
    assert index["status"] == 200 and "<title>dbt Docs</title>" in index["body"]
    assert index["csp"] == "frame-ancestors 'self'"  # shown inside the Airflow UI's frame only
    assert pages["manifest.json"]["status"] == 200
    assert json.loads(pages["manifest.json"]["body"]) == {"nodes": {"model.postgres_analytics.fact_events": {}}}
    assert pages["catalog.json"]["status"] == 200
    assert f"/cosmos/{DOCS_PROJECT}/dbt_docs_index.html" in pages["dbt_docs"]["body"]


def test_dockerfile_configures_the_same_project_for_astro(tmp_path):
    """The image writes the entry into airflow.cfg at build time, from the manifest it has just built."""
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    match = re.search(r"python -m include\.dbt_project docs-setting --docs-dir (\S+)\)", dockerfile)
    assert match, "the Dockerfile does not write [cosmos] dbt_docs_projects"
    built = subprocess.run([sys.executable, "-m", "include.dbt_project", "docs-setting", "--docs-dir", match.group(1)],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)  # fmt: skip
    projects = json.loads(built.stdout)
    assert list(projects) == [DOCS_PROJECT]
    assert projects[DOCS_PROJECT]["dir"].startswith("/usr/local/airflow/")
    local_env = airflow_environment(StackSettings(data_dir=tmp_path))
    local = json.loads(local_env["AIRFLOW__COSMOS__DBT_DOCS_PROJECTS"])
    assert list(local) == [DOCS_PROJECT]
    assert local[DOCS_PROJECT]["name"] == projects[DOCS_PROJECT]["name"]
