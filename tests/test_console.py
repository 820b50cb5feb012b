"""The operator's lines, read as an operator reads them: where, when, who, what state."""

from __future__ import annotations

from control_center.console import alert_line, event_line, record_line, rejection_line
from control_center.store import Store
from tests.helpers import alert_message

LIVE = {"source": "live", "lat": 52.378101, "lon": 4.900012, "alt_m": 3.0, "accuracy_m": 4.2,
        "fix_time": "2026-11-23T14:45:00.000Z", "age_s": 0.8}


def test_an_alert_line_gives_time_device_kind_trigger_and_latitude_before_longitude() -> None:
    alert = alert_message(device_id="tok-amb-0412", created_at="2026-11-23T14:45:01.250Z",
                          position=LIVE, battery={"percent": 81.4, "charging": False})
    line = alert_line(alert)
    assert line.startswith("SOS 14:45:01Z tok-amb-0412 (token, button_hold) ")
    assert "at 52.37810,4.90001 ±4 m (live GPS, 0.8 s old)" in line
    assert "battery 81%" in line and line.endswith(f"id {alert['alert_id'][:8]}")


def test_a_position_the_device_only_remembers_says_so_loudly() -> None:
    stale = {**LIVE, "source": "last_known", "age_s": 312.0}
    line = alert_line(alert_message(position=stale))
    assert "(LAST KNOWN GPS, 312.0 s old)" in line


def test_no_position_is_unknown_and_a_pillar_on_mains_says_mains() -> None:
    none = {"source": "none", "lat": None, "lon": None, "alt_m": None, "accuracy_m": None,
            "fix_time": None, "age_s": None}
    line = alert_line(alert_message(device_id="pil-ams-cs-01", device_kind="pillar",
                                    trigger="button_press", position=none, battery=None))
    assert "(pillar, button_press) position UNKNOWN, mains" in line


def test_a_surveyed_kiosk_position_is_named_as_such() -> None:
    surveyed = {**LIVE, "source": "surveyed", "accuracy_m": 1.0, "age_s": None}
    assert "at 52.37810,4.90001 ±1 m (surveyed kiosk position)" in alert_line(
        alert_message(position=surveyed))


def test_the_alert_list_shows_state_time_and_what_the_operator_must_know(tmp_path) -> None:
    store = Store(tmp_path / "c.sqlite")
    alert = alert_message(position=LIVE)
    store.add_alert(alert, stored_at=1795443901.0)  # 2026-11-23T14:25:01Z
    store.set_device_status("tok-001", {"v": 1, "device_id": "tok-001", "state": "offline"},
                            1795443902.0)
    line = record_line(store.alert(alert["alert_id"]))
    store.close()
    assert line.startswith(f"{alert['alert_id'][:8]}  open         14:25:01Z  tok-001 (token) ")
    assert "at 52.37810,4.90001" in line and line.endswith("[DEVICE OFFLINE]")


def test_an_event_line_names_the_alert_and_a_refusal_its_reason() -> None:
    cancel = {"type": "cancel_requested", "device_id": "tok-001", "alert_id": "5e8a1f0c" * 4}
    assert event_line(cancel) == "    5e8a1f0c tok-001: cancel requested"
    storage = {"type": "storage_alert", "device_id": "tok-001", "reason": "card full",
               "storage": {"mode": "evidence_only", "free_mb": 40.4}}
    assert event_line(storage) == "STORAGE tok-001: evidence_only, 40 MiB free: card full"
    refused = {"type": "command_rejected", "device_id": "tok-001", "alert_id": "5e8a1f0c" * 4,
               "command_id": "1f2e3d4c" * 4, "reason_code": "expired",
               "reason": "timestamp 63 s old"}
    assert rejection_line(refused, {"type": "close"}) == (
        "REJECTED close 1f2e3d4c of alert 5e8a1f0c by tok-001: expired (timestamp 63 s old)")
