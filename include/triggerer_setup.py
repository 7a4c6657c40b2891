"""Two changes to the triggerer process, made at its start (`config/airflow_local_settings.py`).

**Its execution API is ready before the first trigger asks.** The triggerer answers its triggers'
reads (XComs, task states) through an in-process copy of Airflow's execution API, which builds its
versioned routes (Cadwyn) on the first request: 15-18 s of CPU on this 2-core machine, so the first
dbt node tasks to wait in a freshly started triggerer (the sources, at the head of the graph) waited
that long for their first read, on the transform's critical path. `warm_in_process_execution_api`
sends that first request from a thread as soon as the triggerer starts.

**A dbt node task ended there as a success sends no callback request.** Airflow 3.3 sends a
success callback request to the dag-processor for every task a trigger ends
(`airflow.models.trigger.handle_event_submit`), whether or not the task has a success callback;
the dag-processor then parses the DAG file to run none. At 200 dbt models that was 36 parses of
a 406-task DAG (1-3 s of CPU each) taken from the build the tasks wait for. A node task that
waits in `include.dbt_watcher.NodeResultTrigger` says in the trigger's arguments whether it has a
success callback; when it has none, its success is recorded here as Airflow records it (state,
XComs) without the request. Every other event and trigger goes to Airflow's own handler.

Kept free of dbt and Cosmos imports: `config/airflow_local_settings.py` installs it in the
triggerer process at start-up.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

NODE_TRIGGER_CLASS = "include.dbt_watcher.NodeResultTrigger"
SUCCESS_CALLBACK_ARGUMENT = "success_callback"  # the trigger's argument: does its task have one
_installed = False


def install() -> None:
    end_node_tasks_without_callback_requests()
    warm_in_process_execution_api()


def warm_in_process_execution_api() -> None:
    """Make the triggerer's in-process execution API build its routes as the triggerer starts.

    The triggerer makes its API client on its triggers' first read; here a thread makes it (and
    sends it one request) right after the triggerer's supervisor starts.
    """
    try:
        from airflow.jobs.triggerer_job_runner import TriggerRunnerSupervisor
    except Exception:
        log.warning("could not warm the triggerer's execution API", exc_info=True)
        return
    airflow_start = TriggerRunnerSupervisor.start
    if getattr(airflow_start, "warms", False):
        return

    def first_request(supervisor: Any) -> None:
        started = time.perf_counter()
        try:
            supervisor.client.get("health")  # made once (a cached property), built by its first request
            log.info("the triggerer's execution API is ready (%.1fs)", time.perf_counter() - started)
        except Exception:  # the first trigger's read builds it then, as without this
            log.warning("could not warm the triggerer's execution API", exc_info=True)

    def start(*args: Any, **kwargs: Any) -> Any:
        supervisor = airflow_start(*args, **kwargs)
        threading.Thread(target=first_request, args=(supervisor,), name="warm-execution-api", daemon=True).start()
        return supervisor

    start.warms = True  # type: ignore[attr-defined]
    TriggerRunnerSupervisor.start = staticmethod(start)  # type: ignore[method-assign, assignment]


def end_node_tasks_without_callback_requests() -> None:
    """Register the TaskSuccessEvent handler; once per process, and never failing the process."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from airflow.models import trigger as trigger_model
        from airflow.triggers.base import TaskSuccessEvent
        from airflow.utils.state import TaskInstanceState

        airflow_handler = trigger_model.handle_event_submit.dispatch(TaskSuccessEvent)
    except Exception:  # another Airflow: its own handler stays
        log.warning("could not install the dbt node tasks' success handler", exc_info=True)
        return

    def _end_node_task(event: Any, *, task_instance: Any, session: Any) -> None:
        trigger = task_instance.trigger
        if (
            trigger is None
            or trigger.classpath != NODE_TRIGGER_CLASS
            or trigger.kwargs.get(SUCCESS_CALLBACK_ARGUMENT, True)
        ):
            airflow_handler(event, task_instance=task_instance, session=session)
            return
        task_instance.trigger_id = None  # as Airflow's handler: the task does not resume in a worker
        task_instance.set_state(TaskInstanceState.SUCCESS, session=session)
        for key, value in (event.xcoms or {}).items():
            task_instance.xcom_push(key=key, value=value)
        session.flush()

    trigger_model.handle_event_submit.register(TaskSuccessEvent, _end_node_task)
