"""The console sees what other centre instances write to the shared store (StoreWatcher)."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_center.store import Store
from control_center.web.store_watch import StoreWatcher
from tests.helpers import alert_message

NOW = 1_800_000_000.0


class Seen:
    def __init__(self) -> None:
        self.alerts: list[str] = []
        self.devices: list[str] = []


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    Store(tmp_path / "c.sqlite").close()
    return tmp_path / "c.sqlite"


def watcher(path: Path, seen: Seen) -> StoreWatcher:
    watch = StoreWatcher(path, seen.alerts.append, seen.devices.append, clock=lambda: NOW)
    watch.check()  # the baseline
    return watch


def status(device_id: str = "tok-001") -> dict:
    return {"v": 1, "device_id": device_id, "device_kind": "token", "state": "online",
            "at": "2026-11-23T10:00:00.000Z", "heartbeat_s": 30.0}


def test_the_first_look_reports_nothing(shared: Path) -> None:
    other = Store(shared)
    other.add_alert(alert_message(), stored_at=NOW)
    seen = Seen()
    watcher(shared, seen)
    assert (seen.alerts, seen.devices) == ([], [])


def test_an_alert_another_instance_stored_is_reported(shared: Path) -> None:
    seen = Seen()
    watch = watcher(shared, seen)
    alert = alert_message()
    Store(shared).add_alert(alert, stored_at=NOW)
    watch.check()
    assert seen.alerts == [alert["alert_id"]]


def test_a_claim_another_instance_wrote_is_reported(shared: Path) -> None:
    other = Store(shared)
    alert = alert_message()
    other.add_alert(alert, stored_at=NOW)
    seen = Seen()
    watch = watcher(shared, seen)
    other.claim(alert["alert_id"], "bob", at=NOW + 1)
    watch.check()
    assert seen.alerts == [alert["alert_id"]]


def test_a_position_update_is_reported_for_its_alert(shared: Path) -> None:
    other = Store(shared)
    alert = alert_message()
    other.add_alert(alert, stored_at=NOW)
    seen = Seen()
    watch = watcher(shared, seen)
    other.add_update("position", {"v": 1, "device_id": "tok-001", "seq": 2,
                                  "alert_id": alert["alert_id"],
                                  "created_at": "2026-11-23T10:00:05.000Z",
                                  "position": alert["position"]}, stored_at=NOW + 5)
    watch.check()
    assert seen.alerts == [alert["alert_id"]]


def test_a_device_status_is_reported_once(shared: Path) -> None:
    seen = Seen()
    watch = watcher(shared, seen)
    Store(shared).set_device_status("tok-001", status(), seen_at=NOW)
    watch.check()
    watch.check()
    assert seen.devices == ["tok-001"]


def test_without_a_commit_nothing_is_read_or_reported(shared: Path) -> None:
    other = Store(shared)
    other.add_alert(alert_message(), stored_at=NOW)
    seen = Seen()
    watch = watcher(shared, seen)
    assert watch.check() == ([], [])
    assert (seen.alerts, seen.devices) == ([], [])


def test_an_online_device_that_went_quiet_is_pushed_once(shared: Path) -> None:
    """Silence writes nothing, yet the fleet view now shows the device as unknown."""
    Store(shared).set_device_status("tok-001", status(), seen_at=NOW)
    seen, now = Seen(), [NOW]
    watch = StoreWatcher(shared, seen.alerts.append, seen.devices.append, clock=lambda: now[0])
    watch.check()
    now[0] = NOW + 3 * 30.0 + 10  # three heartbeats (30 s) missed, and then some
    watch.check()
    now[0] += 60
    watch.check()
    assert seen.devices == ["tok-001"]


def test_a_failing_push_is_logged_and_the_others_still_go(shared: Path, caplog) -> None:
    pushed: list[str] = []

    def on_alert(alert_id: str) -> None:
        if not pushed:
            pushed.append("failed once")
            raise RuntimeError("a record that cannot be built")
        pushed.append(alert_id)

    watch = StoreWatcher(shared, on_alert, lambda device_id: None, clock=lambda: NOW)
    watch.check()
    other = Store(shared)
    first, second = alert_message(), alert_message(seq=2)
    other.add_alert(first, stored_at=NOW)
    other.add_alert(second, stored_at=NOW)
    watch.check()
    assert pushed[1:] == [second["alert_id"]] or pushed[1:] == [first["alert_id"]]
    assert "could not push" in caplog.text


def test_an_escalation_another_instance_recorded_is_reported(shared: Path) -> None:
    """The next desk's operators on this instance must see the alert climb to them."""
    from control_center.escalation import EscalationLog, Step

    other = Store(shared)
    alert = alert_message()
    other.add_alert(alert, stored_at=NOW)
    log = EscalationLog(shared)
    seen = Seen()
    watch = watcher(shared, seen)
    log.record([Step(alert["alert_id"], 1, "south", NOW + 30, False)], now=NOW + 30)
    watch.check()
    assert seen.alerts == [alert["alert_id"]]
    log.close()
