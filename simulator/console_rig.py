"""A whole centre with its web console, as `sos-center serve` runs it, for browser tests and the
benchmark: a real Mosquitto over mutual TLS, the centre's MQTT service with its live view, the
console over HTTPS, and accounts for each role."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from control_center import pki
from control_center.alert_routing import AlertRouting
from control_center.config import VoiceSettings, console_config, implicit_routes
from control_center.escalation import Step
from control_center.live import LiveReceiver
from control_center.routing import RouteTable
from control_center.service import CenterEvent, FleetTrust
from control_center.store import Store
from control_center.web.accounts import Accounts
from control_center.web.launch import RunningConsole, start_console
from simulator.broker import HOST, PrivateBroker

PASSWORD = "correct horse battery staple"
RECHECK_S = 0.2
USERS = {"alice": "operator", "bob": "operator", "sam": "supervisor", "audrey": "auditor"}


class ConsoleRig:
    def __init__(self, workdir: Path, broker: PrivateBroker, *,
                 evidence_dir: Path | None = None, routes: RouteTable | None = None,
                 escalation_interval_s: float = 0.2,
                 voice: VoiceSettings | None = None) -> None:
        """`routes`: route alerts to desks and escalate untaken ones, as `serve` does with
        [[desks]] and [[routes]] (None: the implicit table, every alert to everyone).
        `voice`: the centre's [voice] settings (control_center.config.voice_settings), as
        `serve` passes them (None: the console's defaults)."""
        self.workdir = workdir
        self.voice = voice
        self.broker = broker
        self.store = Store(workdir / "center.sqlite")
        with Accounts(workdir / "center.sqlite") as accounts:
            for name, role in USERS.items():
                if accounts.user(name) is None:
                    accounts.add(name, role, PASSWORD)
        fleet = broker.fleet
        self.live_dir = workdir / "live"
        live = LiveReceiver(fleet.live_identity_file, self.live_dir, FleetTrust(fleet))
        self._changed = threading.Condition()
        self._observers: list[Callable[[CenterEvent], None]] = []
        self.routes = routes or implicit_routes()
        self.service = broker.centre_service(self.store, on_event=self._on_event, live=live,
                                             router=self.routes.route_at)
        self.routing = AlertRouting(self.store, self.routes, [],
                                    on_step=self._on_step, interval_s=escalation_interval_s)
        self._observers.append(self.routing.on_center_event)
        server = pki.issue_server_cert(fleet.ca, workdir / "console-tls", "console",
                                       [HOST, "localhost"])
        self.cert_file = server.cert_file
        section = {"listen": HOST, "port": 0, "cert_file": str(server.cert_file),
                   "key_file": str(server.key_file), "audit_log": "console-audit.jsonl"}
        if evidence_dir is not None:
            section["evidence_dir"] = str(evidence_dir)
        self.config = console_config(section, workdir)
        self.console: RunningConsole | None = None

    def start(self) -> None:
        self.service.start()
        self.routing.start()
        self.console = start_console(self.config, store=self.store,
                                     accounts_db=self.workdir / "center.sqlite",
                                     fleet=self.broker.fleet, commands=self.service,
                                     live_dir=self.live_dir, routing=self.routing,
                                     voice=self.voice)
        self._observers.append(self.console.console.on_center_event)

    def _on_step(self, step: Step) -> None:
        if self.console is not None:
            self.console.console.publish_alert(step.alert_id)
        with self._changed:
            self._changed.notify_all()

    @property
    def url(self) -> str:
        assert self.console is not None
        return self.console.url.replace("localhost", HOST)

    def _on_event(self, event: CenterEvent) -> None:
        for observer in list(self._observers):
            observer(event)
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], object], timeout: float = 20.0) -> object:
        """Until predicate() holds, re-checked whenever the centre learns something and every
        RECHECK_S for what it does not announce (a console request's claim, say)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            result = predicate()
            while not result and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(min(RECHECK_S, left))
                result = predicate()
        assert result, f"timed out after {timeout} s waiting for {predicate}"
        return result

    def stop(self) -> None:
        if self.console is not None:
            self.console.stop()
        self.routing.stop()
        self.service.stop()
        self.store.close()
