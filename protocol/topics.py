"""MQTT topic layout, version 1 (docs/PROTOCOL.md has the full table).

    sos/v1/dev/{device_id}/alert     device -> centre, QoS 1: an SOS
    sos/v1/dev/{device_id}/position  device -> centre, QoS 1: updates while an SOS is active
    sos/v1/dev/{device_id}/event     device -> centre, QoS 1: cancel requests, command results
    sos/v1/dev/{device_id}/status    device -> centre, retained: online/heartbeat, offline (will)
    sos/v1/dev/{device_id}/cmd       centre -> device, QoS 1: ack, close
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import MessageKind

PREFIX = "sos/v1/dev"

# Which schema each device topic's payload follows.
TOPIC_KINDS: dict[str, MessageKind] = {
    "alert": MessageKind.ALERT,
    "position": MessageKind.POSITION,
    "event": MessageKind.EVENT,
    "status": MessageKind.STATUS,
    "cmd": MessageKind.COMMAND,
}


@dataclass(frozen=True)
class Topics:
    """The topics of one device."""

    device_id: str

    def _t(self, leaf: str) -> str:
        return f"{PREFIX}/{self.device_id}/{leaf}"

    @property
    def alert(self) -> str:
        return self._t("alert")

    @property
    def position(self) -> str:
        return self._t("position")

    @property
    def event(self) -> str:
        return self._t("event")

    @property
    def status(self) -> str:
        return self._t("status")

    @property
    def command(self) -> str:
        return self._t("cmd")


def parse_device_topic(topic: str) -> tuple[str, MessageKind] | None:
    """`sos/v1/dev/abc/alert` -> ("abc", ALERT); None for a topic outside the layout."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX:
        return None
    kind = TOPIC_KINDS.get(parts[4])
    if kind is None or not parts[3]:
        return None
    return parts[3], kind


def all_devices(leaf: str) -> str:
    """Wildcard subscription for one leaf across every device."""
    return f"{PREFIX}/+/{leaf}"
