"""A finished trigger's last log lines reach its task's log (include/triggerer_setup.py:
write_trigger_logs_before_closing), through Airflow's own log-socket reader on a real socket pair.

The end-to-end tests run it in a real triggerer; here the order that lost lines is made on purpose:
lines still waiting on the socket when the supervisor learns that their trigger finished.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from airflow.sdk.execution_time.supervisor import make_buffered_socket_reader

from include.triggerer_setup import _only_when_waiting, _read_waiting_log_lines


@dataclass
class SupervisorSockets:
    """What the supervisor's loop reads: its selector and which socket is the log socket."""

    selector: selectors.BaseSelector
    _open_sockets: dict[socket.socket, str]
    lines: list[dict] = field(default_factory=list)
    closed: list[socket.socket] = field(default_factory=list)

    def on_close(self, sock: socket.socket) -> None:
        self.closed.append(sock)
        self.selector.unregister(sock)


def _collect(lines: list[dict]):
    while True:
        lines.append(json.loads((yield)))


@pytest.fixture
def supervisor() -> Iterator[tuple[SupervisorSockets, socket.socket]]:
    """A log socket registered as the triggerer registers it, and the runner's end of it."""
    ours, runners = socket.socketpair()
    sockets = SupervisorSockets(selectors.DefaultSelector(), {ours: "logs"})
    read, on_close = make_buffered_socket_reader(_collect(sockets.lines), on_close=sockets.on_close)
    sockets.selector.register(ours, selectors.EVENT_READ, (_only_when_waiting(read), on_close))
    yield sockets, runners
    runners.close()
    ours.close()


def _log_lines(count: int) -> list[dict]:
    # Longer together than the 4 KiB Airflow's reader takes per call: the read is repeated.
    return [{"trigger_id": n, "event": f"dbt result of model.demo.m{n}: success", "sql": "x" * 2000}
            for n in range(count)]  # fmt: skip


def test_every_line_waiting_when_its_trigger_finished_is_read_before_its_log_closes(supervisor):
    sockets, runner = supervisor
    sent = _log_lines(5)
    runner.sendall(b"".join(json.dumps(line).encode() + b"\n" for line in sent))
    _read_waiting_log_lines(sockets)
    assert sockets.lines == sent
    assert sockets.closed == []


def test_the_loop_reading_a_socket_read_dry_goes_on_instead_of_waiting(supervisor):
    """The loop's round began with lines waiting, and the finished message was handled first."""
    sockets, runner = supervisor
    runner.sendall(json.dumps(_log_lines(1)[0]).encode() + b"\n")
    (key, _), = sockets.selector.select(timeout=1)
    _read_waiting_log_lines(sockets)
    read, _ = key.data
    result: list[bool] = []
    reader = threading.Thread(target=lambda: result.append(read(key.fileobj)), daemon=True)
    reader.start()
    reader.join(timeout=2)
    assert result == [True], "the supervisor's loop waited on an empty socket: the triggerer would stop"
    assert len(sockets.lines) == 1


def test_a_socket_the_runner_closed_is_closed_as_the_loop_closes_it(supervisor):
    sockets, runner = supervisor
    sent = _log_lines(2)
    runner.sendall(b"".join(json.dumps(line).encode() + b"\n" for line in sent))
    runner.close()
    _read_waiting_log_lines(sockets)
    assert sockets.lines == sent
    assert len(sockets.closed) == 1 and sockets.closed[0].fileno() == -1
    assert sockets.selector.get_map() == {}


def test_a_reader_that_would_wait_is_left_to_the_loop(supervisor):
    """Airflow's own reader, not wrapped (another Airflow's registration): no line is read early."""
    sockets, runner = supervisor
    (ours,) = sockets._open_sockets
    sockets.selector.modify(ours, selectors.EVENT_READ,
                            make_buffered_socket_reader(_collect(sockets.lines), on_close=sockets.on_close))
    runner.sendall(json.dumps(_log_lines(1)[0]).encode() + b"\n")
    _read_waiting_log_lines(sockets)
    assert sockets.lines == []
