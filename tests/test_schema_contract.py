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
