"""Watcher-mode node tasks that wait in the triggerer, and end there when no worker is needed.

In Cosmos' watcher mode one producer task runs `dbt build`; every other dbt task only waits for
its node's result. As a polling sensor, each of those tasks is a worker process asking for its
result every second for as long as the build runs: on two cores, a few dozen of them slowed the
producer's own build two- to four-fold (the README's measurements).

Here a node's task starts in a worker, which ends it at once when its node is done already (the
usual case once the build is ahead of the graph's tasks); else it defers to the triggerer, where
`NodeResultTrigger` waits. A success (or a skip) then ends the task right in the triggerer, its dbt
result and compiled SQL written to its task log: no second worker process. A failure resumes the
task in a worker, where Cosmos' sensor raises (naming the node) and so runs the failure callbacks
(the alert); a retry or a cleared task starts in a worker again and runs dbt for that node alone.

The producer itself publishes each node's result as XComs from dbt's own threads, one API round
trip at a time (Cosmos' `safe_xcom_push`, under one lock): at 50 ms a push and about six pushes a
node, dbt's threads spent most of a large build waiting. `queue_xcom_pushes` hands those pushes to
one thread of the producer, which sends the latest value of each key in order, so dbt never waits.

All triggers of a triggerer share one pace (`POLLS_PER_SECOND`) and one read of each producer's
state per second: with hundreds of nodes waiting, their polls would otherwise take the api-server's
CPU from the build they wait for. The Asset event of each node the build made is emitted by one
task of the group as soon as the build ends (`emit_built_assets`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from airflow.sdk import Asset, AssetAlias
from airflow.triggers.base import TaskSkippedEvent, TaskSuccessEvent, TriggerEvent
from cosmos.listeners.dag_run_listener import EventStatus
from cosmos.operators._watcher.state import (
    PRODUCER_FINAL_STATES,
    ProducerTaskState,
    get_compiled_sql_xcom_key,
    get_dbt_event_xcom_key,
    get_status_xcom_key,
    is_dbt_node_status_failed,
    is_dbt_node_status_skipped,
    is_dbt_node_status_success,
)
from cosmos.operators._watcher.triggerer import WatcherEventReason, WatcherTrigger

from include.triggerer_setup import NODE_TRIGGER_CLASS, PUBLISHED_RESULTS_KEY, SUCCESS_CALLBACK_ARGUMENT

logger = logging.getLogger(__name__)

TRIGGER_CLASS = NODE_TRIGGER_CLASS
DBT_SUCCESS_STATUSES = ("success", "pass", "warn")
POLLS_PER_SECOND = 20  # node-result reads per second, all triggers of this triggerer process together


def dbt_result_line(unique_id: str, event: Mapping[str, Any] | None) -> str:
    """One node's dbt result as its task log shows it: status, timing and dbt's message."""
    event = event or {}
    timing = f", {event.get('start_time')} → {event.get('finish_time')}" if event.get("start_time") else ""
    return f"dbt result of {unique_id}: {event.get('status') or 'no status reported'}{timing}: {event.get('msg') or ''}"


def _freshness_result(unique_id: str, published: Mapping[str, Any]) -> dict[str, Any] | None:
    """A source's result: `dbt source freshness` publishes its status only, no dbt event."""
    status = published.get(get_status_xcom_key(unique_id)) if unique_id.startswith("source.") else None
    return {"status": status, "msg": "source freshness"} if status else None


class _Pace:
    """At most `per_second` reads per second, shared by every coroutine that awaits `turn()`."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self.next_slot = 0.0

    async def turn(self) -> None:
        now = time.monotonic()
        slot = max(now, self.next_slot)
        self.next_slot = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


_pace = _Pace(POLLS_PER_SECOND)
# Reads shared by every trigger of a run: (dag_id, run_id, producer task, what) -> (read at, value).
_shared: dict[tuple[str, ...], tuple[float, Any]] = {}
_shared_locks: dict[tuple[str, ...], asyncio.Lock] = {}
WAIT_STEP_S = 0.25  # a trigger's loop; what it reads is cached per run, so a step costs no API call
EVENT_READS = 5  # reads of the published results, PUBLISHED_RESULTS_EVERY_S apart, for a node's event


class NodeResultTrigger(WatcherTrigger):
    """Cosmos' WatcherTrigger, paced, ending the task itself when its node succeeded or was skipped.

    `watched` names the dbt nodes whose results the task log shows (a model's tests, or the node);
    `success_callback` says whether the task has one: without, the triggerer ends it without a
    callback request (include/triggerer_setup.py).
    """

    def __init__(
        self,
        *,
        watched: list[str] | None = None,
        success_callback: bool = True,
        dag_id: str = "",
        run_id: str = "",
        map_index: int | None = -1,
        **kwargs: Any,
    ) -> None:
        super().__init__(dag_id=dag_id, run_id=run_id, map_index=map_index, **kwargs)
        self.watched = list(watched or [self.model_unique_id])
        self.success_callback = success_callback
        self._producer_ended_at: float | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return TRIGGER_CLASS, {**kwargs, "watched": self.watched, SUCCESS_CALLBACK_ARGUMENT: self.success_callback}

    def _started_by_scheduler(self) -> bool:
        """Whether the scheduler started this trigger (`start_from_trigger`): then the arguments fixed
        when the DAG was parsed have no run, and the task instance the triggerer hands over has it."""
        if self.run_id or self.task_instance is None:
            return False
        self.dag_id, self.run_id = self.task_instance.dag_id, self.task_instance.run_id
        self.map_index = self.task_instance.map_index
        return True

    async def _shared_read(self, what: str, max_age: float, read: Any) -> Any:
        """`read()`'s value, read at most once per `max_age` for all triggers of this run (a value never
        read, or read as None with an infinite `max_age`, is read now)."""
        key = (self.dag_id, self.run_id, self.producer_task_id, what)
        async with _shared_locks.setdefault(key, asyncio.Lock()):
            read_at, value = _shared.get(key, (None, None))
            if read_at is None or time.monotonic() - read_at >= max_age or (value is None and max_age == math.inf):
                await _pace.turn()
                started = time.monotonic()  # what was read is at least as new as this
                value = await read()
                _shared[key] = (started, value)
        if len(_shared) > 1000:  # the triggerer lives for many runs: forget runs not read for 10 minutes
            for stale in [k for k, (at, _) in _shared.items() if time.monotonic() - at > 600]:
                _shared.pop(stale, None)
                _shared_locks.pop(stale, None)
        return value

    async def get_xcom_val(self, key: str) -> Any | None:
        # Cosmos' own logs a line per read into the task's log; reads here are paced and shared.
        return await self.get_xcom_val_af3(key)

    async def _producer_state(self) -> str | None:
        """The producer's state, read at most once per poke interval for all triggers of its run."""
        return await self._shared_read("state", self.poke_interval, self._get_producer_task_status)

    def _result_key(self) -> str:
        if self.is_test_sensor:
            from cosmos.operators._watcher.aggregation import get_tests_status_xcom_key

            return get_tests_status_xcom_key(self.model_unique_id)
        return get_status_xcom_key(self.model_unique_id)

    async def _node_status(self, *, unlisted_too: bool = False) -> str | None:
        """The node's dbt status, once the producer lists it as published (or, `unlisted_too`, read alone)."""
        key = self._result_key()
        published = await self._published()
        if isinstance(published, dict) and key in published:
            return published[key]
        if not unlisted_too and key not in (published or ()):  # a list: from a producer of before the statuses
            return None
        await _pace.turn()
        value = await self.get_xcom_val(key)
        if self.is_test_sensor or value is None:
            return value
        self._outlet_uris = value.get("outlet_uris", [])
        return value.get("status")

    async def _published(self) -> Any:
        """The producer's published results, read at most PUBLISHED_RESULTS_EVERY_S ago; once this trigger
        saw the producer end, read after that (the producer sends everything before it ends). None until
        the producer has sent them (the triggerer reads them quietly till then: include/triggerer_setup.py)."""
        max_age = PUBLISHED_RESULTS_EVERY_S
        if self._producer_ended_at is not None:
            max_age = min(max_age, time.monotonic() - self._producer_ended_at)
        return await self._shared_read("published", max_age, lambda: self.get_xcom_val(PUBLISHED_RESULTS_KEY))

    async def _watched_events(self) -> dict[str, Any]:
        """Each watched node's terminal dbt event, from the published results.

        Cosmos takes a node's status from dbt's result line, which comes before the node's terminal
        event: a result can be published a moment before its event, so the published results are read
        again, for up to a second. A producer that publishes no dict (`dag.test()`) has each key read.
        """
        keys = {unique_id: get_dbt_event_xcom_key(unique_id) for unique_id in self.watched}
        awaited = [key for unique_id, key in keys.items() if not unique_id.startswith("source.")]
        for attempt in range(EVENT_READS):
            published = await self._published()
            if not isinstance(published, dict):
                return {unique_id: await self.get_xcom_val(key) for unique_id, key in keys.items()}
            if all(key in published for key in awaited) or attempt == EVENT_READS - 1:
                return {unique_id: published.get(key) or _freshness_result(unique_id, published)
                        for unique_id, key in keys.items()}  # fmt: skip
            await asyncio.sleep(PUBLISHED_RESULTS_EVERY_S)
        return {}

    async def _log_results(self) -> None:
        for unique_id, event in (await self._watched_events()).items():
            logger.info("%s", dbt_result_line(unique_id, event))
        if not self.is_test_sensor and self.model_unique_id.startswith("model."):  # only a model has one
            compiled_sql = await self._compiled_sql()
            if compiled_sql:
                logger.info("compiled SQL of %s:\n%s", self.model_unique_id, compiled_sql)

    async def _compiled_sql(self) -> str | None:
        """The model's compiled SQL: from the page the published results name for it (`QueuedXComPushes`
        sends it there, before the results that list the model), else its own key."""
        key = get_compiled_sql_xcom_key(self.model_unique_id)
        published = await self._published()
        page = published.get(key) if isinstance(published, dict) else None
        if not isinstance(page, int):
            return await self.get_xcom_val(key)
        sql_page = await self._shared_read(f"sql page {page}", math.inf,
                                           lambda: self.get_xcom_val(sql_page_key(page)))  # fmt: skip
        return sql_page.get(key) if isinstance(sql_page, dict) else None

    async def run(self) -> AsyncIterator[TriggerEvent]:
        if self._started_by_scheduler() and int(self.task_instance.try_number or 1) > 1:
            # A retry or a cleared task: as Cosmos' sensor, once the build is over the worker runs
            # dbt for this node alone (while it runs, the task waits for the build's result).
            if await self._producer_state() in PRODUCER_FINAL_STATES:
                try_number = self.task_instance.try_number
                logger.info("try %s: a worker runs dbt for %s alone", try_number, self.model_unique_id)
                yield TriggerEvent({"status": EventStatus.FAILED, "reason": RERUN_IN_WORKER})
                return
        logger.info("waiting for the dbt result of %s from %s", self.model_unique_id, self.producer_task_id)
        producer = None  # the producer's state once it ended: then every result is published
        while True:
            status = await self._node_status(unlisted_too=producer is not None)
            if is_dbt_node_status_success(status):
                await self._log_results()
                yield TaskSuccessEvent()
                return
            if is_dbt_node_status_skipped(status):
                await self._log_results()
                yield TaskSkippedEvent()
                return
            if is_dbt_node_status_failed(status):
                # The worker raises, naming the node, and runs the failure callbacks (the alert).
                yield TriggerEvent({"status": EventStatus.FAILED, "reason": WatcherEventReason.NODE_FAILED})
                return
            if producer == ProducerTaskState.SUCCESS:
                logger.info("the build finished without running %s (an ephemeral or empty model)", self.model_unique_id)
                yield TaskSuccessEvent()
                return
            if producer == ProducerTaskState.FAILED:
                yield TriggerEvent({"status": EventStatus.FAILED, "reason": WatcherEventReason.PRODUCER_FAILED})
                return
            if producer == ProducerTaskState.SKIPPED:
                yield TriggerEvent({"status": EventStatus.FAILED, "reason": WatcherEventReason.PRODUCER_SKIPPED})
                return
            state = await self._producer_state()
            if state in (ProducerTaskState.SUCCESS, ProducerTaskState.FAILED, ProducerTaskState.SKIPPED):
                producer, self._producer_ended_at = state, time.monotonic()  # read its results once more
                continue
            await asyncio.sleep(WAIT_STEP_S)


# The XCom keys Cosmos' producer publishes per dbt node (`<unique_id with __>_<suffix>`).
EVENT_KEY_SUFFIX = "_dbt_event"
COMPILED_SQL_KEY_SUFFIX = "_compiled_sql"
# What the node tasks wait for: a model's `_status`, its tests' `_tests_status` (both end so).
RESULT_KEY_SUFFIX = "_status"
TESTS_RESULT_KEY_SUFFIX = "_tests_status"
NODE_KEY_SUFFIXES = (EVENT_KEY_SUFFIX, RESULT_KEY_SUFFIX, COMPILED_SQL_KEY_SUFFIX, TESTS_RESULT_KEY_SUFFIX)
SQL_WAIT_S = 1.0  # how long a model's published-only success waits for its compiled SQL
# PUBLISHED_RESULTS_KEY: one XCom mapping every result key sent so far to its dbt status, and every node's
# terminal event key to what its task logs of it, so a waiting trigger reads one key a run, not its node's:
# at 200 models one read per node kept the last nodes' tasks waiting tens of seconds after the build.
LOGGED_EVENT_FIELDS = ("status", "start_time", "finish_time", "msg")  # dbt_result_line's
OUTLET_URIS_SUFFIX = "_outlet_uris"  # a model's Asset URIs, as its `_status` XCom has them


def outlet_uris_key(status_key: str) -> str:
    """Where the published results keep the Asset URIs of the model whose `_status` key this is."""
    return status_key.removesuffix(RESULT_KEY_SUFFIX) + OUTLET_URIS_SUFFIX


def _is_success(key: str, value: Any) -> bool:
    """Whether a node key's value is a success or a skip: a result's status, or a terminal event's."""
    if key.endswith(RESULT_KEY_SUFFIX):
        status = value.get("status") if isinstance(value, dict) else value
    elif key.endswith(EVENT_KEY_SUFFIX) and isinstance(value, dict):
        status = value.get("status")
    else:
        return False
    return is_dbt_node_status_success(status) or is_dbt_node_status_skipped(status)


PUBLISHED_RESULTS_EVERY_S = 0.25
SQL_PAGE_KEY_PREFIX = "dbt_compiled_sql_page_"


def sql_page_key(page: int) -> str:
    """The XCom key of a page of compiled SQL (`QueuedXComPushes`)."""
    return f"{SQL_PAGE_KEY_PREFIX}{page}"


# A node's dbt event while it runs (NodeStart, NodeCompiling, NodeExecuting): no task reads it, a
# node's task logs the terminal one.
RUNNING_NODE_STATUSES = frozenset({"started", "compiling", "executing", None})


class QueuedXComPushes:
    """A task instance's per-node XCom pushes, sent in order by one thread; callers never wait.

    A key pushed again before it was sent is sent once, with its latest value, after every push
    queued before that value (a reader who sees it also sees what was pushed earlier). Any other key
    waits for the queue to empty and is sent at once, so it stays ordered after the node results.
    `close()` sends everything left and raises the first failed push.

    After sending node results it also sends `PUBLISHED_RESULTS_KEY`, each result key sent so far
    with its dbt status (a model's also with its Asset URIs, `outlet_uris_key`) and each terminal
    event with its logged fields: when the queue runs empty, or every `PUBLISHED_RESULTS_EVERY_S`
    while it does not. A key there has been sent, with that value.

    With `successes_published_only` (node tasks that wait in the triggerer read the published
    results, and only a failed node's task reads its keys, in a worker) a result or event that is a
    success or a skip is not sent on its own, only published: at 200 models that saved about 800 of
    1,200 pushes, each a round trip the api-server spent CPU on while the build needed it. Its place
    in the order is kept: it is published once everything queued before it has been sent. Compiled
    SQL, which only the model's own task logs, goes out in pages: the models' SQL that arrived since
    the last published results, in one XCom (`sql_page_key`) sent just before the next published
    results, which give each model's page number under its compiled SQL key. A model's status is
    published with its SQL (or after SQL_WAIT_S without): its task finds the SQL when it ends.
    """

    def __init__(self, push: Any, *, successes_published_only: bool = False) -> None:
        self._push = push
        self._successes_published_only = successes_published_only
        self._pending: dict[str, tuple[Any, bool]] = {}  # key -> (value, published only)
        self._in_flight = False
        self._closed = False
        self._error: BaseException | None = None
        self._published: dict[str, Any] = {}
        self._published_sent_at = 0.0
        self._published_pending = False
        self._awaiting_sql: dict[str, tuple[str, Any, float]] = {}  # node -> its published-only status
        self._sql_page: dict[str, Any] = {}  # compiled SQL keys -> SQL, sent with the next published results
        self.sql_pages = 0  # pages sent
        # Published at once, empty: a node task that asks before the first result reads "nothing yet", not a 404.
        self._published_pending = successes_published_only
        self._changed = threading.Condition()
        self.sent = self.replaced = self.skipped = self.published_only = self.sql_paged = 0
        self._thread = threading.Thread(target=self._send_all, name="cosmos-xcom-pushes", daemon=True)
        self._thread.start()

    def xcom_push(self, key: str, value: Any, **kwargs: Any) -> None:
        if kwargs or "__" not in key or not key.endswith(NODE_KEY_SUFFIXES):
            self.flush()
            self._push(key=key, value=value, **kwargs)
            return
        if key.endswith(EVENT_KEY_SUFFIX) and isinstance(value, dict) and value.get("status") in RUNNING_NODE_STATUSES:
            self.skipped += 1
            return
        published_only = self._successes_published_only and _is_success(key, value)
        with self._changed:
            if self._pending.pop(key, None) is not None:
                self.replaced += 1
            self._pending[key] = (value, published_only)
            self._changed.notify_all()

    def _send_all(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed and not self._published_pending:
                    self._changed.wait(SQL_WAIT_S if self._awaiting_sql else None)
                    self._publish_awaiting_sql(older_than=SQL_WAIT_S)
                if self._closed and not self._pending:
                    self._publish_awaiting_sql(older_than=0.0)
                since_published = time.monotonic() - self._published_sent_at
                if self._published_pending and not self._pending and not self._closed and (
                    self._successes_published_only and since_published < PUBLISHED_RESULTS_EVERY_S
                ):  # successes arrive faster than round trips: publish at most every PUBLISHED_RESULTS_EVERY_S
                    self._changed.wait(PUBLISHED_RESULTS_EVERY_S - since_published)
                    continue
                if self._published_pending and (not self._pending or since_published >= PUBLISHED_RESULTS_EVERY_S):
                    sends = [(PUBLISHED_RESULTS_KEY, dict(self._published))]
                    if self._sql_page:  # before the results that name it
                        sends.insert(0, (sql_page_key(self.sql_pages), self._sql_page))
                        self._sql_page, self.sql_pages = {}, self.sql_pages + 1
                    self._published_pending, self._published_sent_at = False, time.monotonic()
                elif self._pending:
                    key = next(iter(self._pending))
                    value, published_only = self._pending.pop(key)
                    sends = [(key, value)]
                    if self._successes_published_only and key.endswith(COMPILED_SQL_KEY_SUFFIX):
                        self._sql_page[key] = value
                        self._published[key] = self.sql_pages  # the page it goes out in
                        self._published_pending = True
                        self.sql_paged += 1
                        self._publish_status_awaiting(key)
                        continue
                    if published_only:
                        self.published_only += 1
                        node = key.removesuffix(RESULT_KEY_SUFFIX)
                        if key.startswith("model__") and key.endswith(RESULT_KEY_SUFFIX) and (
                            not key.endswith(TESTS_RESULT_KEY_SUFFIX)
                        ) and node + COMPILED_SQL_KEY_SUFFIX not in self._published:
                            # Its compiled SQL follows (Cosmos pushes it right after): published with it.
                            self._awaiting_sql[node] = (key, value, time.monotonic())
                        else:
                            self._publish(key, value)
                        continue
                else:
                    return
                self._in_flight = True
            for key, value in sends:
                self._send(key, value)
            with self._changed:
                self._in_flight = False
                self._changed.notify_all()

    def _send(self, key: str, value: Any) -> None:
        sent = False
        try:
            self._push(key=key, value=value)
            sent = True
        except BaseException as error:  # kept for close(); the rest is still sent
            self._error = self._error or error
        finally:
            with self._changed:
                if sent:
                    self.sent += 1
                    self._publish(key, value)
                if key.endswith(COMPILED_SQL_KEY_SUFFIX):
                    self._publish_status_awaiting(key)

    def _publish_status_awaiting(self, compiled_sql_key: str) -> None:
        """Publish the model's success that waited for this compiled SQL (the caller holds the lock)."""
        awaiting = self._awaiting_sql.pop(compiled_sql_key.removesuffix(COMPILED_SQL_KEY_SUFFIX), None)
        if awaiting is not None:
            self._publish(*awaiting[:2])

    def _publish_awaiting_sql(self, *, older_than: float) -> None:
        """Publish the successes still waiting for their compiled SQL since `older_than` seconds (a model
        whose compiled file is missing or empty has none)."""
        now = time.monotonic()
        for node, (key, value, since) in list(self._awaiting_sql.items()):
            if now - since >= older_than:
                del self._awaiting_sql[node]
                self._publish(key, value)

    def _publish(self, key: str, value: Any) -> None:
        """Add a node's result or terminal event to the published results (the caller holds the lock)."""
        if key.endswith(RESULT_KEY_SUFFIX):  # a model's {"status", ...}, its tests' status
            self._published[key] = value.get("status") if isinstance(value, dict) else value
            if isinstance(value, dict):  # for emit_built_assets: one read, not one a model
                self._published[outlet_uris_key(key)] = value.get("outlet_uris") or []
            self._published_pending = True
        elif key.endswith(EVENT_KEY_SUFFIX) and isinstance(value, dict):
            self._published[key] = {field: value.get(field) for field in LOGGED_EVENT_FIELDS}

    def flush(self) -> None:
        with self._changed:
            while self._pending or self._in_flight or self._published_pending:
                self._changed.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error


def _comms_are_thread_safe() -> bool:
    """A task process talks to its supervisor through a CommsDecoder, whose `send` holds a lock; the
    in-process comms of `dag.test()` do not, and drop the module's SUPERVISOR_COMMS while sending."""
    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.comms import CommsDecoder

    return isinstance(getattr(task_runner, "SUPERVISOR_COMMS", None), CommsDecoder)


def queue_xcom_pushes(producer: Any, *, successes_published_only: bool = False) -> None:
    """Make the watcher producer publish its node results through `QueuedXComPushes`.

    Every queued push is sent before the producer's `execute` returns or raises: its node tasks
    read "the producer finished" as "every result is published".
    """
    execute = producer.execute

    def execute_with_queued_pushes(context: Any, **kwargs: Any) -> Any:
        ti = context["ti"]
        if not _comms_are_thread_safe():  # `dag.test()` runs tasks in-process: Cosmos' own pushes
            return execute(context, **kwargs)
        queue = QueuedXComPushes(ti.xcom_push, successes_published_only=successes_published_only)
        object.__setattr__(ti, "xcom_push", queue.xcom_push)  # the instance's own (a pydantic model's)
        started = time.monotonic()
        try:
            return execute(context, **kwargs)
        finally:
            waited = time.monotonic()
            try:
                queue.close()
            finally:
                vars(ti).pop("xcom_push", None)
                logger.info("node results published: %d XCom pushes (%d superseded before sending, %d running "
                            "states not sent, %d successes only published, %d compiled SQL texts in %d pages); "
                            "the last sent %.1f s after dbt ended, %.1f s in all", queue.sent, queue.replaced,
                            queue.skipped, queue.published_only, queue.sql_paged, queue.sql_pages,
                            time.monotonic() - waited, time.monotonic() - started)  # fmt: skip

    producer.execute = execute_with_queued_pushes


# The event that resumes a retried or cleared task in a worker, which runs dbt for its node alone.
RERUN_IN_WORKER = "rerun_in_worker"


def start_in_triggerer(task: Any, watched: list[str]) -> None:
    """Make a Cosmos watcher sensor start as a NodeResultTrigger (`start_from_trigger`): the scheduler
    hands it to the triggerer without a worker process. Only what is known when the DAG is parsed is
    fixed here; the trigger takes its run from the task instance.

    The task resumes in a worker only to fail (Cosmos' `execute_complete` raises, naming the node, and
    the failure callbacks alert) or, when retried or cleared, to run dbt for its node alone (Cosmos'
    `execute`, which on a later try falls back to a per-node run once the build is over).
    """
    from airflow.triggers.base import StartTriggerArgs

    task.start_from_trigger = True
    task.start_trigger_args = StartTriggerArgs(
        trigger_cls=TRIGGER_CLASS,
        trigger_kwargs={
            "model_unique_id": task.model_unique_id,
            "producer_task_id": task.producer_task_id,
            "poke_interval": float(task.poke_interval),
            "is_test_sensor": task.is_test_sensor,
            "watched": watched,
            SUCCESS_CALLBACK_ARGUMENT: bool(task.on_success_callback),
        },
        next_method="execute_complete",
        next_kwargs=None,
        timeout=task.execution_timeout,
    )
    cosmos_execute_complete = task.execute_complete

    @functools.wraps(cosmos_execute_complete)
    def execute_complete(context: Any, event: dict[str, Any], **kwargs: Any) -> Any:
        if (event or {}).get("reason") == RERUN_IN_WORKER:
            return task.execute(context)
        return cosmos_execute_complete(context, event, **kwargs)

    task.execute_complete = execute_complete


def defer_to_node_result_trigger(task: Any, watched: list[str]) -> None:
    """Make a Cosmos watcher sensor defer to NodeResultTrigger instead of Cosmos' WatcherTrigger.

    Cosmos builds its trigger inside the sensor's `execute`; this wraps the task's `defer` to swap
    it for ours, with the same arguments and the nodes whose results the log should show.
    """
    cosmos_defer = task.defer

    def defer(*, trigger: Any, method_name: str, kwargs: dict[str, Any] | None = None, timeout: Any = None) -> None:
        if type(trigger) is WatcherTrigger:
            _, arguments = trigger.serialize()
            trigger = NodeResultTrigger(
                **arguments, watched=watched, success_callback=bool(task.on_success_callback)
            )
        cosmos_defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    task.defer = defer


def node_events(ti: Any, producer_task_id: str, unique_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each node's last dbt event as the producer published it, by unique id ({} when there is none).

    One read of the published results, then each node's own key for what is not there (a producer
    run in-process by `dag.test()`); a success or a skip may be published only (`QueuedXComPushes`).
    """
    published = ti.xcom_pull(task_ids=producer_task_id, key=PUBLISHED_RESULTS_KEY)
    published = published if isinstance(published, dict) else {}
    events = {}
    for unique_id in unique_ids:
        key = get_dbt_event_xcom_key(unique_id)
        events[unique_id] = published.get(key) or ti.xcom_pull(task_ids=producer_task_id, key=key) or {}
    return events


def failed_results(ti: Any, producer_task_id: str, watched: list[str]) -> list[str]:
    """`<node name>: <dbt's message>` for each watched node the build did not report as a success.

    dbt's last event for a failed test is its error summary, which has the message but no status
    (and the producer's retry restores that one), so a message without a status counts as well.
    """
    found = []
    for unique_id, event in node_events(ti, producer_task_id, watched).items():
        status, message = event.get("status"), event.get("msg")
        if status in DBT_SUCCESS_STATUSES or is_dbt_node_status_skipped(status) or not (status or message):
            continue
        found.append(f"{unique_id.split('.')[2]}: {message or status}")
    return found


def say_what_dbt_found(task: Any, watched: list[str]) -> None:
    """Make a node task that fails on its node's result say what dbt found, in its error (so in the alert).

    Cosmos' sensors raise "dbt tests for model '…' failed. Review the producer task '…' logs": the
    alert named the model but not the failing test nor what it found. The error now starts with
    Cosmos' first sentence and goes on with each failed node's dbt message.
    """
    from airflow.sdk.exceptions import AirflowException

    for name in ("execute", "execute_complete"):
        cosmos_method = getattr(task, name)

        # Cosmos defers naming `self.execute_complete.__name__`: the wrapper keeps the name.
        @functools.wraps(cosmos_method)
        def explained(context: Any, *args: Any, _cosmos_method: Any = cosmos_method, **kwargs: Any) -> Any:
            try:
                return _cosmos_method(context, *args, **kwargs)
            except AirflowException as error:
                found = failed_results(context["ti"], task.producer_task_id, watched)
                if not found:
                    raise
                first = str(error).split(". Review", 1)[0].rstrip(".")
                raise AirflowException(f"{first}: {'; '.join(found)}") from error

        setattr(task, name, explained)


def emit_built_assets(alias: str, producer_task_id: str, unique_ids: list[str], **context: Any) -> list[str]:
    """Emit the Asset event of every node among `unique_ids` that the producer's build made.

    The URIs are those Cosmos computed for each node (the producer publishes them with its result);
    the events go out through the AssetAlias `alias`, each with the dbt node in its extra. Returns
    the URIs emitted.
    """
    ti = context["ti"]
    events = context["outlet_events"][AssetAlias(alias)]
    # One read of the published results (at 200 models one read per model was 4 s on the critical
    # path); a model missing there (a producer run in-process by `dag.test()`) is read on its own.
    published = ti.xcom_pull(task_ids=producer_task_id, key=PUBLISHED_RESULTS_KEY)
    published = published if isinstance(published, dict) else {}
    emitted, read_alone = [], 0
    for unique_id in unique_ids:
        key = get_status_xcom_key(unique_id)
        if key in published and outlet_uris_key(key) in published:
            result = {"status": published[key], "outlet_uris": published[outlet_uris_key(key)]}
        else:
            result = ti.xcom_pull(task_ids=producer_task_id, key=key) or {}
            read_alone += 1
        if is_dbt_node_status_success(result.get("status")):
            for uri in result.get("outlet_uris") or []:
                events.add(Asset(uri=uri), extra={"dbt_node": unique_id})
                emitted.append(uri)
    logger.info("Asset events of %d built dbt node(s) of %d (%d result(s) read alone, not published): %s",
                len(emitted), len(unique_ids), read_alone, emitted)  # fmt: skip
    return emitted
