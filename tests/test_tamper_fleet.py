"""A kiosk's door in the fleet view: the store and the fleet record (control_center/web/
fleet_view.py) from messages the protocol's schemas accept, and a real virtual pillar process
whose door is opened, through a real broker to a real centre.

An opened door is an event (`tamper_opened`), never an SOS: no alert, and the pillar shows
nothing to the street."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control_center.store import Store
from control_center.web.fleet_view import device_view, device_views
from protocol import MessageKind
from protocol.messages import validate
from tests.helpers import Device
from tests.test_console_fleet_view import status

NOW = 1_800_000_000.0
PILLAR = "pil-test-01"


def pillar_status(**fields: Any) -> dict[str, Any]:
    return status(PILLAR, device_kind="pillar", battery=None, gps="surveyed", **fields)


def door_event(seq: int, kind: str, reason: str) -> dict[str, Any]:
    """A tamper event as firmware/device.py sends it (`_door_changed`)."""
    message = {"v": 1, "device_id": PILLAR, "seq": seq, "created_at": "2026-11-23T10:00:00.000Z",
               "type": kind, "reason": reason}
    validate(MessageKind.EVENT, message)
    return message


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    made = Store(tmp_path / "c.sqlite")
    yield made
    made.close()


def record(store: Store) -> dict[str, Any]:
    (found,) = device_views(store, None, NOW)
    assert device_view(store, None, PILLAR, NOW) == found
    return found


# -- from the store ---------------------------------------------------------------------------

def test_a_device_that_never_reported_a_door_has_none(store: Store) -> None:
    store.set_device_status(PILLAR, pillar_status(), seen_at=NOW)
    assert record(store)["tamper"] is None  # a token, or a pillar without a switch


def test_an_opened_door_shows_open_since_the_centre_heard_of_it(store: Store) -> None:
    store.add_update("event", door_event(5, "tamper_opened", "door opened"), stored_at=NOW - 600)
    store.set_device_status(PILLAR, pillar_status(tamper="open"), seen_at=NOW - 599)
    assert record(store)["tamper"] == {"state": "open", "since": NOW - 600}


def test_a_door_closed_again_shows_closed(store: Store) -> None:
    store.add_update("event", door_event(5, "tamper_opened", "door opened"), stored_at=NOW - 600)
    store.add_update("event", door_event(6, "tamper_closed", "door closed"), stored_at=NOW - 60)
    store.set_device_status(PILLAR, pillar_status(tamper="closed"), seen_at=NOW - 59)
    assert record(store)["tamper"] == {"state": "closed", "since": None}


def test_the_since_of_a_door_opened_again_is_the_newest_opening(store: Store) -> None:
    store.add_update("event", door_event(5, "tamper_opened", "door opened"), stored_at=NOW - 600)
    store.add_update("event", door_event(6, "tamper_closed", "door closed"), stored_at=NOW - 500)
    store.add_update("event", door_event(7, "tamper_opened", "door opened"), stored_at=NOW - 30)
    store.set_device_status(PILLAR, pillar_status(tamper="open"), seen_at=NOW - 29)
    assert record(store)["tamper"] == {"state": "open", "since": NOW - 30}


def test_the_status_is_the_devices_word_on_the_door_now(store: Store) -> None:
    """The event leaves through the device's outbox: a status saying "open" can overtake it.
    The door is open; since when the centre does not know yet."""
    store.add_update("event", door_event(6, "tamper_closed", "door closed"), stored_at=NOW - 500)
    store.set_device_status(PILLAR, pillar_status(tamper="open"), seen_at=NOW - 5)
    assert record(store)["tamper"] == {"state": "open", "since": None}


def test_without_a_status_that_says_the_newest_event_tells_the_state(store: Store) -> None:
    store.add_update("event", door_event(5, "tamper_opened", "door open at start-up"),
                     stored_at=NOW - 100)
    store.set_device_status(PILLAR, {"v": 1, "device_id": PILLAR, "state": "online"},
                            seen_at=NOW - 99)  # a minimal status (firmware/device.py fallback)
    assert record(store)["tamper"] == {"state": "open", "since": NOW - 100}


def test_an_offline_pillar_keeps_its_last_known_door(store: Store) -> None:
    store.add_update("event", door_event(5, "tamper_opened", "door opened"), stored_at=NOW - 600)
    store.set_device_status(PILLAR, pillar_status(tamper="open"), seen_at=NOW - 599)
    store.set_device_status(PILLAR, {"v": 1, "device_id": PILLAR, "device_kind": "pillar",
                                     "state": "offline"}, seen_at=NOW - 300)
    found = record(store)
    assert (found["state"], found["tamper"]) == ("offline", {"state": "open", "since": NOW - 600})


def test_a_door_event_is_no_alert(store: Store) -> None:
    store.add_update("event", door_event(5, "tamper_opened", "door opened"), stored_at=NOW)
    assert store.alerts() == []


def test_the_newest_storage_alert_is_still_found_among_door_events(store: Store) -> None:
    """The door's events and the card's share the query that finds a device's newest."""
    storage = {"v": 1, "device_id": PILLAR, "seq": 4, "created_at": "2026-11-23T10:00:00.000Z",
               "type": "storage_alert", "storage": {"free_mb": 0.0, "mode": "full"},
               "reason": "card full"}
    store.add_update("event", storage, stored_at=NOW - 700)
    store.add_update("event", door_event(5, "tamper_opened", "door opened"), stored_at=NOW - 600)
    store.set_device_status(PILLAR, pillar_status(), seen_at=NOW)
    found = record(store)
    assert found["storage"]["reason"] == "card full"
    assert found["tamper"] == {"state": "open", "since": NOW - 600}


# -- a real pillar process ----------------------------------------------------------------------

@pytest.fixture
def pillar(broker, tmp_path: Path) -> Iterator[Device]:
    device = Device(broker, tmp_path, device_id=PILLAR, profile="pillar")
    device.start()
    device.wait_kind("link", up=True)
    yield device
    device.close()


def door_of(center) -> dict[str, Any] | None:
    found = device_view(center.store, None, PILLAR, time.time())
    return found["tamper"] if found is not None else None


def test_a_pillar_whose_door_is_opened_tells_the_centre_and_the_fleet_view_shows_it(
        pillar: Device, center) -> None:
    pillar.wait_kind("tamper", state="closed", initial=True)  # a kiosk starts shut
    center.wait_for(lambda: (door_of(center) or {}).get("state") == "closed")

    pillar.process.send({"op": "door", "open": True})
    pillar.wait_kind("tamper", state="open", initial=False)
    door = center.wait_for(lambda: (d := door_of(center)) and d["since"] is not None and d)
    assert door["state"] == "open"
    (event,) = center.store.latest_device_events("tamper_opened").values()
    assert (event["reason"], event.get("alert_id")) == ("door opened", None)

    pillar.process.send({"op": "door", "open": False})
    center.wait_for(lambda: door_of(center) == {"state": "closed", "since": None})
    assert center.store.alerts() == []  # not an SOS
    assert pillar.feedback() == []  # the pillar showed nothing to the street
