"""The JSON Schemas are the contract: what the code requires, the schemas require.

An outside integrator writes a centre or a device from docs/PROTOCOL.md and the schemas alone, so
a field our receivers cannot do without must be `required` there, and a message our code refuses
for its shape must be one the schema refuses too.
"""

from __future__ import annotations

import ast
import json
from importlib import resources
from pathlib import Path

import pytest

from protocol import MessageKind, ProtocolError, decode
from tests.helpers import alert_message

ROOT = Path(__file__).resolve().parents[1]

# The fields each receiver reads without a default (`message["field"]`), by message kind.
READS: dict[MessageKind, tuple[str, ...]] = {
    MessageKind.ALERT: ("alert_id", "battery", "created_at", "device_id", "device_kind",
                        "position", "seq", "trigger", "v"),
    MessageKind.POSITION: ("alert_id", "created_at", "device_id", "position", "seq", "v"),
    MessageKind.EVENT: ("created_at", "device_id", "seq", "type", "v"),
    MessageKind.STATUS: ("device_id", "state", "v"),
    MessageKind.COMMAND: ("command_id", "issued_at", "operator", "seq", "sig", "type", "v"),
    MessageKind.DELIVERY_RECEIPT: ("device_id", "digest", "seq", "sig", "v"),
}
# Where received messages are read, and the names they are read through there.
RECEIVERS = {
    "control_center/service.py": ("body", "alert"),
    "control_center/store.py": ("alert", "message", "status", "command"),
    "firmware/alert_state.py": ("command",),
    "firmware/uplink/mqtt.py": ("receipt",),
}
# Read only where the schema makes them required too (`allOf` if/then on `type`).
CONDITIONAL = {"command_id", "call_id", "alert_id", "reason_code", "storage", "reason",
               "voice_session", "sdp"}  # voice_offer, voice_hangup (command.schema.json)


def schema(kind: MessageKind) -> dict:
    text = resources.files("protocol").joinpath("schemas", f"{kind.value}.schema.json")
    return json.loads(text.read_text())


@pytest.mark.parametrize("kind", list(READS))
def test_every_field_a_receiver_reads_is_required_by_the_schema(kind: MessageKind) -> None:
    assert set(READS[kind]) <= set(schema(kind)["required"])


def test_the_table_of_read_fields_covers_what_the_code_reads() -> None:
    """Adding a `message["new_field"]` to a receiver without requiring it fails here."""
    known = set().union(*READS.values()) | CONDITIONAL
    for path, names in RECEIVERS.items():
        tree = ast.parse((ROOT / path).read_text())
        seen = set()
        for node in ast.walk(tree):
            if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                    and node.value.id in names and isinstance(node.slice, ast.Constant)
                    and isinstance(node.slice.value, str)):
                seen.add(node.value.id)
                assert node.slice.value in known, \
                    f"{path}:{node.lineno} reads {node.value.id}[{node.slice.value!r}]"
        assert seen == set(names), f"{path}: no reads through {set(names) - seen} (renamed?)"


def test_a_command_the_device_would_refuse_for_want_of_seq_or_sig_the_schema_refuses() -> None:
    body = {"v": 1, "command_id": "c" * 32, "type": "ack", "alert_id": "a" * 32,
            "issued_at": "2026-11-23T10:00:00.000Z", "operator": "op"}
    for missing in ({}, {"seq": 1}, {"sig": "A" * 86 + "=="}):
        with pytest.raises(ProtocolError, match="required property"):
            decode(MessageKind.COMMAND, json.dumps({**body, **missing}).encode())


def test_an_alert_without_a_field_the_centre_stores_is_refused_by_the_schema() -> None:
    for field in READS[MessageKind.ALERT]:
        message = {k: v for k, v in alert_message().items() if k != field}
        with pytest.raises(ProtocolError):
            decode(MessageKind.ALERT, json.dumps(message).encode())


def test_the_largest_voice_offer_the_console_sends_fits_a_devices_message_limit() -> None:
    """A browser's SDP at the console's limit (printable lines of 78 characters, as SDP is),
    with two ICE server entries at their schema limits: a device reads it (16 KiB)."""
    from control_center.web.voice_api import SDP_MAX
    from protocol.messages import MAX_PAYLOAD_BYTES, MessageKind, encode

    line = "a=candidate:" + "x" * 66 + "\r\n"
    sdp = ("v=0\r\n" + line * SDP_MAX)[:SDP_MAX]
    url = "turn:" + "t" * 189 + ":3478"
    entry = {"urls": [url] * 4, "username": "u" * 200, "credential": "c" * 200}
    command = {"v": 1, "command_id": "0f" * 16, "seq": 2**53 - 1, "type": "voice_offer",
               "alert_id": "ab" * 16, "issued_at": "2026-12-03T10:00:00.000Z",
               "operator": "o" * 64, "voice_session": "5e" * 16, "sdp": sdp,
               "ice_servers": [entry, entry], "sig": "A" * 86 + "=="}
    assert len(encode(MessageKind.COMMAND, command)) <= MAX_PAYLOAD_BYTES
