"""Changes to the triggerer process, made at its start (`config/airflow_local_settings.py`), so
that the dbt node tasks it runs (include/dbt_watcher.py) cost it little and end when their result is in.

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

**A node task's trigger starts without the DAG** (`start_node_triggers_without_the_dag`),
**the trigger runner syncs with its supervisor every 0.1 s** (`sync_triggers_more_often`),
**a trigger's last log lines reach its task's log** (`write_trigger_logs_before_closing`), and
**the producer's published results, not sent yet, read as nothing yet** (`read_published_results_quietly`):
each function's docstring says why.

Kept free of dbt and Cosmos imports: `config/airflow_local_settings.py` installs it in the
triggerer process at start-up.
"""

from __future__ import annotations

import logging
import select
import selectors
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

NODE_TRIGGER_CLASS = "include.dbt_watcher.NodeResultTrigger"
SUCCESS_CALLBACK_ARGUMENT = "success_callback"  # the trigger's argument: does its task have one
# The XCom in which the watcher producer publishes every node result sent so far (include/dbt_watcher.py).
PUBLISHED_RESULTS_KEY = "dbt_published_results"
_installed = False


def install() -> None:
    end_node_tasks_without_callback_requests()
    warm_in_process_execution_api()
    start_node_triggers_without_the_dag()
    sync_triggers_more_often()
    write_trigger_logs_before_closing()
    read_published_results_quietly()


RUNNER_LOOP_S = 0.1  # Airflow's trigger runner: 1 s
CLEAN_UNUSED_EVERY_S = 1.0  # the supervisor's cleanup of unused triggers: as often as with Airflow's 1 s loop


class _ShorterWaits:
    """`anyio` as the trigger runner's module sees it, with its loop's wait capped at RUNNER_LOOP_S."""

    def __init__(self, anyio: Any) -> None:
        self._anyio = anyio

    def __getattr__(self, name: str) -> Any:
        return getattr(self._anyio, name)

    def move_on_after(self, delay: float | None, *args: Any, **kwargs: Any) -> Any:
        return self._anyio.move_on_after(min(delay, RUNNER_LOOP_S) if delay is not None else None, *args, **kwargs)


def sync_triggers_more_often() -> None:
    """Make the trigger runner exchange new triggers and their events with its supervisor every 0.1 s.

    The runner sleeps a second between exchanges (its loop's `anyio.move_on_after(1)`, not a
    setting), so a trigger started a second late on average and its event reached the database
    another half second later: a dbt node's task spent 2-3 s in the triggerer although its result was
    ready, on every step of the transform's chain.

    The supervisor's loop runs again for every message from the runner, its triggers' reads included,
    and each time assigns new triggers (queries over every trigger) and deletes unused ones. At 200
    dbt models that housekeeping took most of its time, and the reads it serves between two rounds
    waited 5-10 s each (py-spy of the triggerer). Now new triggers are assigned at most every
    RUNNER_LOOP_S and unused ones deleted at most every CLEAN_UNUSED_EVERY_S.
    """
    try:
        from airflow.jobs import triggerer_job_runner
    except Exception:
        log.warning("could not shorten the trigger runner's loop", exc_info=True)
        return
    if not isinstance(triggerer_job_runner.anyio, _ShorterWaits):
        triggerer_job_runner.anyio = _ShorterWaits(triggerer_job_runner.anyio)
    supervisor = triggerer_job_runner.TriggerRunnerSupervisor
    if not getattr(supervisor.clean_unused, "throttled", False):
        supervisor.load_triggers = _at_most_every(RUNNER_LOOP_S, supervisor.load_triggers)
        supervisor.clean_unused = _at_most_every(CLEAN_UNUSED_EVERY_S, supervisor.clean_unused)
        _skip_ended_triggers(supervisor)


def _skip_ended_triggers(supervisor: Any) -> None:
    """Keep a trigger that fired and stopped out of the supervisor's "new triggers" until it is deleted.

    Its row stays assigned to this triggerer until the cleanup deletes it; until then every
    `load_triggers` took it for a new trigger, fetched it and its task instance, and logged "TaskInstance
    of Trigger is None" (about 900 times in a 200-model run, with new triggers assigned every 0.1 s and
    the cleanup every second). A trigger still running after its event (an asset's) is not skipped.
    """
    airflow_event = supervisor.on_trigger_event
    airflow_update = supervisor.update_triggers
    fired: dict[int, set[int]] = {}  # by id() of the supervisor (an attrs class with slots)

    def on_trigger_event(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = airflow_event(self, *args, **kwargs)
        fired.setdefault(id(self), set()).add(kwargs.get("trigger_id", args[0] if args else None))
        return result

    def update_triggers(self: Any, requested_trigger_ids: set[int]) -> Any:
        mine = fired.setdefault(id(self), set())
        mine &= requested_trigger_ids  # a deleted trigger is forgotten
        return airflow_update(self, requested_trigger_ids - (mine - self.running_triggers))

    supervisor.on_trigger_event = on_trigger_event
    supervisor.update_triggers = update_triggers


def write_trigger_logs_before_closing() -> None:
    """Write the log lines a trigger sent before it finished into its task's log, then close that log.

    The trigger runner sends its triggers' log lines on one socket and, on another, which triggers
    finished; the supervisor closes a finished trigger's log file as that message arrives, and writes
    lines that come later for it into the triggerer's own log. When the supervisor was busy (serving
    its triggers' reads) both arrived in one round, in either order: a node task's log lost its dbt
    result, intermittently. The runner writes a line before it reports the trigger finished, so
    reading the log socket dry first puts every line in its file. The supervisor's loop reads that
    socket too, when a round began with lines waiting: it now reads only lines still waiting (a
    blocking read of a socket read dry here would stop the triggerer).
    """
    try:
        from airflow.jobs.triggerer_job_runner import TriggerRunnerSupervisor
    except Exception:
        log.warning("could not keep the triggers' last log lines in their tasks' logs", exc_info=True)
        return
    airflow_register = TriggerRunnerSupervisor._register_pipe_readers
    airflow_handle = TriggerRunnerSupervisor._handle_request
    if getattr(airflow_handle, "reads_logs_first", False):
        return

    def _register_pipe_readers(self: Any, stdout: Any, stderr: Any, requests: Any, logs: Any, **kwargs: Any) -> Any:
        result = airflow_register(self, stdout, stderr, requests, logs, **kwargs)
        try:
            read, on_close = self.selector.get_key(logs).data
            self.selector.modify(logs, selectors.EVENT_READ, (_only_when_waiting(read), on_close))
        except Exception:  # another Airflow's registration: its loop reads the lines, as before
            log.warning("could not keep the triggers' last log lines in their tasks' logs", exc_info=True)
        return result

    def _handle_request(self: Any, msg: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(msg, "finished", None):
            _read_waiting_log_lines(self)
        return airflow_handle(self, msg, *args, **kwargs)

    _handle_request.reads_logs_first = True  # type: ignore[attr-defined]
    TriggerRunnerSupervisor._register_pipe_readers = _register_pipe_readers  # type: ignore[method-assign]
    TriggerRunnerSupervisor._handle_request = _handle_request  # type: ignore[method-assign]


def _waiting(sock: Any) -> bool:
    """Whether reading `sock` now returns at once: data, or its end."""
    poll = select.poll()  # not select.select: a triggerer's descriptors can pass 1024
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))


def _only_when_waiting(read: Any) -> Any:
    """`read`, called only when its socket has something waiting (else True: keep reading it)."""

    def read_waiting(sock: Any) -> bool:
        return read(sock) if _waiting(sock) else True

    read_waiting.only_when_waiting = True  # type: ignore[attr-defined]
    return read_waiting


def _read_waiting_log_lines(supervisor: Any) -> None:
    """Hand every log line waiting on the supervisor's log socket to its reader, as its loop would."""
    sockets = getattr(supervisor, "_open_sockets", {})
    sock = next((sock for sock, kind in list(sockets.items()) if kind == "logs"), None)
    try:
        read, on_close = supervisor.selector.get_key(sock).data if sock is not None else (None, None)
    except (KeyError, ValueError):  # no longer read
        return
    if not getattr(read, "only_when_waiting", False):  # none, or the loop's read would block on a socket read dry
        return
    while _waiting(sock):
        try:
            more = read(sock)
        except (BrokenPipeError, ConnectionResetError):
            more = False
        if not more:  # the runner closed it: as the supervisor's loop does
            on_close(sock)
            sock.close()
            return


def read_published_results_quietly() -> None:
    """Read a producer's published results, until it has sent them, only when they are there.

    The node triggers of a run start with it, and the producer sends its (empty) published results as
    its `execute` starts: a second or more later on a busy machine. Airflow's API client logs every
    read of an XCom not there yet as an error ("XCom not found") in the triggerer's log. Until a
    run's producer has sent them, each read here first counts them (a HEAD request, which answers
    0 instead of 404) and reads nothing when there are none.
    """
    try:
        from airflow.sdk.api.client import XComOperations
        from airflow.sdk.api.datamodels._generated import XComResponse
    except Exception:
        log.warning("could not read the published results quietly", exc_info=True)
        return
    airflow_get = XComOperations.get
    if getattr(airflow_get, "quiet", False):
        return
    sent: dict[tuple[str, str, str], None] = {}  # producers that sent them, the last 1000

    def get(self: Any, dag_id: str, run_id: str, task_id: str, key: str, map_index: int | None = None,
            include_prior_dates: bool = False) -> Any:  # fmt: skip
        producer = (dag_id, run_id, task_id)
        unmapped = map_index in (None, -1) and not include_prior_dates
        if key == PUBLISHED_RESULTS_KEY and unmapped and producer not in sent:
            try:
                there = self.head(dag_id, run_id, task_id, key).len > 0
            except Exception:  # an API that cannot count them: read, as Airflow does
                there = True
            if not there:
                return XComResponse(key=key, value=None)  # what Airflow's client answers after its error line
            sent[producer] = None
            while len(sent) > 1000:
                sent.pop(next(iter(sent)))
        return airflow_get(self, dag_id, run_id, task_id, key, map_index, include_prior_dates)

    get.quiet = True  # type: ignore[attr-defined]
    XComOperations.get = get  # type: ignore[method-assign]


def _at_most_every(seconds: float, method: Any) -> Any:
    """`method`, skipped when it ran on the same object less than `seconds` ago."""
    last_run: dict[int, float] = {}

    def throttled(self: Any) -> None:
        now = time.monotonic()
        if now - last_run.get(id(self), -seconds) >= seconds:
            last_run[id(self)] = now
            method(self)

    throttled.throttled = True  # type: ignore[attr-defined]
    return throttled


class _NoDags:
    """A DAG bag without DAGs: Airflow then builds a trigger's plain workload, as for a deferred task."""

    def get_serialized_dag_model_for_run(self, *args: Any, **kwargs: Any) -> None:
        return None

    def get_serialized_dag_model(self, *args: Any, **kwargs: Any) -> None:
        return None


def start_node_triggers_without_the_dag() -> None:
    """Hand a dbt node task's trigger to the trigger runner without the serialized DAG.

    For a task that starts in the triggerer (`start_from_trigger`), Airflow deserializes the whole
    DAG for every trigger it starts (`SerializedDagModel.dag` is not cached), to find the task and
    send the DAG along so the runner can render the task's templates: at 200 models (a 406-task DAG)
    that was 36 s of the triggerer's CPU in a 97-150 s run, taken from the build the tasks wait for.
    NodeResultTrigger has no templates and takes its run from the task instance it is handed, so its
    workload is built from a DAG bag without DAGs: the plain workload of a deferred task.
    """
    try:
        from airflow.jobs.triggerer_job_runner import TriggerRunnerSupervisor
    except Exception:
        log.warning("could not install the dbt node triggers' workload", exc_info=True)
        return
    airflow_create = TriggerRunnerSupervisor._create_workload
    if getattr(airflow_create, "without_dag", False):
        return

    def _create_workload(self: Any, trigger: Any, *args: Any, **kwargs: Any) -> Any:
        if trigger.classpath == NODE_TRIGGER_CLASS and "dag_bag" in kwargs:
            kwargs["dag_bag"] = _NoDags()
        return airflow_create(self, trigger, *args, **kwargs)

    _create_workload.without_dag = True  # type: ignore[attr-defined]
    TriggerRunnerSupervisor._create_workload = _create_workload  # type: ignore[method-assign]


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
