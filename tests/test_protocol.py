"""The JSON Schemas and the rules docs/PROTOCOL.md states about them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from protocol import MessageKind, ProtocolError, decode, encode, validate
from protocol.messages import MAX_PAYLOAD_BYTES
from protocol.topics import parse_device_topic
from tests.helpers import alert_message

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"


def test_an_impossible_date_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="created_at"):
        validate(MessageKind.ALERT, alert_message(created_at="2025-13-99T00:00:00Z"))


def test_an_unknown_optional_field_is_accepted_so_adding_one_keeps_the_version() -> None:
    validate(MessageKind.ALERT, {**alert_message(), "responder_eta_s": 240})


def test_a_different_version_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="v"):
        validate(MessageKind.ALERT, {**alert_message(), "v": 2})


def test_an_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="size limit"):
        decode(MessageKind.ALERT, b"{" + b" " * MAX_PAYLOAD_BYTES + b"}")


def test_encode_refuses_what_breaks_our_own_schema() -> None:
    with pytest.raises(ProtocolError, match="device_kind"):
        encode(MessageKind.ALERT, alert_message(device_kind="drone"))


@pytest.mark.parametrize("topic", ["sos/v1/dev/tok-001/alert/x", "sos/v2/dev/tok-001/alert",
                                   "sos/v1/dev//alert", "sos/v1/dev/tok-001/reboot"])
def test_topics_outside_the_layout_are_not_parsed(topic: str) -> None:
    assert parse_device_topic(topic) is None


def test_every_json_example_in_the_protocol_document_validates() -> None:
    text = DOC.read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    for block in blocks:
        message = json.loads(block)
        kind = _kind_of(message)
        assert kind is not None, f"cannot tell the kind of example {message}"
        validate(kind, message)


def _kind_of(message: dict) -> MessageKind | None:
    if "command_id" in message and "operator" in message:
        return MessageKind.COMMAND
    if "state" in message:
        return MessageKind.STATUS
    if message.get("type") == "delivered":
        return MessageKind.DELIVERY_RECEIPT
    if "trigger" in message:
        return MessageKind.ALERT
    if "type" in message:
        return MessageKind.EVENT
    if "position" in message:
        return MessageKind.POSITION
    return None
