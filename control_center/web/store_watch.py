"""Changes other centre instances write to the shared store, for the console's open pages.

Several instances split the devices' messages between them (`center.group`) and share one
store. An instance's console hears at once of what its own MQTT service learns (the service's
observer), but an alert another instance consumed reaches this process only through the store.
So the console also watches the store: `PRAGMA data_version` (one integer read, no table scan)
changes whenever any connection commits; only then are the open alerts and the devices heard
from since the last look compared with what was last pushed, and what differs is pushed. An
alert stored by another instance shows within one `interval_s` (0.2 s) plus the query.

Silence changes nothing in the store, yet the fleet view shows an "online" device whose
heartbeats stopped as "unknown" (fleet_view.STALE_HEARTBEATS): every STALE_SWEEP_S the online
devices' ages are compared with their heartbeats, and one that went quiet is pushed once.

It reads on a connection of its own, so it never waits on the store's lock; SQLite's WAL mode
lets it read while instances write. A callback that fails is logged and the others still run.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from control_center.web.fleet_view import STALE_HEARTBEATS

log = logging.getLogger("sos.center.console")

INTERVAL_S = 0.2
STALE_SWEEP_S = 5.0
RECENTLY_CLOSED_S = 3600.0  # closed alerts still compared (a late close reason, a replay)
# Open alerts (and recently closed ones) with what a change to any of them alters.
# The incident and desks too (another instance writes them right after the alert), and the
# escalation steps (recorded by whichever instance got there first): an operator of the next
# desk, on this instance, must see the alert climb to them.
_ALERT_FINGERPRINTS = """
SELECT a.alert_id, a.status, a.claimed_by, a.acked_at, a.closed_at, a.device_offline,
       a.cancel_requested_at, a.incident_id, a.desks,
       (SELECT count(*) FROM updates u WHERE u.alert_id = a.alert_id),
       (SELECT count(*) FROM commands c WHERE c.alert_id = a.alert_id),
       (SELECT count(*) FROM commands c WHERE c.alert_id = a.alert_id AND c.result IS NOT NULL)
       {escalations}
FROM alerts a WHERE a.status != 'closed' OR a.closed_at > ?
"""
_ESCALATIONS = ", (SELECT count(*) FROM alert_escalations e WHERE e.alert_id = a.alert_id)"


class StoreWatcher:
    def __init__(self, path: Path, on_alert: Callable[[str], None],
                 on_device: Callable[[str], None], *, interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._on_alert = on_alert
        self._on_device = on_device
        self._interval_s = interval_s
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._version: int | None = None
        self._alerts: dict[str, tuple] = {}
        self._devices: dict[str, float] = {}
        self._stale: dict[str, float] = {}  # device -> the last_seen it went quiet after
        self._swept_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-store-watch",
                                        daemon=True)

    def start(self) -> None:
        self.check()  # the baseline: what the pages load anyway is not pushed again
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._db is not None:
            self._db.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check()
            except sqlite3.Error as exc:  # the file being replaced, say: try again next time
                log.warning("console: could not read the store for changes: %s", exc)

    def check(self) -> tuple[list[str], list[str]]:
        """One look: (alert ids, device ids) pushed because they changed since the last."""
        db = self._connection()
        now = self._clock()
        quiet = self._sweep(db, now)
        version = db.execute("PRAGMA data_version").fetchone()[0]
        first = self._version is None
        if version == self._version:
            self._push([], quiet)
            return [], quiet
        self._version = version
        escalations = _ESCALATIONS if db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'alert_escalations'").fetchone() else ""
        alerts = {row[0]: row[1:] for row in db.execute(
            _ALERT_FINGERPRINTS.format(escalations=escalations), (now - RECENTLY_CLOSED_S,))}
        changed_alerts = [a for a, print_ in alerts.items() if self._alerts.get(a) != print_]
        self._alerts = alerts
        since = 0.0 if first else max(self._devices.values(), default=0.0) - 5.0
        devices = dict(db.execute("SELECT device_id, last_seen FROM devices WHERE last_seen > ?",
                                  (since,)).fetchall())
        changed_devices = [d for d, seen in devices.items() if self._devices.get(d) != seen]
        self._devices.update(devices)
        if first:
            return [], []
        changed_devices += [d for d in quiet if d not in changed_devices]
        self._push(changed_alerts, changed_devices)
        return changed_alerts, changed_devices

    def _sweep(self, db: sqlite3.Connection, now: float) -> list[str]:
        """Online devices that went quiet since the last sweep (at most every STALE_SWEEP_S)."""
        if self._swept_at is not None and now - self._swept_at < STALE_SWEEP_S:
            return []
        self._swept_at = now
        quiet = []
        for device_id, seen, heartbeat in db.execute(
                "SELECT device_id, last_seen, json_extract(status, '$.heartbeat_s') "
                "FROM devices WHERE state = 'online'"):
            if not heartbeat or heartbeat <= 0 or now - seen <= STALE_HEARTBEATS * heartbeat:
                continue
            if self._stale.get(device_id) != seen:
                self._stale[device_id] = seen
                quiet.append(device_id)
        return quiet

    def _push(self, alert_ids: list[str], device_ids: list[str]) -> None:
        for alert_id in alert_ids:
            self._call(self._on_alert, alert_id)
        for device_id in device_ids:
            self._call(self._on_device, device_id)

    @staticmethod
    def _call(callback: Callable[[str], None], key: str) -> None:
        try:
            callback(key)
        except Exception:  # one bad record must not stop the pushes for good
            log.exception("console: could not push the change of %s", key)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True,
                                       check_same_thread=False, timeout=5)
        return self._db
