"""A stand-in for a dispatch or police system that takes the centre's signed webhooks
(docs/PROTOCOL.md, "Webhooks to other systems"), for scenarios with a `[webhook]` table.

It does what a real receiver must, so a run shows the sender works end to end over real HTTPS:
it checks each POST's signature with `verify_signature` (the check PROTOCOL.md shows) and answers
401 when it fails, and it keeps each notification once by its `Idempotency-Key` (the event id),
counting a repeat as a duplicate instead of a second notification. A run reports what it got:
how many notifications of each event, how many repeats, how many bad signatures.

Its certificate is issued by the run's fleet CA (like the console's and the ingest's, in the
run's directory), and the centre's webhook target trusts that CA through `ca_file`: no system
trust store is touched.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from control_center import pki
from control_center.pki import CertPair
from control_center.webhook import verify_signature

PATH = "/sos/webhook"


class Notification:
    """One notification kept: its event id, event kind, alert id and escalation step."""

    __slots__ = ("alert_id", "event", "event_id", "step")

    def __init__(self, body: dict[str, Any]) -> None:
        self.event_id: str = body["event_id"]
        self.event: str = body["event"]
        self.alert_id: str = body["alert"]["alert_id"]
        escalation = body.get("escalation") or {}
        self.step: int | None = escalation.get("step")


class WebhookReceiver:
    """An HTTPS server on `host` (a free port) that accepts POSTs to PATH signed with `secret`.

    `on_notification(notification, duplicate)` is called for every correctly signed
    notification (from the server's thread, after it is counted): the run puts it on its
    timeline, which is also what a caller waiting for deliveries waits on."""

    def __init__(self, ca: CertPair, directory: Path, secret: bytes, *, host: str,
                 on_notification: Callable[[Notification, bool], None] = lambda n, d: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.secret = secret
        self.host = host
        self._clock = clock
        self._on_notification = on_notification
        self._lock = threading.Lock()
        self.notifications: dict[str, Notification] = {}  # by event id: each kept once
        self.duplicates = 0
        self.bad_signatures = 0
        self.bad_requests = 0  # signed, but not a notification we can read
        self.tls = pki.issue_server_cert(ca, directory, "webhook-receiver", [host, "localhost"])
        self._server = ThreadingHTTPServer((host, 0), self._handler())
        self._server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="webhook-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self._server.server_address[1]}{PATH}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    # -- what was received ------------------------------------------------------------------------
    def received(self) -> dict[str, int]:
        """Notifications kept (duplicates not counted again), by event."""
        with self._lock:
            return dict(Counter(n.event for n in self.notifications.values()))

    def event_ids(self) -> set[str]:
        with self._lock:
            return set(self.notifications)

    def of_alert(self, alert_id: str, event: str) -> list[Notification]:
        with self._lock:
            return [n for n in self.notifications.values()
                    if n.alert_id == alert_id and n.event == event]

    def summary(self) -> dict[str, Any]:
        """The run's `webhook` object."""
        with self._lock:
            return {"url": self.url,
                    "received": dict(Counter(n.event for n in self.notifications.values())),
                    "duplicates": self.duplicates, "bad_signatures": self.bad_signatures,
                    "bad_requests": self.bad_requests}

    # -- HTTP -------------------------------------------------------------------------------------
    def _answer(self, path: str, headers: Any, body: bytes) -> int:
        """The status for one POST, after counting it."""
        if path != PATH:
            return 404
        if not verify_signature(self.secret, headers.get("X-SOS-Timestamp"),
                                headers.get("X-SOS-Signature"), body, self._clock()):
            with self._lock:
                self.bad_signatures += 1
            return 401
        try:
            notification = Notification(json.loads(body))
        except (ValueError, KeyError, TypeError, AttributeError):
            with self._lock:
                self.bad_requests += 1
            return 400
        key = headers.get("Idempotency-Key")
        if key != notification.event_id:  # the sender sets it to the event id
            with self._lock:
                self.bad_requests += 1
            return 400
        with self._lock:
            duplicate = notification.event_id in self.notifications
            if duplicate:
                self.duplicates += 1
            else:
                self.notifications[notification.event_id] = notification
        self._on_notification(notification, duplicate)
        return 200  # a duplicate too: the sender must stop sending it

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    length = 0
                body = self.rfile.read(length)
                status = receiver._answer(self.path, self.headers, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the run's timeline says what arrived

        return Handler
