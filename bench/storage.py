"""Micro-benchmarks of the fixed costs on the SOS path, to explain the gap to the floor.

Each is measured alone, in a quiet process, on the same filesystem as the end-to-end run:
- the device's outbox append (SQLite WAL, synchronous=FULL: one fsync per alert);
- the centre's Store.add_alert (same settings, another fsync);
- decoding an alert (JSON + JSON Schema validation), which the centre does on every message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center.store import Store as CentreStore
from firmware.alert_state import (
    AlertCore,
    AppendToOutbox,
    DeviceIdentity,
    Now,
    Readings,
    Trigger,
)
from firmware.gps.position import PositionProvider
from firmware.uplink.outbox import Outbox
from firmware.uplink.outgoing import Outgoing
from protocol import MessageKind, decode, encode, new_id
from protocol.signing import Signer, public_key_from_b64, verify

BENCH_SIGNER = Signer(Ed25519PrivateKey.generate())
BENCH_KEYS = [public_key_from_b64(BENCH_SIGNER.public_key_b64)]
SURVEYED = {"lat": 52.5163, "lon": 13.3777}  # any valid position; the pillar's is surveyed


@dataclass(frozen=True)
class SampleAlert:
    """What the pillar's core asks to store for one trigger: the items and its state."""

    items: list[Outgoing]
    state: dict[str, Any]

    def payload(self) -> bytes:
        """The alert as it goes on the wire (seq filled in and signed, as the outbox does)."""
        item = self.items[0]
        return encode(item.kind, BENCH_SIGNER.sign({**item.message, "seq": 1}))


def sample_alert(device_id: str) -> SampleAlert:
    """A real alert from the real AlertCore, so sizes and contents match the end-to-end run."""
    core = AlertCore(DeviceIdentity(device_id, "pillar"), command_keys=[])
    position = PositionProvider(lambda: None, surveyed={"alt_m": None, "accuracy_m": 5.0,
                                                        **SURVEYED}).current()
    actions = core.handle(Trigger("button_press"), Now(time.monotonic(), datetime.now(UTC)),
                          Readings(position, None))
    store = next(a for a in actions if isinstance(a, AppendToOutbox))
    return SampleAlert(store.items, store.state)


@dataclass
class MicroSamples:
    outbox_append_s: list[float] = field(default_factory=list)
    store_add_alert_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)


def time_outbox_append(workdir: Path, alert: SampleAlert, n: int) -> list[float]:
    """n appends of one alert with the device state; each row is removed (untimed) after."""
    outbox = Outbox(workdir / "micro-outbox.sqlite", signer=BENCH_SIGNER)
    out: list[float] = []
    try:
        for _ in range(n):
            start = time.perf_counter()
            rows = outbox.append(alert.items, state=alert.state)
            out.append(time.perf_counter() - start)
            outbox.remove(rows[0].seq)
    finally:
        outbox.close()
    return out


def time_store_add_alert(workdir: Path, alert: SampleAlert, n: int) -> list[float]:
    """n new alerts (fresh ids) into a centre Store, as CenterService does on arrival."""
    store = CentreStore(workdir / "micro-center.sqlite")
    message = decode(MessageKind.ALERT, alert.payload())
    out: list[float] = []
    try:
        for _ in range(n):
            fresh = {**message, "alert_id": new_id()}
            start = time.perf_counter()
            store.add_alert(fresh, time.time())
            out.append(time.perf_counter() - start)
    finally:
        store.close()
    return out


def time_decode(alert: SampleAlert, n: int) -> list[float]:
    payload = alert.payload()
    out: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        verify(decode(MessageKind.ALERT, payload), BENCH_KEYS)
        out.append(time.perf_counter() - start)
    return out


def run_micro(workdir: Path, device_id: str, n: int) -> MicroSamples:
    workdir.mkdir(parents=True, exist_ok=True)
    alert = sample_alert(device_id)
    return MicroSamples(
        outbox_append_s=time_outbox_append(workdir, alert, n),
        store_add_alert_s=time_store_add_alert(workdir, alert, n),
        decode_s=time_decode(alert, n),
    )
