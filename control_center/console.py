"""One readable line per thing an operator must see."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from control_center.store import AlertRecord


def describe_position(position: dict[str, Any]) -> str:
    source = position["source"]
    if source == "none" or position["lat"] is None:
        return "position UNKNOWN"
    where = f"{position['lat']:.5f},{position['lon']:.5f}"
    accuracy = f" ±{position['accuracy_m']:.0f} m" if position.get("accuracy_m") else ""
    if source == "surveyed":
        return f"at {where}{accuracy} (surveyed kiosk position)"
    age = position.get("age_s")
    age_text = f", {age:.1f} s old" if age is not None else ""
    label = "live GPS" if source == "live" else "LAST KNOWN GPS"
    return f"at {where}{accuracy} ({label}{age_text})"


def describe_battery(battery: dict[str, Any] | None) -> str:
    if battery is None:
        return "mains"
    return f"battery {battery['percent']:.0f}%{' charging' if battery['charging'] else ''}"


def alert_line(alert: dict[str, Any]) -> str:
    """`SOS 14:45:01Z tok-001 (token, button_hold) at 52.37..., battery 81%  id 1f2e3d4c`"""
    created = alert["created_at"][11:19] + "Z"
    return (f"SOS {created} {alert['device_id']} ({alert['device_kind']}, {alert['trigger']}) "
            f"{describe_position(alert['position'])}, {describe_battery(alert['battery'])}"
            f"  id {alert['alert_id'][:8]}")


def record_line(record: AlertRecord) -> str:
    stored = datetime.fromtimestamp(record.stored_at, UTC).strftime("%H:%M:%SZ")
    flags = []
    if record.device_offline:
        flags.append("DEVICE OFFLINE")
    if record.cancel_requested_at:
        flags.append("cancel requested by wearer")
    if record.acked_by:
        flags.append(f"acked by {record.acked_by}")
    flag_text = f" [{'; '.join(flags)}]" if flags else ""
    return (f"{record.alert_id[:8]}  {record.status:<12} {stored}  {record.device_id} "
            f"({record.device_kind}) {describe_position(record.position)}{flag_text}")


def event_line(event: dict[str, Any]) -> str:
    """An event from a device: about one of its alerts, or (storage) about the device itself."""
    if event["type"] == "storage_alert":
        storage = event["storage"]
        return (f"STORAGE {event['device_id']}: {storage['mode']}, {storage['free_mb']:.0f} MiB "
                f"free: {event['reason']}")
    detail = event.get("reason") or event.get("call_id") or event.get("command_id", "")[:8]
    about = event.get("alert_id", "")[:8] or "device"
    return f"    {about} {event['device_id']}: {event['type'].replace('_', ' ')} {detail}".rstrip()


def rejection_line(event: dict[str, Any], command: dict[str, Any] | None) -> str:
    """`REJECTED close 1f2e3d4c of alert 5e8a1f0c by tok-001: expired (timestamp 63 s old ...)`:
    a device refused a command; `command` is ours as stored (None: another centre's)."""
    what = command["type"] if command else "command"
    about = f" of alert {event['alert_id'][:8]}" if event.get("alert_id") else ""
    detail = f" ({event['reason']})" if event.get("reason") else ""
    return (f"REJECTED {what} {event['command_id'][:8]}{about} by {event['device_id']}: "
            f"{event.get('reason_code', 'no reason code')}{detail}")
