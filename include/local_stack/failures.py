"""Why a DAG run failed, in one line: the first task that failed, its error class and message, its log."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def task_label(ti: Mapping[str, Any]) -> str:
    """A task instance as the UI names it: `task_id`, or `task_id[table]` for a mapped one."""
    if ti["map_index"] < 0:
        return str(ti["task_id"])
    return f"{ti['task_id']}[{ti.get('rendered_map_index') or ti['map_index']}]"


def task_log_path(logs: Path, ti: Mapping[str, Any]) -> Path:
    """Where Airflow's default `[logging] log_filename_template` writes a task instance's attempt."""
    path = logs / f"dag_id={ti['dag_id']}" / f"run_id={ti['dag_run_id']}" / f"task_id={ti['task_id']}"
    if ti["map_index"] >= 0:
        path = path / f"map_index={ti['map_index']}"
    return path / f"attempt={max(int(ti.get('try_number') or 1), 1)}.log"


def error_in_log(path: Path) -> str | None:
    """`ErrorClass: message` of the exception a task log ends with (Airflow 3 writes JSON lines)."""
    if not path.exists():
        return None
    found = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        details = event.get("error_detail")
        if isinstance(details, list) and details:
            # Chained exceptions are listed from the outermost; the outermost is what the task raised.
            first = details[0]
            found = f"{first.get('exc_type', 'Error')}: {str(first.get('exc_value', '')).strip()}"
        elif found is None and str(event.get("level", "")).lower() in ("error", "critical"):
            found = str(event.get("event", "")).strip() or None
    return found


def first_failure(logs: Path, task_instances: Iterable[Mapping[str, Any]]) -> str:
    """The first failed task of a run (by end time, a dbt node's own task before the producer), with
    the cause its log gives."""
    # Cosmos' watcher producer (one `dbt build` for every node) fails whenever a node does; the
    # node's own task names the cause, so it comes first.
    failed = sorted((ti for ti in task_instances if ti["state"] == "failed"),
                    key=lambda ti: (str(ti["task_id"]).endswith("producer_watcher"), ti.get("end_date") or ""))
    if not failed:
        return "no failed task recorded"
    ti = failed[0]
    path = task_log_path(logs, ti)
    cause = error_in_log(path) or "no error in its log"
    return f"{task_label(ti)} failed first: {cause}\n  log: {path}"
