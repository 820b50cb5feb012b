"""MQTT topic layout, version 1 (docs/PROTOCOL.md has the full table).

    sos/v1/dev/{device_id}/alert     device -> centre, QoS 1: an SOS
    sos/v1/dev/{device_id}/position  device -> centre, QoS 1: updates while an SOS is active
    sos/v1/dev/{device_id}/event     device -> centre, QoS 1: cancel requests, command results
    sos/v1/dev/{device_id}/status    device -> centre, retained: online/heartbeat, offline (will)
    sos/v1/dev/{device_id}/cmd       centre -> device, QoS 1: ack, close
    sos/v1/dev/{device_id}/live      device -> centre, QoS 0: encrypted live video chunks during
                                     an SOS (no JSON schema: docs/LIVE.md)
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import MessageKind

PREFIX = "sos/v1/dev"
LIVE = "live"  # the live-video leaf: binary payload, header in a user property (docs/LIVE.md)
# The MQTT 5 user property of a live publish that carries its signed header (canonical JSON).
LIVE_HEADER_PROPERTY = "sos-live-header"

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

    @property
    def live(self) -> str:
        return self._t(LIVE)


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


def parse_live_topic(topic: str) -> str | None:
    """`sos/v1/dev/abc/live` -> "abc"; None for any other topic (live is not in TOPIC_KINDS:
    its payload is an age file, not a JSON message)."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX or parts[4] != LIVE or not parts[3]:
        return None
    return parts[3]
