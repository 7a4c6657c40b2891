"""Local stand-ins for alert receivers: an HTTP server that records what a Slack webhook is sent."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookServer(ThreadingHTTPServer):
    bodies: list[dict]


class WebhookHandler(BaseHTTPRequestHandler):
    server: WebhookServer

    def do_POST(self):  # noqa: N802 (http.server's hook name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append({"path": self.path, "json": json.loads(body)})
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass


@contextmanager
def serve_webhook() -> Iterator[WebhookServer]:
    """A webhook receiver on a free loopback port, in a thread, for the duration of the block."""
    server = WebhookServer(("127.0.0.1", 0), WebhookHandler)
    server.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def slack_connection(port: int) -> dict:
    """An Airflow `slackwebhook` connection that posts to the local receiver."""
    return {"conn_type": "slackwebhook", "host": f"http://127.0.0.1:{port}", "password": "services/T000/B000/XXXX"}
