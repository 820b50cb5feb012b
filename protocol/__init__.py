"""The wire protocol shared by devices and the control centre: topics, schemas, validation.

See docs/PROTOCOL.md for the human description; the JSON Schemas in `schemas/` are the contract.
"""

from protocol.messages import (
    SCHEMA_VERSION,
    MessageKind,
    ProtocolError,
    decode,
    encode,
    new_id,
    payload_digest,
    utc_iso,
    validate,
)
from protocol.topics import Topics, parse_device_topic

__all__ = [
    "SCHEMA_VERSION",
    "MessageKind",
    "ProtocolError",
    "Topics",
    "decode",
    "encode",
    "new_id",
    "parse_device_topic",
    "payload_digest",
    "utc_iso",
    "validate",
]
