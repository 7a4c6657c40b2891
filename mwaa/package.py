"""Lay out what Amazon MWAA reads from its S3 bucket in a local folder; upload nothing.

    python mwaa/package.py [--out dist/mwaa] [--constraints constraints-3.12.txt]

The result mirrors the bucket (docs/deploy.md has the `aws s3 sync` commands):

    dags/              → s3://BUCKET/dags/   MWAA's DAGs folder, /usr/local/airflow/dags on every component
      *.py               the DAG files of dags/
      include/           the code they import (the DAGs folder is on sys.path, so `import include…` works),
                         without the local runner (local_stack/) and the demo data generator (demo_data/)
      dbt/               the dbt project with target/manifest.json, which Cosmos renders the transform DAG from
      airflow_settings.yaml  connections reduced to host, port and database (include/pipeline.py names
                         the warehouse Assets from it): no login, no password
      .airflowignore     keeps the dag-processor from parsing include/ and dbt/ as DAG files
    requirements.txt   → s3://BUCKET/requirements.txt   (mwaa/requirements.txt)
    startup.sh         → s3://BUCKET/startup.sh         (mwaa/startup.sh: dbt in its own virtualenv)
    plugins.zip        → s3://BUCKET/plugins.zip        only when plugins/ holds more than .gitkeep

The dbt manifest is not built here: `make mwaa` runs `make manifest` first. With --constraints (Airflow's
constraints file, downloaded by hand), every `==` pin of mwaa/requirements.txt is checked against it first.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Never shipped, wherever they are: local state, caches, and anything that may hold a secret.
EXCLUDED_NAMES = (
    ".venv*", ".data", ".env", ".env.*", "*.env", "*.pem", "*.key", "__pycache__", "*.pyc", ".pytest_cache",
    ".ruff_cache", ".mypy_cache", "logs", "airflow_settings.local.yaml", ".DS_Store", ".gitkeep",
)  # fmt: skip
# Of dbt/: the manifest (and dbt's partial-parse state) is all of target/ that ships. No profiles.yml:
# Cosmos writes the profile from the Airflow connection.
DBT_EXCLUDED = ("target", "logs", "dbt_packages", "profiles.yml", ".user.yml")
# Of include/: the local runner of `make run` and the demo data generator serve this machine only.
INCLUDE_EXCLUDED = ("local_stack", "demo_data")
DBT_TARGET_SHIPPED = ("manifest.json", "partial_parse.msgpack")
CONNECTION_FIELDS_SHIPPED = ("conn_id", "conn_type", "conn_host", "conn_port", "conn_schema")
AIRFLOWIGNORE = "include/\ndbt/\n"


class PackagingError(RuntimeError):
    """The project cannot be packaged as it is; the message says what to do."""


def _ignore(excluded: tuple[str, ...]):
    def ignore(_directory: str, names: list[str]) -> set[str]:
        return {name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in excluded)}

    return ignore


def pins(requirements: str) -> dict[str, str | None]:
    """Package name (normalised, extras dropped) → pinned version, or None where unpinned."""
    found: dict[str, str | None] = {}
    for line in requirements.splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(?:==\s*([^\s;]+))?", line)
        if not match:
            raise PackagingError(f"requirements line {line!r} is neither `name` nor `name==version`")
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        if name in found:
            raise PackagingError(f"requirements list {name} twice")
        found[name] = match.group(3)
    return found


def constraint_conflicts(requirements: str, constraints: str) -> list[str]:
    """Every `==` pin that Airflow's constraints file pins to another version: pip would refuse it."""
    constrained = {name: version for name, version in pins(constraints).items() if version}
    return [
        f"{name}: mwaa/requirements.txt pins {version}, the constraints file {constrained[name]}"
        for name, version in pins(requirements).items()
        if version and name in constrained and constrained[name] != version
    ]


def _settings_without_credentials(source: Path) -> str:
    document = yaml.safe_load(source.read_text())["airflow"]
    connections = [
        {field: connection[field] for field in CONNECTION_FIELDS_SHIPPED if field in connection}
        for connection in document.get("connections") or []
    ]
    reduced = {"airflow": {"connections": connections, "pools": document.get("pools") or []}}
    header = (
        "# Written by mwaa/package.py: only what include/pipeline.py reads to name the warehouse Assets.\n"
        "# On MWAA the connections themselves come from the secrets backend (docs/deploy.md).\n"
    )
    return header + yaml.safe_dump(reduced, sort_keys=False)


def package(root: Path, out: Path) -> list[Path]:
    """Write the bucket layout into `out` (emptied first); return the files written, relative to `out`."""
    manifest = root / "dbt" / "target" / "manifest.json"
    if not manifest.is_file():
        raise PackagingError(f"{manifest} is missing: run `make manifest` (or `make mwaa`, which runs it) first.")
    if out.exists():
        shutil.rmtree(out)
    dags = out / "dags"
    shutil.copytree(root / "dags", dags, ignore=_ignore(EXCLUDED_NAMES))
    shutil.copytree(root / "include", dags / "include", ignore=_ignore(EXCLUDED_NAMES + INCLUDE_EXCLUDED))
    shutil.copytree(root / "dbt", dags / "dbt", ignore=_ignore(EXCLUDED_NAMES + DBT_EXCLUDED))
    (dags / "dbt" / "target").mkdir()
    for name in DBT_TARGET_SHIPPED:
        if (manifest.parent / name).is_file():
            shutil.copy2(manifest.parent / name, dags / "dbt" / "target" / name)
    (dags / "airflow_settings.yaml").write_text(_settings_without_credentials(root / "airflow_settings.yaml"))
    (dags / ".airflowignore").write_text(AIRFLOWIGNORE)

    shutil.copy2(root / "mwaa" / "requirements.txt", out / "requirements.txt")
    if (root / "mwaa" / "startup.sh").is_file():
        shutil.copy2(root / "mwaa" / "startup.sh", out / "startup.sh")

    # MWAA unpacks plugins.zip into /usr/local/airflow/plugins: its entries are relative to plugins/.
    plugins = root / "plugins"
    plugin_files = sorted(
        path for path in plugins.rglob("*")
        if path.is_file() and not any(fnmatch.fnmatch(part, pattern)
                                      for part in path.relative_to(plugins).parts for pattern in EXCLUDED_NAMES)
    ) if plugins.is_dir() else []  # fmt: skip
    if plugin_files:
        with zipfile.ZipFile(out / "plugins.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for path in plugin_files:
                archive.write(path, path.relative_to(plugins).as_posix())

    return sorted(path.relative_to(out) for path in out.rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python mwaa/package.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "mwaa", help="default: dist/mwaa")
    parser.add_argument("--project-root", type=Path, default=ROOT, help="default: this repository")
    parser.add_argument("--constraints", type=Path, help="Airflow's constraints file, to check the pins against")
    args = parser.parse_args(argv)
    root = args.project_root.resolve()
    try:
        if args.constraints:
            conflicts = constraint_conflicts((root / "mwaa" / "requirements.txt").read_text(),
                                             args.constraints.read_text())  # fmt: skip
            if conflicts:
                raise PackagingError("pip would refuse these pins under the constraints file:\n  " +
                                     "\n  ".join(conflicts))  # fmt: skip
        written = package(root, args.out.resolve())
    except PackagingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(written)} files in {args.out}/ (nothing uploaded); upload with the commands in docs/deploy.md:")
    for top in sorted({path.parts[0] for path in written}):
        print(f"  {top}{'/' if (args.out / top).is_dir() else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
