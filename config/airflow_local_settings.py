"""Airflow's local settings hook: imported by every Airflow process at start-up.

Airflow puts `$AIRFLOW_HOME/config` on `sys.path` (on Astro that is this folder; the local stack
adds it to PYTHONPATH). Only one thing is done here, and only in the processes that fork task
processes (the scheduler, whose LocalExecutor workers fork each task, and a Celery worker): before
the first fork, parse the DAG files once and import dbt. Every task process then inherits Cosmos,
the providers and plugins a DAG parse loads, this project's modules, its rendered DAGs
(include/pipeline.py: built_once) and dbt, instead of importing and rendering them again. The
dag-processor, which forks a process for each parse of a DAG file, gets the same without dbt: its
periodic parses of an unchanged transform DAG no longer render every Cosmos task (2-3 s of CPU
each at 200 dbt models, every 10 s in the local stack). The README has the measurements.

A project module changed since then (an edit while Airflow runs) is dropped in each new task
process, which imports it afresh: a task never runs code older than its files.

Set AIRFLOW_PRELOAD_TASK_MODULES=false to switch it off.

In the triggerer: its execution API is made ready before the first trigger asks, and a dbt node task
it ends as a success sends no callback request to the dag-processor when the task has no success
callback (include/triggerer_setup.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_preloaded = False
_project_modules: dict[str, tuple[str, int]] = {}  # module name -> (file, mtime when preloaded)


def _forks_task_processes(argv: list[str]) -> bool:
    command = argv[1:3]
    return command[:1] == ["scheduler"] or command == ["celery", "worker"]


def _forks_dag_file_parses(argv: list[str]) -> bool:
    return argv[1:2] == ["dag-processor"]


def _project_file(module: object) -> str | None:
    file = getattr(module, "__file__", None)
    if not file or "site-packages" in file or not file.startswith(str(PROJECT_ROOT)):
        return None
    return file


def preload_task_modules(*, with_dbt: bool = True) -> None:
    """Parse the DAG files and import dbt, once per process; never fail the process for it."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    started = time.perf_counter()
    try:
        if with_dbt:
            import dbt.adapters.postgres  # noqa: F401
            import dbt.cli.main  # noqa: F401
        from airflow.configuration import conf
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=conf.get("core", "dags_folder"))
        remember_project_modules()
        log.info("preloaded %s%d DAGs for forked processes in %.1fs", "dbt and " if with_dbt else "", len(bag.dags),
                 time.perf_counter() - started)
    except Exception:  # a task imports what it needs anyway; only the saving is lost
        log.warning("could not preload the task modules", exc_info=True)


def remember_project_modules() -> None:
    """The project's loaded modules and their files' mtimes, to drop them in a task if a file changed."""
    for name, module in list(sys.modules.items()):
        # __main__ is the process's own entry script (.venv/bin/airflow, inside the project when the
        # venv is): dropped, every later dbt call in the task failed with KeyError: '__main__'.
        if name != "__main__" and (file := _project_file(module)):
            _project_modules[name] = (file, os.stat(file).st_mtime_ns)


def forget_changed_project_modules() -> None:
    """In a new process: if any preloaded project file changed, drop every project module."""
    try:
        changed = any(os.stat(file).st_mtime_ns != mtime for file, mtime in _project_modules.values())
    except OSError:
        changed = True
    if changed:
        for name in list(_project_modules):
            sys.modules.pop(name, None)
        _project_modules.clear()


if sys.argv[1:2] == ["triggerer"]:
    try:  # the project root is on the path wherever the triggerer can import the node trigger itself
        from include.triggerer_setup import install

        install()
    except Exception:  # never the triggerer's start: only the saving is lost
        log.warning("could not set up the triggerer (include/triggerer_setup.py)", exc_info=True)

if os.environ.get("AIRFLOW_PRELOAD_TASK_MODULES", "true").lower() != "false":
    if _forks_task_processes(sys.argv):
        os.register_at_fork(before=preload_task_modules, after_in_child=forget_changed_project_modules)
    elif _forks_dag_file_parses(sys.argv):
        os.register_at_fork(before=lambda: preload_task_modules(with_dbt=False),
                            after_in_child=forget_changed_project_modules)
