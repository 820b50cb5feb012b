"""The console's fleet list (control_center/web/fleet_view.py) from a real store and fleet.

Every message fed to the store is validated against the protocol's schemas first, so the
records are built from what devices really send."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control_center.fleet import Fleet
from control_center.store import Store
from control_center.web.fleet_view import STALE_HEARTBEATS, device_view, device_views
from protocol import MessageKind
from protocol.messages import validate
from tests.helpers import NO_POSITION, alert_message
from tests.test_ingest_support import enrol, make_fleet

NOW = 1_800_000_000.0
DEVICE = "tok-001"


def status(device_id: str = DEVICE, **fields: Any) -> dict[str, Any]:
    """A full heartbeat status, as firmware/device.py builds it."""
    message = {"v": 1, "device_id": device_id, "device_kind": "token", "state": "online",
               "at": "2026-11-23T10:00:00.000Z", "heartbeat_s": 30.0, "active_alert_id": None,
               "active_alert_stage": None, "outbox_pending": 0, "gps": "live",
               "battery": {"percent": 81.0, "charging": False}, "firmware": "0.1.0", **fields}
    validate(MessageKind.STATUS, message)
    return message


def will(device_id: str = DEVICE) -> dict[str, Any]:
    """The last will the broker publishes for a vanished device (firmware/device.py)."""
    message = {"v": 1, "device_id": device_id, "device_kind": "token", "state": "offline"}
    validate(MessageKind.STATUS, message)
    return message


def storage_alert(seq: int, mode: str, free_mb: float, reason: str) -> dict[str, Any]:
    message = {"v": 1, "device_id": DEVICE, "seq": seq, "created_at": "2026-11-23T10:00:00.000Z",
               "type": "storage_alert", "storage": {"free_mb": free_mb, "mode": mode},
               "reason": reason}
    validate(MessageKind.EVENT, message)
    return message


def position(lat: float | None, lon: float | None, source: str) -> dict[str, Any]:
    return {**NO_POSITION, "source": source, "lat": lat, "lon": lon,
            "accuracy_m": 5.0 if lat is not None else None}


def position_update(alert_id: str, seq: int, where: dict[str, Any]) -> dict[str, Any]:
    message = {"v": 1, "alert_id": alert_id, "device_id": DEVICE, "seq": seq,
               "created_at": "2026-11-23T10:00:05.000Z", "position": where,
               "battery": {"percent": 80.0, "charging": False}}
    validate(MessageKind.POSITION, message)
    return message


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    made = Store(tmp_path / "c.sqlite")
    yield made
    made.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """tok-001 and pillar-07 enrolled, a centre identity, and tok-old enrolled then revoked."""
    root = tmp_path_factory.mktemp("fleet")
    made = make_fleet(root)
    enrol(made, root, DEVICE)
    enrol(made, root, "pillar-07", "pillar")
    enrol(made, root, "centre.ops", "centre")
    enrol(made, root, "tok-old")
    made.revoke("tok-old")
    return made


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["device_id"]: r for r in records}


def test_a_heartbeat_status_becomes_the_devices_record(store: Store) -> None:
    store.set_device_status(DEVICE, status(outbox_pending=2, selftest={
        "at": "2026-11-23T03:00:00.000Z", "ok": True, "failed": []}), seen_at=NOW - 5)
    (record,) = device_views(store, None, NOW)
    assert record == {
        "device_id": DEVICE, "device_kind": "token", "state": "online", "last_seen": NOW - 5,
        "battery": {"percent": 81.0, "charging": False}, "firmware": "0.1.0", "storage": None,
        "selftest": {"at": "2026-11-23T03:00:00.000Z", "ok": True, "failed": []},
        "faults": {}, "tamper": None, "cert_not_after": None, "uploads_waiting": None,
        "outbox_pending": 2,
        "position": {"lat": None, "lon": None, "accuracy_m": None, "source": "live"},
        "active_alert_id": None}


def test_enrolled_devices_never_heard_from_are_listed_as_unknown(store: Store,
                                                                 fleet: Fleet) -> None:
    records = by_id(device_views(store, fleet, NOW))
    assert sorted(records) == ["pillar-07", DEVICE]  # no centre, no revoked identity
    pillar = records["pillar-07"]
    assert (pillar["state"], pillar["device_kind"], pillar["last_seen"], pillar["battery"],
            pillar["faults"], pillar["position"]) == ("unknown", "pillar", None, None, None, None)


def test_the_certificate_expiry_is_the_active_identitys(store: Store, fleet: Fleet) -> None:
    store.set_device_status(DEVICE, status(), seen_at=NOW)
    record = by_id(device_views(store, fleet, NOW))[DEVICE]
    assert record["cert_not_after"] == fleet.active(DEVICE).not_after
    assert record["cert_not_after"].startswith("20")


def test_a_device_heard_from_after_its_revocation_is_listed_without_a_certificate(
        store: Store, fleet: Fleet) -> None:
    store.set_device_status("tok-old", status("tok-old"), seen_at=NOW)
    record = by_id(device_views(store, fleet, NOW))["tok-old"]
    assert (record["state"], record["cert_not_after"]) == ("online", None)


def test_storage_is_the_newest_storage_alert(store: Store) -> None:
    store.set_device_status(DEVICE, status(), seen_at=NOW)
    store.add_update("event", storage_alert(3, "evidence_only", 120.0, "card nearly full"),
                     stored_at=NOW - 60)
    store.add_update("event", storage_alert(4, "full", 0.0, "card full"), stored_at=NOW - 10)
    (record,) = device_views(store, None, NOW)
    assert record["storage"] == {"mode": "full", "free_mb": 0.0, "reason": "card full",
                                 "at": NOW - 10}


def test_faults_are_passed_on_as_the_device_reports_them(store: Store) -> None:
    faults = {"camera": "no frames for 10 s", "upload": "3 segment(s) not uploaded: refused"}
    store.set_device_status(DEVICE, status(faults=faults), seen_at=NOW)
    (record,) = device_views(store, None, NOW)
    assert record["faults"] == faults


def test_the_recordings_waiting_for_upload_are_the_devices_own_count(store: Store) -> None:
    store.set_device_status(DEVICE, status(recordings_waiting=7), seen_at=NOW)
    (record,) = device_views(store, None, NOW)
    assert record["uploads_waiting"] == 7


def test_an_offline_device_keeps_what_it_last_said_about_itself(store: Store) -> None:
    """The last will says only "offline": battery, firmware and faults stay as last known."""
    store.set_device_status(DEVICE, status(), seen_at=NOW - 100)
    store.set_device_status(DEVICE, will(), seen_at=NOW - 50)
    (record,) = device_views(store, None, NOW)
    assert (record["state"], record["last_seen"]) == ("offline", NOW - 50)
    assert record["battery"] is not None and record["firmware"] is not None


def test_a_device_only_ever_heard_offline_shows_no_all_clear(store: Store) -> None:
    store.set_device_status(DEVICE, will(), seen_at=NOW - 50)
    (record,) = device_views(store, None, NOW)
    assert (record["state"], record["faults"], record["battery"]) == ("offline", None, None)


def test_an_online_device_whose_heartbeats_stopped_is_unknown(store: Store) -> None:
    store.set_device_status(DEVICE, status(heartbeat_s=30.0), seen_at=NOW)
    assert device_views(store, None, NOW + STALE_HEARTBEATS * 30.0)[0]["state"] == "online"
    assert device_views(store, None, NOW + STALE_HEARTBEATS * 30.0 + 1)[0]["state"] == "unknown"


def test_during_an_alert_the_position_is_the_newest_with_coordinates(store: Store) -> None:
    alert = alert_message(position=position(52.1, 4.3, "live"))
    store.add_alert(alert, stored_at=NOW - 20)
    store.add_update("position", position_update(alert["alert_id"], 2,
                                                 position(52.2, 4.4, "live")), NOW - 15)
    store.add_update("position", position_update(alert["alert_id"], 3,
                                                 position(None, None, "none")), NOW - 10)
    store.set_device_status(DEVICE, status(active_alert_id=alert["alert_id"],
                                           active_alert_stage="delivered", gps="none"), NOW)
    (record,) = device_views(store, None, NOW)
    assert record["active_alert_id"] == alert["alert_id"]
    assert record["position"] == {"lat": 52.2, "lon": 4.4, "accuracy_m": 5.0, "source": "live"}


def test_a_closed_alert_still_shown_by_the_device_is_not_active(store: Store) -> None:
    alert = alert_message(position=position(52.1, 4.3, "live"))
    store.add_alert(alert, stored_at=NOW - 20)
    store.set_device_status(DEVICE, status(active_alert_id=alert["alert_id"],
                                           active_alert_stage="closed"), NOW)
    (record,) = device_views(store, None, NOW)
    assert record["active_alert_id"] is None
    assert record["position"]["lat"] is None


def test_another_devices_alert_gives_no_position(store: Store) -> None:
    alert = alert_message(device_id="tok-002", position=position(52.1, 4.3, "live"))
    store.add_alert(alert, stored_at=NOW - 20)
    store.set_device_status(DEVICE, status(active_alert_id=alert["alert_id"],
                                           active_alert_stage="sending"), NOW)
    (record,) = device_views(store, None, NOW)
    assert record["position"] == {"lat": None, "lon": None, "accuracy_m": None,
                                  "source": "live"}


def test_one_devices_record_is_the_same_as_in_the_list(store: Store, fleet: Fleet) -> None:
    store.set_device_status(DEVICE, status(), seen_at=NOW)
    store.add_update("event", storage_alert(3, "full", 0.0, "card full"), stored_at=NOW)
    listed = by_id(device_views(store, fleet, NOW))
    assert device_view(store, fleet, DEVICE, NOW) == listed[DEVICE]
    assert device_view(store, fleet, "pillar-07", NOW) == listed["pillar-07"]


def test_one_device_unknown_to_store_and_fleet_is_none(store: Store, fleet: Fleet) -> None:
    assert device_view(store, fleet, "tok-999", NOW) is None
    assert device_view(store, fleet, "centre.ops", NOW) is None
    assert device_view(store, None, DEVICE, NOW) is None
