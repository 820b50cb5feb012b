"""Messages on their way to the centre, as plain values: what the pure state machines
(`firmware/alert_state.py`, `firmware/uplink/delivery.py`) hand over and get back, with no
storage behind them. The SQLite outbox (`outbox.py`) numbers and keeps them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import MessageKind


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    kind: MessageKind
    topic: str
    payload: bytes
    durable: bool = True  # False: could not be stored (disk full), lives only in memory


@dataclass(frozen=True)
class Outgoing:
    """A message to store: its `seq` field is filled in by the outbox."""

    kind: MessageKind
    topic: str
    message: dict[str, Any]
