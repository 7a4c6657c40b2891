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

All triggers of a triggerer share one pace (`POLLS_PER_SECOND`) and one read of each producer's
state per second: with hundreds of nodes waiting, their polls would otherwise take the api-server's
CPU from the build they wait for. The Asset event of each node the build made is emitted by one
task of the group as soon as the build ends (`emit_built_assets`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from airflow.sdk import Asset, AssetAlias
from airflow.triggers.base import TaskSkippedEvent, TaskSuccessEvent, TriggerEvent
from cosmos.listeners.dag_run_listener import EventStatus
from cosmos.operators._watcher.state import (
    ProducerTaskState,
    get_compiled_sql_xcom_key,
    get_dbt_event_xcom_key,
    get_status_xcom_key,
    is_dbt_node_status_failed,
    is_dbt_node_status_skipped,
    is_dbt_node_status_success,
)
from cosmos.operators._watcher.triggerer import WatcherEventReason, WatcherTrigger

logger = logging.getLogger(__name__)

TRIGGER_CLASS = f"{__name__}.NodeResultTrigger"
DBT_SUCCESS_STATUSES = ("success", "pass", "warn")
POLLS_PER_SECOND = 20  # node-result reads per second, all triggers of this triggerer process together


def dbt_result_line(unique_id: str, event: Mapping[str, Any] | None) -> str:
    """One node's dbt result as its task log shows it: status, timing and dbt's message."""
    event = event or {}
    return (f"dbt result of {unique_id}: {event.get('status') or 'no status reported'}, "
            f"{event.get('start_time')} → {event.get('finish_time')}: {event.get('msg') or ''}")  # fmt: skip


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
_producer_states: dict[tuple[str, str, str], tuple[float, str | None]] = {}


class NodeResultTrigger(WatcherTrigger):
    """Cosmos' WatcherTrigger, paced, ending the task itself when its node succeeded or was skipped.

    `watched` names the dbt nodes whose results the task log shows (a model's tests, or the node).
    """

    def __init__(self, *, watched: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.watched = list(watched or [self.model_unique_id])

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return TRIGGER_CLASS, {**kwargs, "watched": self.watched}

    async def _producer_state(self) -> str | None:
        """The producer's state, read at most once per poke interval for all triggers of its run."""
        key = (self.dag_id, self.run_id, self.producer_task_id)
        read_at, state = _producer_states.get(key, (0.0, None))
        if time.monotonic() - read_at >= self.poke_interval:
            state = await self._get_producer_task_status()
            _producer_states[key] = (time.monotonic(), state)
        return state

    async def _node_status(self) -> str | None:
        await _pace.turn()
        if self.is_test_sensor:
            from cosmos.operators._watcher.aggregation import get_tests_status_xcom_key

            return await self.get_xcom_val(get_tests_status_xcom_key(self.model_unique_id))
        return await self._get_node_status()

    async def _log_results(self) -> None:
        for unique_id in self.watched:
            logger.info("%s", dbt_result_line(unique_id, await self.get_xcom_val(get_dbt_event_xcom_key(unique_id))))
        if not self.is_test_sensor:
            compiled_sql = await self.get_xcom_val(get_compiled_sql_xcom_key(self.model_unique_id))
            if compiled_sql:
                logger.info("compiled SQL of %s:\n%s", self.model_unique_id, compiled_sql)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        logger.info("waiting for the dbt result of %s from %s", self.model_unique_id, self.producer_task_id)
        while True:
            status = await self._node_status()
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
            producer = await self._producer_state()
            if producer == ProducerTaskState.FAILED:
                yield TriggerEvent({"status": EventStatus.FAILED, "reason": WatcherEventReason.PRODUCER_FAILED})
                return
            if producer == ProducerTaskState.SKIPPED:
                yield TriggerEvent({"status": EventStatus.FAILED, "reason": WatcherEventReason.PRODUCER_SKIPPED})
                return
            if producer == ProducerTaskState.SUCCESS and await self._node_status() is None:
                logger.info("the build finished without running %s (an ephemeral or empty model)", self.model_unique_id)
                yield TaskSuccessEvent()
                return
            await asyncio.sleep(self.poke_interval)


def defer_to_node_result_trigger(task: Any, watched: list[str]) -> None:
    """Make a Cosmos watcher sensor defer to NodeResultTrigger instead of Cosmos' WatcherTrigger.

    Cosmos builds its trigger inside the sensor's `execute`; this wraps the task's `defer` to swap
    it for ours, with the same arguments and the nodes whose results the log should show.
    """
    cosmos_defer = task.defer

    def defer(*, trigger: Any, method_name: str, kwargs: dict[str, Any] | None = None, timeout: Any = None) -> None:
        if type(trigger) is WatcherTrigger:
            _, arguments = trigger.serialize()
            trigger = NodeResultTrigger(**arguments, watched=watched)
        cosmos_defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    task.defer = defer


def emit_built_assets(alias: str, producer_task_id: str, unique_ids: list[str], **context: Any) -> list[str]:
    """Emit the Asset event of every node among `unique_ids` that the producer's build made.

    The URIs are those Cosmos computed for each node (the producer publishes them with its result);
    the events go out through the AssetAlias `alias`, each with the dbt node in its extra. Returns
    the URIs emitted.
    """
    ti = context["ti"]
    events = context["outlet_events"][AssetAlias(alias)]
    emitted = []
    for unique_id in unique_ids:
        result = ti.xcom_pull(task_ids=producer_task_id, key=get_status_xcom_key(unique_id)) or {}
        if is_dbt_node_status_success(result.get("status")):
            for uri in result.get("outlet_uris") or []:
                events.add(Asset(uri=uri), extra={"dbt_node": unique_id})
                emitted.append(uri)
    logger.info("Asset events of %d built dbt node(s) of %d: %s", len(emitted), len(unique_ids), emitted)
    return emitted
