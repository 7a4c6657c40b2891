"""Watcher-mode node tasks that start in the triggerer, and end there when no worker is needed.

In Cosmos' watcher mode one producer task runs `dbt build`; every other dbt task only waits for
its node's result. Run as a sensor, each of those tasks is a worker process that starts, parses its
DAG and asks for its result every second: on two cores, a few dozen of them slowed the producer's
own `dbt build` two- to four-fold (the README's measurements). Here each node's task starts as a
trigger instead (Airflow's `start_from_trigger`): the one triggerer process waits for all of them.

A node whose result is a success (or a skip) ends right there in the triggerer, its dbt result
written to its task log: no worker process at all. Every other outcome resumes the task in a worker,
where Cosmos' sensor does what it always does: raise (naming the node) on a failure and so run the
failure callbacks (the alert), or, on a retry or a cleared task, run dbt for that node alone.

The Asset event of each model the build made, which Cosmos' sensor would emit from its worker, is
emitted by one task of the group as soon as the build ends (`emit_built_assets`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from airflow.sdk import Asset, AssetAlias
from airflow.triggers.base import TaskSkippedEvent, TaskSuccessEvent, TriggerEvent
from cosmos.listeners.dag_run_listener import EventStatus
from cosmos.operators._watcher.state import (
    PRODUCER_FINAL_STATES,
    get_dbt_event_xcom_key,
    get_status_xcom_key,
    is_dbt_node_status_success,
)
from cosmos.operators._watcher.triggerer import WatcherEventReason, WatcherTrigger

logger = logging.getLogger(__name__)

TRIGGER_CLASS = f"{__name__}.NodeResultTrigger"
DBT_SUCCESS_STATUSES = ("success", "pass", "warn")


def dbt_result_line(unique_id: str, event: Mapping[str, Any] | None) -> str:
    """One node's dbt result as its task log shows it: status, timing and dbt's message."""
    event = event or {}
    return (f"dbt result of {unique_id}: {event.get('status') or 'no status reported'}, "
            f"{event.get('start_time')} → {event.get('finish_time')}: {event.get('msg') or ''}")  # fmt: skip


class NodeResultTrigger(WatcherTrigger):
    """Cosmos' WatcherTrigger, started by the scheduler rather than by a worker.

    The run it belongs to (run id, try number) is read from the task instance the triggerer gives
    it, so the task's start_trigger_args hold only what is known when the DAG is parsed.
    `watched` names the dbt nodes whose results the task log shows (a model's tests, or the node).
    """

    def __init__(self, *, watched: list[str] | None = None, run_id: str = "", map_index: int | None = -1,
                 dag_id: str = "", **kwargs: Any) -> None:  # fmt: skip
        super().__init__(run_id=run_id, map_index=map_index, dag_id=dag_id, **kwargs)
        self.watched = list(watched or [self.model_unique_id])

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return TRIGGER_CLASS, {**kwargs, "watched": self.watched}

    def _take_run_from_task_instance(self) -> int:
        ti = self.task_instance
        if ti is None:
            return 1
        self.run_id = self.run_id or ti.run_id
        self.dag_id = self.dag_id or ti.dag_id
        self.map_index = ti.map_index
        return int(getattr(ti, "try_number", 1) or 1)

    async def _log_results(self) -> None:
        for unique_id in self.watched:
            logger.info("%s", dbt_result_line(unique_id, await self.get_xcom_val(get_dbt_event_xcom_key(unique_id))))

    async def _wait_for_producer(self) -> None:
        while await self._get_producer_task_status() not in PRODUCER_FINAL_STATES:
            await asyncio.sleep(self.poke_interval)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try_number = self._take_run_from_task_instance()
        if try_number > 1:
            # A retry or a cleared task: once the build is over, the worker runs dbt for this node alone.
            await self._wait_for_producer()
            logger.info("try %s of %s: the worker runs dbt for this node alone", try_number, self.model_unique_id)
            result = await self.get_xcom_val(get_status_xcom_key(self.model_unique_id)) or {}
            yield TriggerEvent({"status": EventStatus.FAILED, "reason": WatcherEventReason.PRODUCER_SKIPPED,
                                "outlet_uris": result.get("outlet_uris") or []})  # fmt: skip
            return
        async for event in super().run():
            payload = event.payload if isinstance(event.payload, dict) else {}
            status = payload.get("status")
            if status == EventStatus.SUCCESS:
                await self._log_results()
                yield TaskSuccessEvent()
            elif status == EventStatus.SKIPPED:
                await self._log_results()
                yield TaskSkippedEvent()
            else:
                yield event  # a failure to raise and alert on: the worker's part
            return


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
