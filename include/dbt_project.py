"""The dbt project the template runs, as its own files and manifest describe it.

Nothing here is specific to the demo: the project's folder is `dbt/` unless DBT_PROJECT_DIR names
another one, and its name, nodes and sources are read from its manifest. The dbt profile is
generated from the warehouse's libpq DSN, the one the copy engine connects with, so dbt connects
the same way (password, none, `.pgpass`, client certificates); no profiles.yml lives in the project.

Imports neither Cosmos nor Airflow: the local stack and the Dockerfile use it too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIR_VARIABLE = "DBT_PROJECT_DIR"
# The profile and target of the generated profile. Passed to every dbt command (`--profile`,
# `--target`), so a project's own `profile:` name does not matter; dbt reuses a saved parse only for
# the same profile, target and address, so the manifest is parsed with these too.
DBT_PROFILE = "warehouse"
DBT_TARGET = "airflow"
DBT_SCHEMA = "analytics"  # the profile's default schema; dbt_project.yml sets each folder's own
DBT_THREADS = 4
# The environment variable the generated profile reads the password from; dbt scrubs the values
# of DBT_ENV_SECRET_* variables from its logs.
PASSWORD_VARIABLE = "DBT_ENV_SECRET_WAREHOUSE_PASSWORD"
NODE_TYPES = ("seed", "snapshot", "model", "test")

# libpq parameters that dbt-postgres takes as profile fields of the same name.
_PROFILE_FIELDS = ("host", "port", "user", "dbname", "sslmode", "sslcert", "sslkey", "sslrootcert",
                   "connect_timeout", "keepalives_idle")  # fmt: skip
# Left to dbt: its connections are named "dbt" in pg_stat_activity, and the name is part of what a
# saved parse is checked against, so the manifest parsed outside Airflow stays reusable in the tasks.
_IGNORED_PARAMS = ("application_name",)
# libpq parameters that dbt-postgres has no field for; libpq reads them from these variables.
_LIBPQ_VARIABLES = {"passfile": "PGPASSFILE", "options": "PGOPTIONS", "gssencmode": "PGGSSENCMODE",
                    "target_session_attrs": "PGTARGETSESSIONATTRS", "sslcrl": "PGSSLCRL",
                    "channel_binding": "PGCHANNELBINDING", "krbsrvname": "PGKRBSRVNAME",
                    "sslcompression": "PGSSLCOMPRESSION", "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
                    "requirepeer": "PGREQUIREPEER", "service": "PGSERVICE"}  # fmt: skip


class DbtProjectProblem(ValueError):
    """The dbt project or its profile cannot be used; the message names the file or setting and the fix."""


def dbt_project_dir() -> Path:
    """`dbt/` of this repository, or the folder DBT_PROJECT_DIR names (relative to the repository)."""
    value = os.environ.get(PROJECT_DIR_VARIABLE, "").strip()
    path = Path(value).expanduser() if value else PROJECT_ROOT / "dbt"
    return path if path.is_absolute() else PROJECT_ROOT / path


def manifest_path(project_dir: Path | None = None) -> Path:
    return (project_dir or dbt_project_dir()) / "target" / "manifest.json"


def read_project_file(project_dir: Path | None = None) -> dict[str, Any]:
    """The project's dbt_project.yml."""
    folder = project_dir or dbt_project_dir()
    path = folder / "dbt_project.yml"
    if not path.is_file():
        raise DbtProjectProblem(
            f"{path} does not exist: {PROJECT_DIR_VARIABLE} must name a dbt project's folder "
            f"(default: dbt/ of this repository)")
    document = yaml.safe_load(path.read_text()) or {}
    if not document.get("name"):
        raise DbtProjectProblem(f"{path} has no `name:`")
    return document


@cache
def _load_manifest(path: str, modified: float) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_manifest(path: Path | None = None) -> dict[str, Any]:
    """The project's manifest (read once per version of the file)."""
    path = path or manifest_path()
    if not path.exists():
        raise DbtProjectProblem(
            f"The dbt manifest {path} is missing: run `make manifest` (the Docker image builds it)")
    return _load_manifest(str(path), path.stat().st_mtime)


def project_name(project_dir: Path | None = None) -> str:
    """The dbt project's name: from its manifest when there is one, else from dbt_project.yml."""
    path = manifest_path(project_dir)
    if path.exists():
        return str(load_manifest(path)["metadata"]["project_name"])
    return str(read_project_file(project_dir)["name"])


def node_counts(manifest: Mapping[str, Any]) -> dict[str, int]:
    """How many seeds, snapshots, models and tests the manifest holds."""
    counts = Counter(node["resource_type"] for node in manifest["nodes"].values())
    return {kind: counts.get(kind, 0) for kind in NODE_TYPES}


def describe_counts(counts: Mapping[str, int]) -> str:
    """`2 seeds, 1 snapshot, 5 models, 14 tests`."""
    return ", ".join(f"{counts[kind]} {kind}{'' if counts[kind] == 1 else 's'}" for kind in NODE_TYPES)


# How Cosmos names a dbt node's task: `<name>_<suffix>`, or `<name>.<suffix>` inside the node's own
# task group (a node with tests, which follow as `<name>.test`); folder groups come before.
_TASK_SUFFIXES = ("run", "seed", "snapshot", "build", "test")


def task_nodes(manifest: Mapping[str, Any], task_ids: list[str]) -> dict[str, tuple[str, str]]:
    """For each task id that runs a seed, snapshot or model (or its tests), the node's unique id and
    what the task runs: its resource type, or `test` for the task of its tests."""
    by_name = {node["name"]: (unique_id, node["resource_type"]) for unique_id, node in manifest["nodes"].items()
               if node["resource_type"] in ("seed", "snapshot", "model")}  # fmt: skip
    found = {}
    for task_id in task_ids:
        parts = task_id.split(".")
        if parts[-1] in _TASK_SUFFIXES and len(parts) > 1 and parts[-2] in by_name:
            name, suffix = parts[-2], parts[-1]
        else:
            name, _, suffix = parts[-1].rpartition("_")
        if name in by_name and suffix in _TASK_SUFFIXES:
            unique_id, kind = by_name[name]
            found[task_id] = (unique_id, "test" if suffix == "test" else kind)
    return found


def sources_with_freshness(manifest: Mapping[str, Any]) -> list[str]:
    """The sources that declare a freshness threshold, as `source:<source>.<table>` selectors."""
    selected = []
    for source in manifest.get("sources", {}).values():
        freshness = source.get("freshness") or {}
        if any((freshness.get(level) or {}).get("count") for level in ("warn_after", "error_after")):
            selected.append(f"source:{source['source_name']}.{source['name']}")
    return sorted(selected)


def relation_in_manifest(manifest: Mapping[str, Any], relation: str) -> bool:
    """Whether a model or snapshot of the manifest builds `schema.table`."""
    schema, _, name = relation.rpartition(".")
    return any(
        node["resource_type"] in ("model", "snapshot", "seed")
        and node.get("schema") == schema and (node.get("alias") or node["name"]) == name
        for node in manifest["nodes"].values()
    )  # fmt: skip


def docs_projects_setting(name: str, docs_dir: str, conn_id: str | None = None) -> str:
    """The value of `[cosmos] dbt_docs_projects` that serves this project's docs from `docs_dir`."""
    entry: dict[str, Any] = {"dir": docs_dir, "name": f"dbt Docs ({name})"}
    if conn_id:
        entry["conn_id"] = conn_id
    return json.dumps({name: entry})


# --- the dbt profile --------------------------------------------------------------------------


def profile_output(params: Mapping[str, Any], password: str | None) -> dict[str, Any]:
    """The dbt-postgres output for libpq connection parameters (a DSN as `conninfo_to_dict` gives it).

    `password` is what goes into the profile's password field (an `env_var()` reference), or None
    when the DSN has no password: dbt then sends none and libpq does what it does for the copy
    engine (trust, `.pgpass`, a client certificate).
    """
    unknown = sorted(set(params) - set(_PROFILE_FIELDS) - set(_LIBPQ_VARIABLES) - set(_IGNORED_PARAMS) - {"password"})
    if unknown:
        raise DbtProjectProblem(
            f"the warehouse connection sets {', '.join(unknown)}, which dbt-postgres cannot pass on; "
            "remove it from the connection (or set the matching PG* environment variable)")
    output: dict[str, Any] = {"type": "postgres", "port": 5432}
    output.update({key: params[key] for key in _PROFILE_FIELDS if params.get(key) not in (None, "")})
    for key in ("port", "connect_timeout", "keepalives_idle"):
        if key in output:
            output[key] = int(output[key])
    missing = [key for key in ("host", "user", "dbname") if not output.get(key)]
    if missing:
        raise DbtProjectProblem(f"the warehouse connection has no {' or '.join(missing)}; dbt needs them")
    # dbt-postgres requires the field; an empty one is no password to libpq.
    output["password"] = password if params.get("password") else ""
    output.update(schema=DBT_SCHEMA, threads=DBT_THREADS)
    return output


def libpq_environment(params: Mapping[str, Any]) -> dict[str, str]:
    """The PG* variables that carry the DSN's parameters dbt-postgres has no profile field for."""
    return {_LIBPQ_VARIABLES[key]: str(value) for key, value in params.items()
            if key in _LIBPQ_VARIABLES and value not in (None, "")}  # fmt: skip


def profiles_yml(output: Mapping[str, Any]) -> str:
    return yaml.safe_dump({DBT_PROFILE: {"target": DBT_TARGET, "outputs": {DBT_TARGET: dict(output)}}})


def dbt_invocation(warehouse_dsn: str, folder: Path) -> dict[str, str]:
    """Write a profiles.yml for `warehouse_dsn` into `folder`; return the environment dbt needs with it."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(warehouse_dsn)
    folder.mkdir(parents=True, exist_ok=True)
    password = f"{{{{ env_var('{PASSWORD_VARIABLE}') }}}}"
    (folder / "profiles.yml").write_text(profiles_yml(profile_output(params, password)))
    env = {**os.environ, **libpq_environment(params), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DO_NOT_TRACK": "1"}
    env[PASSWORD_VARIABLE] = str(params.get("password") or "")
    return env


def dbt_arguments(project_dir: Path, profiles_dir: Path) -> list[str]:
    """What every dbt command of the template passes: the project, the generated profile and target."""
    return ["--project-dir", str(project_dir), "--profiles-dir", str(profiles_dir),
            "--profile", DBT_PROFILE, "--target", DBT_TARGET]  # fmt: skip


def dbt_executable() -> str:
    """The `dbt` installed beside this Python (the venv's, or the image's), else the one on PATH."""
    beside = Path(sys.executable).with_name("dbt")
    return str(beside) if beside.exists() else shutil.which("dbt") or "dbt"


def _address(warehouse_dsn: str) -> str:
    """What dbt checks a saved parse against: profile, target and the connection's fields (not the password)."""
    from psycopg.conninfo import conninfo_to_dict

    output = profile_output(conninfo_to_dict(warehouse_dsn), None)
    output.pop("password")
    return f"{DBT_PROFILE}/{DBT_TARGET} {json.dumps(output, sort_keys=True)}"


def build_manifest(warehouse_dsn: str, project_dir: Path | None = None) -> Path:
    """`dbt parse` writes the manifest Cosmos renders the transform DAG from (skipped when current).

    Parsed into a scratch folder and moved into place in one rename: a DAG file parsed meanwhile
    reads the old manifest or the new one, never half of one. dbt reuses a saved parse only for the
    same profile, target and warehouse address (not the password); the stamp says which one this was.
    """
    project = project_dir or dbt_project_dir()
    read_project_file(project)
    manifest = manifest_path(project)
    stamp = manifest.parent / "parsed_for.txt"
    generated = {project / "target", project / "logs", project / "dbt_packages"}
    sources = [p for p in project.rglob("*") if p.is_file() and not any(p.is_relative_to(g) for g in generated)]
    if (manifest.exists() and stamp.exists() and stamp.read_text() == _address(warehouse_dsn)
            and all(p.stat().st_mtime <= manifest.stat().st_mtime for p in sources)):
        return manifest
    manifest.parent.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".parse-", dir=manifest.parent))
    try:
        env = dbt_invocation(warehouse_dsn, scratch / "profiles")
        result = subprocess.run(
            [dbt_executable(), "parse", *dbt_arguments(project, scratch / "profiles"),
             "--target-path", str(scratch), "--log-path", str(scratch)],
            env=env, capture_output=True, text=True, cwd=project,
        )  # fmt: skip
        if result.returncode != 0:
            raise DbtProjectProblem(
                f"`dbt parse` of {project} failed, so the transform DAG cannot be rendered:\n{result.stdout[-3000:]}")
        # Cosmos hands the partial-parse state to each task's dbt, which then skips a full parse.
        os.replace(scratch / "partial_parse.msgpack", manifest.parent / "partial_parse.msgpack")
        os.replace(scratch / "manifest.json", manifest)
        stamp.write_text(_address(warehouse_dsn))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def check_dbt_connection(warehouse_dsn: str, project_dir: Path | None = None) -> None:
    """`dbt debug --connection` with the generated profile; raise one line naming what is wrong."""
    project = project_dir or dbt_project_dir()
    with tempfile.TemporaryDirectory(prefix="dbt-debug-") as scratch:
        env = dbt_invocation(warehouse_dsn, Path(scratch))
        result = subprocess.run(
            [dbt_executable(), "debug", "--connection", "--no-use-colors", *dbt_arguments(project, Path(scratch)),
             "--log-path", scratch],
            env=env, capture_output=True, text=True, cwd=scratch,
        )  # fmt: skip
    if result.returncode != 0:
        raise DbtProjectProblem(f"dbt cannot connect to the warehouse: {_debug_reason(result.stdout)}")


def _debug_reason(output: str) -> str:
    """The line of `dbt debug`'s output that says why it could not connect."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "FATAL:" in line:
            return line.split("FATAL:", 1)[1].strip()
    for line in lines:
        if any(marker in line for marker in ("connection to server", "could not", "no password", "Runtime Error")):
            return line
    return lines[-1] if lines else "dbt debug failed without output"


def settings_warehouse_dsn(path: Path = PROJECT_ROOT / "airflow_settings.yaml") -> str:
    """The warehouse connection of airflow_settings.yaml as a DSN without its password (enough to parse)."""
    from psycopg.conninfo import make_conninfo

    connections = ((yaml.safe_load(path.read_text()) or {}).get("airflow") or {}).get("connections") or []
    conn = next(c for c in connections if c.get("conn_id") == "warehouse_postgres")
    return make_conninfo(host=conn["conn_host"], port=str(conn.get("conn_port") or 5432), user=conn["conn_login"],
                         dbname=conn["conn_schema"])


def main(argv: list[str] | None = None) -> int:
    """`python -m include.dbt_project manifest|docs-setting|name|profiles`: the Dockerfile's build steps,
    and a profiles.yml for running dbt by hand against WAREHOUSE_DATABASE_URL."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m include.dbt_project", description=main.__doc__)
    parser.add_argument("command", choices=["manifest", "docs-setting", "name", "profiles"])
    parser.add_argument("--warehouse-dsn", default=os.environ.get("WAREHOUSE_DATABASE_URL", ""),
                        help="manifest: the warehouse the manifest is parsed for (no password needed); "
                        "default: the warehouse_postgres connection of airflow_settings.yaml")
    parser.add_argument("--docs-dir", help="docs-setting: where the dbt_docs task publishes the docs")
    parser.add_argument("--out", default=str(PROJECT_ROOT / ".data" / "dbt_profiles"),
                        help="profiles: the folder to write profiles.yml into (for dbt by hand)")
    args = parser.parse_args(argv)
    try:
        if args.command == "manifest":
            print(build_manifest(args.warehouse_dsn or settings_warehouse_dsn()))
        elif args.command == "profiles":
            folder = Path(args.out)
            dbt_invocation(args.warehouse_dsn or settings_warehouse_dsn(), folder)
            print(f"dbt build {' '.join(dbt_arguments(dbt_project_dir(), folder))}"
                  f"   # the password, if any, from {PASSWORD_VARIABLE}")
        elif args.command == "docs-setting":
            print(docs_projects_setting(project_name(), args.docs_dir))
        else:
            print(project_name())
    except DbtProjectProblem as problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
