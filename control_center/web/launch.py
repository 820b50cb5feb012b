"""Put a console together from the centre's config and start it beside the MQTT service."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_center.alert_routing import AlertRouting
from control_center.audit import AuditLog
from control_center.config import ConsoleConfig
from control_center.fleet import Fleet
from control_center.store import Store
from control_center.web.accounts import Accounts
from control_center.web.app import CommandPath, Console, build_app
from control_center.web.evidence_view import EvidenceBrowser
from control_center.web.server import ConsoleServer
from control_center.web.store_watch import StoreWatcher


@dataclass
class RunningConsole:
    console: Console
    server: ConsoleServer
    watcher: StoreWatcher

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.watcher.stop()
        self.server.stop()
        self.console.accounts.close()
        self.console.audit.close()


def start_console(config: ConsoleConfig, *, store: Store, accounts_db: Path, fleet: Fleet,
                  commands: CommandPath, live_dir: Path | None,
                  routing: AlertRouting | None = None, voice: Any = None,
                  clock: Callable[[], float] = time.time) -> RunningConsole:
    """Start serving; the caller routes the centre's events to `console.on_center_event`."""
    audit = AuditLog(config.audit_log)
    evidence = None
    if config.evidence_dir is not None:
        evidence = EvidenceBrowser(config.evidence_dir, fleet, config.exports_dir, audit)
    tiles: dict[str, Any] | None = None
    if config.tiles_url:
        tiles = {"url": config.tiles_url, "attribution": config.tiles_attribution}
    idle_s = config.session_idle_h * 3600
    console = Console(store=store, accounts=Accounts(accounts_db, idle_s=idle_s),
                      commands=commands, audit=audit, fleet=fleet, live_dir=live_dir,
                      evidence=evidence, tiles=tiles, routing=routing, voice=voice,
                      clock=clock)
    server = ConsoleServer(build_app(console), console.hub, host=config.listen,
                           port=config.port, cert_file=config.cert_file,
                           key_file=config.key_file)
    server.start()
    watcher = StoreWatcher(store.path, console.publish_alert, console.device_changed)
    watcher.start()
    return RunningConsole(console, server, watcher)
