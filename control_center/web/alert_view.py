"""An alert as the console shows it (docs/CONSOLE-API.md, "Alert"), read from the centre's store.

One function builds it for the first page load and for every Server-Sent Event, so the queue a
page builds from events is the queue a reload shows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from control_center.alert_routing import AlertRouting
from control_center.store import AlertRecord, Store
from control_center.web.voice_api import voice_state

LIVE_PLAYLIST = "index.m3u8"


def alert_view(store: Store, record: AlertRecord, live_dir: Path | None,
               routing: AlertRouting | None = None) -> dict[str, Any]:
    """`as_of`: when it was read (monotonic microseconds, taken before the reads: exact in a
    browser's numbers for centuries of uptime). Views of one alert are built on several
    threads and may reach a page out of order: the larger wins."""
    as_of = time.monotonic_ns() // 1000
    record = store.alert(record.alert_id) or record  # read after the stamp, not before it
    updates = store.updates(record.alert_id)
    positions = [u for u in updates if u["kind"] == "position"]
    track = [_point(record.position, record.stored_at)]
    track += [_point(u["position"], u["stored_at"]) for u in positions]
    track = [p for p in track if p is not None]
    position = positions[-1]["position"] if positions else record.position
    position_at = positions[-1]["stored_at"] if positions else record.stored_at
    commands = store.commands(record.alert_id)
    return {
        "as_of": as_of,
        "alert_id": record.alert_id,
        "device_id": record.device_id,
        "device_kind": record.device_kind,
        "trigger": record.trigger,
        "desks": list(routing.desks_of(record) if routing else record.desks),
        "route_rule": record.route_rule,
        "escalations": routing.steps(record.alert_id) if routing else [],
        "incident_id": record.incident_id,
        "call_id": record.call_id,
        "incident": _incident(store, record),
        "created_at": record.created_at,
        "stored_at": record.stored_at,
        "status": record.status,
        "claimed_by": record.claimed_by,
        "claimed_at": record.claimed_at,
        "acked_by": record.acked_by,
        "acked_at": record.acked_at,
        "closed_by": record.closed_by,
        "closed_at": record.closed_at,
        "close_reason": _close_reason(commands),
        "battery": record.battery,
        "position": {k: position.get(k) for k in ("lat", "lon", "accuracy_m", "source", "age_s")},
        "position_at": position_at,
        "track": track,
        "feedback": _feedback(store, record),
        "voice": voice_state([u for u in updates if u["kind"] == "event"
                              and u.get("type") in ("voice_answer", "voice_state")]),
        "voice_mode": _voice_mode(store, record),
        "device_offline": record.device_offline,
        "cancel_requested_at": record.cancel_requested_at,
        "live": _live(record.alert_id, live_dir),
        "pending": [{"type": c["type"], "status": c["status"], "operator": c["operator"],
                     "reason_code": c["reason_code"]}
                    for c in commands if c["status"] != "applied"
                    and c["type"] in ("ack", "close") and not _decided(record, c["type"])],
    }


def _point(position: dict[str, Any], at: float) -> dict[str, Any] | None:
    if position.get("lat") is None or position.get("lon") is None:
        return None
    return {"lat": position["lat"], "lon": position["lon"],
            "accuracy_m": position.get("accuracy_m"), "at": at}


def _decided(record: AlertRecord, decision: str) -> bool:
    """Copies of a decision the device has applied (another copy got there) are not pending."""
    return record.closed_at is not None if decision == "close" else record.acked_at is not None


def _close_reason(commands: list[dict[str, Any]]) -> str | None:
    """The reason given with the close that took effect, else with the latest close sent."""
    closes = [c for c in commands if c["type"] == "close" and c.get("note")]
    applied = [c for c in closes if c["status"] == "applied"]
    chosen = applied or closes
    return chosen[-1]["note"] if chosen else None


def _feedback(store: Store, record: AlertRecord) -> str | None:
    """What the device shows about this alert, from its last status: its stage while the alert
    is its active one; `idle` once it has moved on; None if it never said."""
    device = store.device(record.device_id)
    if device is None:
        return None
    status = device["status"]
    if status.get("active_alert_id") == record.alert_id:
        return status.get("active_alert_stage") or "sending"
    return "idle" if record.status == "closed" else None


def _live(alert_id: str, live_dir: Path | None) -> dict[str, str] | None:
    if live_dir is None or not (live_dir / alert_id / LIVE_PLAYLIST).is_file():
        return None
    return {"url": f"/live/{alert_id}/{LIVE_PLAYLIST}"}


def _incident(store: Store, record: AlertRecord) -> list[dict[str, Any]]:
    """The other alerts of its incident, with where they were: the map draws them together."""
    if record.incident_id is None:
        return []
    return [{"alert_id": other.alert_id, "device_id": other.device_id,
             "device_kind": other.device_kind, "status": other.status,
             "lat": other.position.get("lat"), "lon": other.position.get("lon"),
             "accuracy_m": other.position.get("accuracy_m")}
            for other in store.incident(record.incident_id)
            if other.alert_id != record.alert_id]


def _voice_mode(store: Store, record: AlertRecord) -> str | None:
    """The device's voice call as its status reports it ("two_way", "listen_in"), or None
    (no voice call, or a device that has not said: firmware before voice)."""
    device = store.device(record.device_id)
    return device["status"].get("voice") if device else None
