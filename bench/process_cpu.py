"""CPU seconds of every process on the machine during a block, grouped by what the process is.

Sampled from /proc every 100 ms: a process that lives less than that may be missed, and a process's
last 100 ms before it exits may be. Used by the transform bench to say where the cores went.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

TICKS = os.sysconf("SC_CLK_TCK")


def airflow_role(title: str, producer_ti_ids: Iterable[str] = ()) -> str:
    """The part of the stack a process title names (Airflow sets them with setproctitle).

    A task's processes (the LocalExecutor worker supervising it, the task process it forks) carry
    the task instance's id: those of the ids in `producer_ti_ids` are the producer's.
    """
    if "airflow worker -- " in title and not title.endswith("<idle>"):
        kind = "task supervisor" if "LocalExecutor" in title else "task process"
        return f"{kind} (producer)" if any(i in title for i in producer_ti_ids) else f"{kind} (node tasks)"
    for marker, role in (
        ("LocalExecutor", "executor worker (idle)"),
        (" scheduler", "scheduler"),
        (" dag-processor", "dag-processor"),
        (" triggerer", "triggerer"),
        ("api_server", "api-server"),
        (" api-server", "api-server"),
        ("serve-logs", "serve-logs"),
        ("postgres", "postgres"),
    ):
        if marker in title:
            return role
    return "other processes"


def by_role(processes: dict[int, tuple[str, float]], producer_ti_ids: Iterable[str] = ()) -> dict[str, float]:
    """CPU seconds per role, largest first."""
    spent: dict[str, float] = defaultdict(float)
    for title, seconds in processes.values():
        spent[airflow_role(title, tuple(producer_ti_ids))] += seconds
    return {role: round(s, 1) for role, s in sorted(spent.items(), key=lambda kv: -kv[1]) if s >= 0.05}


class ProcessCpu:
    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.latest: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b") ", 1)[1].split()
                with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                    title = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError):
                continue
            pid = int(entry.name)
            # An exited process (a zombie until reaped) has no command line left: keep the one it had.
            title = title or self.latest.get(pid, ("(kernel threads)", 0.0))[0]
            self.latest[pid] = (title, (int(fields[11]) + int(fields[12])) / TICKS)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @contextmanager
    def measuring(self) -> Iterator[dict[int, tuple[str, float]]]:
        """Yields a dict filled, when the block ends, with each process's title and CPU seconds in it."""
        found: dict[int, tuple[str, float]] = {}
        self._sample()
        before = {pid: seconds for pid, (_, seconds) in self.latest.items()}
        self._stop.clear()
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        try:
            yield found
        finally:
            self._stop.set()
            thread.join()
            self._sample()
            for pid, (title, seconds) in self.latest.items():
                if seconds - before.get(pid, 0.0) > 0:
                    found[pid] = (title, seconds - before.get(pid, 0.0))
