"""Live view latency: glass-to-glass over a real broker with the synthetic camera (docs/LIVE.md).

`python -m bench.live_bench [SECONDS]` (default 10) starts a private Mosquitto (mutual TLS, the
fleet's ACL), a control centre with a LiveReceiver, and a device-like publisher: the synthetic
camera (640x480 main + 320x240 lores at 25 fps, both encoded, as on a device) -> LiveStreamer
(0.5 s chunks, age to the live key, Ed25519-signed) -> MqttUplink.publish_live (QoS 0). It
streams one SOS for SECONDS and prints, in ms over the chunks the centre accepted:

  live_newest   the newest frame of a chunk captured -> the chunk written (playable) at the centre
  live_first    the first frame of a chunk captured -> the same moment (adds the chunk's length)
  live_device   newest frame captured -> chunk ready to publish on the device (waiting for the
                next keyframe, mux, encrypt, sign)
  live_transit  chunk ready on the device -> written at the centre (sender thread, paho, TLS,
                broker, centre: checks, decrypt, files)

Device and centre share one machine and one clock here; across machines, their clock offset
adds to live_newest and live_first (not to live_device).

`live_rows(tmpdir)` returns the rows as dicts (the `bench.stats.Summary` keys: key, label, n,
p50_ms, p95_ms, p99_ms, max_ms) plus a last `live_counts` row (chunks, lost, refused, dropped,
unsent, kbit_s, seconds); `run_live(tmpdir)` returns them as a `bench.report.LiveReport` (the
section of `python -m bench`), a run that broke as an entry in its `errors`.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control_center.live import LiveReceiver
from control_center.service import CenterEvent, FleetTrust
from control_center.store import Store
from firmware.camera.live import LiveStreamer
from firmware.camera.synthetic import SyntheticCamera, half_size
from firmware.uplink.mqtt import Connected, MqttUplink
from firmware.uplink.outbox import Outbox
from protocol import MessageKind, Topics, encode, new_id
from protocol.signing import Signer, load_or_make_key
from simulator.broker import PrivateBroker

from .report import LiveReport
from .stats import Summary, summarise

DEVICE_ID = "bench-live-001"
FPS = 25
MAIN_SIZE = (640, 480)
CHUNK_S = 0.5


def live_rows(tmpdir: Path, seconds: float = 10.0, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Stream one SOS for about `seconds` and measure it (see the module docstring)."""
    tmpdir = Path(tmpdir)
    accepted: list[dict[str, Any]] = []
    made: dict[int, dict[str, Any]] = {}
    changed = threading.Condition()

    def observe(event: CenterEvent) -> None:
        if event.kind == "live":
            with changed:
                accepted.append(event.message)
                changed.notify_all()

    with PrivateBroker(tmpdir / "broker") as broker:
        broker.fleet.ensure_live_key()
        receiver = LiveReceiver(broker.fleet.live_identity_file, tmpdir / "live",
                                FleetTrust(broker.fleet))
        store = Store(tmpdir / "centre.sqlite")
        centre = broker.centre_service(store, on_event=observe, live=receiver)
        centre.start()
        broker.identity(DEVICE_ID)
        signer = Signer(load_or_make_key(broker.signing_key_file(DEVICE_ID)))
        status = encode(MessageKind.STATUS, {"v": 1, "device_id": DEVICE_ID, "state": "online"})
        events: queue.Queue = queue.Queue()
        outbox = Outbox(tmpdir / "outbox.sqlite", signer=signer)
        uplink = MqttUplink(DEVICE_ID, broker.identity(DEVICE_ID), outbox, events.put,
                            will_payload=status, status_payload=lambda: status,
                        receipt_keys=broker.centre_keys())
        topic = Topics(DEVICE_ID).live

        def publish(payload: bytes, header: dict[str, Any]) -> bool:
            made[header["seq"]] = header
            return uplink.publish_live(topic, payload, header)

        camera = SyntheticCamera(DEVICE_ID, size=MAIN_SIZE, fps=FPS)
        live = LiveStreamer(DEVICE_ID, broker.fleet.live_recipients(), signer, publish,
                            CHUNK_S, fps=FPS, size=camera.lores_size)
        try:
            uplink.start()
            while not isinstance(events.get(timeout=timeout_s), Connected):
                pass
            camera.start(lambda frame: None, live.on_lores)
            live.start(new_id())
            wanted = max(1, round(seconds / (camera.lores_gop_frames / FPS)))
            with changed:
                if not changed.wait_for(lambda: len(accepted) >= wanted, seconds + timeout_s):
                    raise RuntimeError(f"only {len(accepted)} of {wanted} chunks arrived")
            live.stop()
            with changed:
                changed.wait_for(lambda: any(m["final"] for m in accepted), timeout_s)
        finally:
            camera.stop()
            live.close()
            uplink.stop()
            outbox.close()
            centre.stop()
            store.close()

    good = [m for m in accepted if m["accepted"] and m["frames"]]
    newest = [m["latency_newest_ms"] / 1000 for m in good]
    first = [m["latency_first_ms"] / 1000 for m in good]
    device = [made[m["seq"]]["ready_mono"] - made[m["seq"]]["last_frame_mono"] for m in good]
    transit = [n - d for n, d in zip(newest, device, strict=True)]
    video_s = sum(made[m["seq"]]["duration_s"] for m in good) or 1.0
    stats = live.stats()
    return [
        summarise("live_newest", "live: newest frame captured -> playable at the centre",
                  newest).as_dict(),
        summarise("live_first", "live: first frame captured -> playable at the centre",
                  first).as_dict(),
        summarise("live_device", "  device: newest frame captured -> chunk ready", device)
        .as_dict(),
        summarise("live_transit", "  chunk ready -> playable at the centre", transit).as_dict(),
        {"key": "live_counts", "label": "live: chunks at the centre, and losses",
         "chunks": receiver.chunks, "lost": receiver.lost, "refused": receiver.refused,
         "dropped": stats["chunks_dropped"], "unsent": stats["chunks_unsent"],
         "kbit_s": round(stats["bytes_sent"] * 8 / 1000 / video_s, 1),
         "seconds": round(video_s, 2)},
    ]


def run_live(tmpdir: Path, seconds: float = 10.0, *,
             progress: Callable[[str], None] = lambda text: None,
             context: dict[str, Any] | None = None) -> LiveReport:
    """`live_rows` as the live view section of `python -m bench`."""
    report = LiveReport(seconds=seconds, context={
        "main": "x".join(map(str, MAIN_SIZE)), "lores": "x".join(map(str, half_size(MAIN_SIZE))),
        "fps": FPS, "chunk_s": CHUNK_S, **(context or {})})
    progress(f"live view: one SOS streamed for {seconds:g} s through a private Mosquitto")
    try:
        rows = live_rows(Path(tmpdir), seconds)
    except Exception as exc:  # broker, encoder, timeouts: report them and go on
        report.errors.append(f"live view: {type(exc).__name__}: {exc}")
        return report
    for row in rows:
        if "p50_ms" in row:
            report.summaries.append(Summary(**row))
        else:
            report.counts = {k: v for k, v in row.items() if k not in ("key", "label")}
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    seconds = float(args[0]) if args else 10.0
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="live-bench-") as tmp:
        rows = live_rows(Path(tmp), seconds)
    print(f"live view, {MAIN_SIZE[0]}x{MAIN_SIZE[1]} main + lores at {FPS} fps, "
          f"{CHUNK_S} s chunks, {os.cpu_count()} CPUs")
    for row in rows:
        if "p50_ms" in row:
            print(f"  {row['label']:<58} n={row['n']:<4} p50 {row['p50_ms']:8.1f} ms  "
                  f"p95 {row['p95_ms']:8.1f} ms  max {row['max_ms']:8.1f} ms")
        else:
            print(f"  {row['label']:<58} " + "  ".join(
                f"{k}={v}" for k, v in row.items() if k not in ("key", "label")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
