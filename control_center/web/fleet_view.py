"""The console's fleet list: one `Device` record (docs/CONSOLE-API.md) per device.

A device's record joins three sources, each the only one that knows its part:

- the store's `devices` table: the device's own last status message (battery, firmware,
  faults, self-test, outbox, GPS state, active alert) and when it was received;
- the store's events: the newest `storage_alert`, because a device reports its card filling up
  as an event, not in its status; and the newest `tamper_opened`/`tamper_closed`, for when a
  kiosk's door was opened (its status says only whether it is open now);
- the fleet registry: when the device's certificate runs out, and the devices enrolled but never
  heard from (listed as "unknown": a token still in its box is something a supervisor wants to
  see, not to miss).

Pure: the caller passes `now`, and nothing here reads a clock or a file beyond what the Store and
the Fleet objects do, so the same inputs give the same records (and the tests need no sleeps).
The Fleet is used as loaded: re-reading the registry when it changes is its owner's job
(`FleetTrust` in the service does it).
"""

from __future__ import annotations

from typing import Any

from control_center.fleet import Fleet, Identity
from control_center.store import Store

DEVICE_KINDS = ("token", "pillar")  # what the fleet list shows (not centres, not the admin)
# An "online" status not refreshed for this many of the device's own heartbeat intervals is shown
# as "unknown": the device would have sent one (QoS 0, so one may be lost, hence not 1), and the
# broker's last will may not have reached us (the centre itself lost the broker, say). Saying
# "online" then would vouch for a device nobody has heard from.
STALE_HEARTBEATS = 3
TAMPER_EVENTS = ("tamper_opened", "tamper_closed")  # a kiosk's door switch (docs/VOICE.md)


def device_views(store: Store, fleet: Fleet | None, now: float) -> list[dict[str, Any]]:
    """Every device the centre has heard from or the fleet enrolled (tokens and pillars with an
    active certificate), by device id."""
    seen = {d["device_id"]: d for d in store.devices()}
    storage = store.latest_device_events("storage_alert")
    doors = store.latest_device_events(*TAMPER_EVENTS)
    enrolled = {i.name for i in _identities(fleet) if i.status == "active"
                and i.kind in DEVICE_KINDS}
    return [_view(store, fleet, device_id, seen.get(device_id), storage.get(device_id),
                  doors.get(device_id), now)
            for device_id in sorted(set(seen) | enrolled)]


def device_view(store: Store, fleet: Fleet | None, device_id: str,
                now: float) -> dict[str, Any] | None:
    """One device's record (e.g. for an SSE `device` event after its status changed), or None
    if the centre never heard from it and the fleet has no active token or pillar of that
    name."""
    found = store.device(device_id)
    seen = {"device_id": device_id, **found} if found is not None else None
    identity = _active(fleet, device_id)
    if seen is None and (identity is None or identity.kind not in DEVICE_KINDS):
        return None
    storage = store.latest_device_events("storage_alert").get(device_id)
    door = store.latest_device_events(*TAMPER_EVENTS).get(device_id)
    return _view(store, fleet, device_id, seen, storage, door, now)


def _view(store: Store, fleet: Fleet | None, device_id: str, seen: dict[str, Any] | None,
          storage: dict[str, Any] | None, door: dict[str, Any] | None,
          now: float) -> dict[str, Any]:
    status: dict[str, Any] = seen["status"] if seen is not None else {}
    identity = _active(fleet, device_id)
    active_alert_id = _active_alert_id(status)
    return {
        "device_id": device_id,
        "device_kind": status.get("device_kind") or (
            identity.kind if identity is not None and identity.kind in DEVICE_KINDS else None),
        "state": _state(seen, now),
        "last_seen": seen["last_seen"] if seen is not None else None,
        "battery": _battery(status.get("battery")),
        "firmware": status.get("firmware"),
        "storage": _storage(storage),
        "selftest": status.get("selftest"),
        "faults": _faults(status),
        "tamper": _tamper(status, door),
        "cert_not_after": identity.not_after if identity is not None else None,
        "uploads_waiting": status.get("recordings_waiting"),  # devices with a camera
        "outbox_pending": status.get("outbox_pending"),
        "position": _position(store, device_id, status, active_alert_id),
        "active_alert_id": active_alert_id,
    }


def _identities(fleet: Fleet | None) -> list[Identity]:
    return list(fleet.identities) if fleet is not None else []


def _active(fleet: Fleet | None, device_id: str) -> Identity | None:
    """The device's current identity: the certificate it connects with now (a re-keyed device
    has older, revoked ones; their expiry no longer matters)."""
    return fleet.active(device_id) if fleet is not None else None


def _state(seen: dict[str, Any] | None, now: float) -> str:
    """online/offline as the device (or the broker, with its will) last said; "unknown" for a
    device never heard from, or one "online" whose heartbeats stopped (STALE_HEARTBEATS)."""
    if seen is None:
        return "unknown"
    state = seen["state"]
    heartbeat = seen["status"].get("heartbeat_s")
    if (state == "online" and isinstance(heartbeat, int | float) and heartbeat > 0
            and now - seen["last_seen"] > STALE_HEARTBEATS * heartbeat):
        return "unknown"
    return state


def _battery(battery: Any) -> dict[str, Any] | None:
    """`{percent, charging}`; None for a pillar (mains). An offline device's is the last it
    reported (the store keeps its last status under the broker's last will)."""
    if not isinstance(battery, dict):
        return None
    return {"percent": battery.get("percent"), "charging": battery.get("charging")}


def _storage(event: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newest storage_alert: its mode and free space as the device reported them, its
    reason, and `at` = when the centre stored it (epoch s; the device's clock may be off)."""
    if event is None:
        return None
    storage = event.get("storage") or {}
    return {"mode": storage.get("mode"), "free_mb": storage.get("free_mb"),
            "reason": event.get("reason"), "at": event.get("stored_at")}


def _faults(status: dict[str, Any]) -> dict[str, Any] | None:
    """The status's faults; `{}` (nothing wrong) only for a full heartbeat status, which omits
    the field when everything works. A minimal status (or a last will of a device never heard
    from otherwise) says nothing about the parts: None, not a false all-clear."""
    if "faults" in status:
        return dict(status["faults"])
    return {} if "heartbeat_s" in status else None


def _tamper(status: dict[str, Any], event: dict[str, Any] | None) -> dict[str, Any] | None:
    """The kiosk's door: `{state: "open"|"closed", since: epoch|None}`; None for a device
    without a door switch (a token), or one that never said.

    The state is the status's: the device's word on the door now, published at every change and
    on each connect (under a last will, the last known). Without one, the newest tamper event's.
    `since` is when the centre stored the `tamper_opened` event of the open door (the centre's
    clock, as for storage: the device's may be off); None while it is closed, or while that
    event is still on its way (it leaves through the device's outbox, and a status can overtake
    it)."""
    state = status.get("tamper")
    if state is None and event is not None:
        state = "open" if event["type"] == "tamper_opened" else "closed"
    if state is None:
        return None
    opened = event is not None and event["type"] == "tamper_opened"
    return {"state": state,
            "since": event["stored_at"] if state == "open" and opened else None}


def _active_alert_id(status: dict[str, Any]) -> str | None:
    """The alert the device is raising. A device that shows "closed" reports the closed alert's
    id for a few seconds (`active_alert_stage` "closed"): that alert is over, so None."""
    if status.get("active_alert_stage") == "closed":
        return None
    return status.get("active_alert_id") or None


def _position(store: Store, device_id: str, status: dict[str, Any],
              active_alert_id: str | None) -> dict[str, Any] | None:
    """Where the device is, as far as the centre knows.

    Devices send coordinates only with an alert and its position updates, never in their
    status; so during an alert this is the newest of those with coordinates (the alert must be
    the device's own), and otherwise only the status's GPS state (`source`) without
    coordinates. None if the status does not even say that (a last will, a never-seen device).
    """
    if active_alert_id is not None:
        alert = store.alert(active_alert_id)
        if alert is not None and alert.device_id == device_id:
            positions = [alert.position] + [u["position"] for u in store.updates(active_alert_id)
                                            if u.get("kind") == "position" and "position" in u]
            placed = [p for p in positions if p.get("lat") is not None
                      and p.get("lon") is not None]
            if placed:
                newest = placed[-1]
                return {"lat": newest["lat"], "lon": newest["lon"],
                        "accuracy_m": newest.get("accuracy_m"), "source": newest.get("source")}
    if status.get("gps"):
        return {"lat": None, "lon": None, "accuracy_m": None, "source": status["gps"]}
    return None
