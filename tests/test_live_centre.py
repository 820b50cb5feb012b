"""Live view, centre side: LiveReceiver's checks, HLS playlist and live.ts (read by the real
ffprobe), and the whole path from a synthetic camera through a real Mosquitto over mutual TLS to
a playable file at the centre."""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from control_center.fleet import age_x25519_keypair
from control_center.live import LiveReceiver
from control_center.service import FleetTrust
from control_center.store import Store
from firmware.camera.frames import EncodedFrame
from firmware.camera.live import LiveStreamer
from firmware.camera.synthetic import SyntheticCamera, encode_clip
from firmware.uplink.mqtt import Connected, MqttUplink
from firmware.uplink.outbox import Outbox
from protocol import MessageKind, Topics, encode, new_id
from protocol.mqtt import make_client
from protocol.signing import Signer, load_or_make_key
from protocol.topics import LIVE_HEADER_PROPERTY
from tests.conftest import CenterProbe
from tests.helpers import device_signer

DEVICE = "tok-001"
FPS = 25
UTC0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
DEVICE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def keys_for(device_id: str):
    return {DEVICE: [DEVICE_KEY.public_key()], "tok-002": [OTHER_KEY.public_key()]}.get(
        device_id, [])


@pytest.fixture(scope="module")
def clip() -> list[EncodedFrame]:
    """60 lores frames at 25 fps, a keyframe every 12: five chunks of 0.48 s."""
    return encode_clip(DEVICE, 60, size=(160, 120), fps=FPS, bitrate=200_000, gop_s=0.5,
                       utc0=UTC0)


@pytest.fixture(scope="module")
def live_key(tmp_path_factory) -> tuple[Path, str]:
    identity, recipient = age_x25519_keypair()
    path = tmp_path_factory.mktemp("keys") / "live-identity.txt"
    path.write_text(f"# public key: {recipient}\n{identity}\n")
    return path, recipient


def make_chunks(live_key, clip, *, device_id: str = DEVICE, key=DEVICE_KEY,
                alert_id: str | None = None) -> list[tuple[bytes, dict[str, Any]]]:
    """The chunks a device makes of `clip` for one alert (the last one final)."""
    sent: list[tuple[bytes, dict[str, Any]]] = []
    live = LiveStreamer(device_id, [live_key[1]], Signer(key),
                        lambda p, h: sent.append((p, h)) is None, 0.5, clock=lambda: 0.0,
                        fps=FPS, size=(160, 120), max_pending=64, threaded=False)
    live.start(alert_id or new_id())
    for frame in clip:
        live.on_lores(frame)
    live.stop()
    live.pump()
    return sent


def receiver(live_key, tmp_path: Path, clock=lambda: UTC0.timestamp() + 2.0) -> LiveReceiver:
    return LiveReceiver(live_key[0], tmp_path / "live", keys_for, clock=clock)


def ffprobe(path: Path) -> dict[str, Any]:
    run = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                          "-show_entries", "stream=codec_name,width,height,nb_read_frames",
                          "-of", "json", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (stream,) = json.loads(run.stdout)["streams"]
    return stream


# -- LiveReceiver ----------------------------------------------------------------------------------
def test_chunks_become_an_hls_playlist_and_a_live_ts_that_ffprobe_plays(live_key, clip,
                                                                         tmp_path) -> None:
    chunks = make_chunks(live_key, clip)
    rx = receiver(live_key, tmp_path)
    results = [rx.handle(DEVICE, payload, header) for payload, header in chunks]
    assert all(r.accepted for r in results)
    alert_id = chunks[0][1]["alert_id"]
    directory = tmp_path / "live" / alert_id
    assert sorted(p.name for p in directory.glob("chunk-*.ts")) == [
        f"chunk-{i:06d}.ts" for i in range(5)]
    playlist = (directory / "index.m3u8").read_text().splitlines()
    assert playlist[:5] == ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-PLAYLIST-TYPE:EVENT",
                            "#EXT-X-TARGETDURATION:1", "#EXT-X-MEDIA-SEQUENCE:0"]
    assert [line.split(":", 1)[1] for line in playlist if "PROGRAM-DATE-TIME" in line] == [
        h["first_frame_utc"] for _, h in chunks]
    assert playlist.count("#EXTINF:0.480000,") == 5
    assert playlist[-1] == "#EXT-X-ENDLIST"  # the device's final chunk ended the stream
    expected = {"codec_name": "h264", "width": 160, "height": 120, "nb_read_frames": "60"}
    assert ffprobe(directory / "live.ts") == expected
    assert ffprobe(directory / "index.m3u8") == expected


def test_latency_is_measured_to_the_newest_and_the_first_frame_of_each_chunk(
        live_key, clip, tmp_path) -> None:
    chunks = make_chunks(live_key, clip)
    rx = receiver(live_key, tmp_path, clock=lambda: UTC0.timestamp() + 2.0)
    first = rx.handle(DEVICE, *chunks[0])
    # Chunk 0 holds frames 0..11, captured at 0.00 .. 0.44 s; the centre wrote it at 2.00 s.
    assert first.latency_newest_ms == pytest.approx(2000 - 440)
    assert first.latency_first_ms == pytest.approx(2000)
    for payload, header in chunks[1:]:
        rx.handle(DEVICE, payload, header)
    stats = rx.stats()
    assert stats["chunks"] == 5 and stats["refused"] == 0 and stats["lost"] == 0
    # Newest frames at 0.44, 0.92, 1.40, 1.88, 2.36 s (the last is in the future: clocks).
    assert stats["latency_newest_ms"] == {"p50": pytest.approx(600), "p95": pytest.approx(1560),
                                          "n": 5}
    assert stats["latency_first_ms"]["p50"] == pytest.approx(2000 - 960)


def test_a_forged_signature_is_refused_with_one_log_line_and_nothing_written(
        live_key, clip, tmp_path, caplog) -> None:
    caplog.set_level(logging.ERROR, "sos.center.live")
    forged = make_chunks(live_key, clip[:13], key=OTHER_KEY)  # tok-001's name, another key
    rx = receiver(live_key, tmp_path)
    result = rx.handle(DEVICE, *forged[0])
    assert not result.accepted and "bad signature" in result.reason
    assert [r.message for r in caplog.records] == [
        f"refused live chunk from {DEVICE} (alert {forged[0][1]['alert_id'][:8]}, seq 0): "
        f"{result.reason}"]
    assert list((tmp_path / "live").iterdir()) == []
    assert rx.stats()["refused"] == 1


def test_a_chunk_from_the_wrong_device_is_refused(live_key, clip, tmp_path) -> None:
    rx = receiver(live_key, tmp_path)
    # Signed by tok-002 and naming tok-002, but published on tok-001's topic.
    theirs = make_chunks(live_key, clip[:13], device_id="tok-002", key=OTHER_KEY)
    result = rx.handle(DEVICE, *theirs[0])
    assert not result.accepted and result.reason == "it claims to come from tok-002"
    # tok-002, correctly signed, pushing into the stream of tok-001's alert.
    mine = make_chunks(live_key, clip[:25])
    assert rx.handle(DEVICE, *mine[0]).accepted
    intruder = make_chunks(live_key, clip[:13], device_id="tok-002", key=OTHER_KEY,
                           alert_id=mine[0][1]["alert_id"])
    payload, header = intruder[0]
    result = rx.handle("tok-002", payload, {**header})
    assert not result.accepted and "streams from tok-001" in result.reason
    assert rx.stats()["chunks"] == 1


def test_an_altered_ciphertext_is_refused(live_key, clip, tmp_path) -> None:
    (payload, header), *_ = make_chunks(live_key, clip[:13])
    rx = receiver(live_key, tmp_path)
    altered = payload[:-1] + bytes([payload[-1] ^ 1])
    result = rx.handle(DEVICE, altered, header)
    assert not result.accepted and "not the one the header signs" in result.reason


def test_a_replayed_chunk_is_refused(live_key, clip, tmp_path) -> None:
    chunks = make_chunks(live_key, clip[:25])
    rx = receiver(live_key, tmp_path)
    assert rx.handle(DEVICE, *chunks[0]).accepted
    result = rx.handle(DEVICE, *chunks[0])
    assert not result.accepted and "duplicate or late" in result.reason


def test_a_lost_chunk_leaves_a_playable_stream_with_the_gap_noted(live_key, clip,
                                                                   tmp_path) -> None:
    chunks = make_chunks(live_key, clip)
    rx = receiver(live_key, tmp_path)
    results = [rx.handle(DEVICE, *chunk) for i, chunk in enumerate(chunks) if i != 2]
    assert [r.lost_before for r in results] == [0, 0, 1, 0]
    directory = tmp_path / "live" / chunks[0][1]["alert_id"]
    playlist = (directory / "index.m3u8").read_text()
    assert ("chunk-000001.ts\n# gap: 1 chunk(s) lost before chunk 3\n#EXT-X-DISCONTINUITY\n"
            f"#EXT-X-PROGRAM-DATE-TIME:{chunks[3][1]['first_frame_utc']}\n") in playlist
    assert "chunk-000002.ts" not in playlist and playlist.endswith("#EXT-X-ENDLIST\n")
    assert rx.stats()["lost"] == 1
    assert ffprobe(directory / "live.ts")["nb_read_frames"] == "48"
    assert ffprobe(directory / "index.m3u8")["nb_read_frames"] == "48"


def test_a_stream_whose_final_chunk_never_came_is_ended_by_the_centre(live_key, clip,
                                                                      tmp_path) -> None:
    now = [UTC0.timestamp() + 2.0]
    chunks = make_chunks(live_key, clip)
    rx = receiver(live_key, tmp_path, clock=lambda: now[0])
    for chunk in chunks[:-1]:
        rx.handle(DEVICE, *chunk)
    assert rx.end_idle(10.0) == []
    now[0] += 10.0
    alert_id = chunks[0][1]["alert_id"]
    assert rx.end_idle(10.0) == [alert_id]
    assert (tmp_path / "live" / alert_id / "index.m3u8").read_text().endswith(
        "#EXT-X-ENDLIST\n")
    late = rx.handle(DEVICE, *chunks[-1])
    assert not late.accepted and "has ended" in late.reason


# -- over the real broker --------------------------------------------------------------------------
@pytest.fixture
def live_idle_s() -> float:
    return 60.0


@pytest.fixture
def live_centre(broker, tmp_path, live_idle_s) -> Iterator[tuple[CenterProbe, LiveReceiver]]:
    broker.fleet.ensure_live_key()
    rx = LiveReceiver(broker.fleet.live_identity_file, tmp_path / "live",
                      FleetTrust(broker.fleet))
    store = Store(tmp_path / "center.sqlite")
    probe: CenterProbe
    service = broker.centre_service(store, on_event=lambda e: probe.record(e), live=rx,
                                    live_idle_s=live_idle_s)
    probe = CenterProbe(service, store)
    service.start()
    yield probe, rx
    service.stop()
    store.close()


def live_events(probe: CenterProbe) -> list[dict[str, Any]]:
    return [e.message for e in probe.events if e.kind == "live"]


def test_the_centre_refuses_a_forged_chunk_from_the_broker_and_takes_the_next(
        broker, live_centre, clip) -> None:
    probe, _rx = live_centre
    recipient = broker.fleet.live_recipients()
    client = make_client(DEVICE, broker.identity(DEVICE))
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(broker.centre.host, broker.centre.port)
    client.loop_start()
    try:
        assert connected.wait(10)

        def publish(payload: bytes, header: dict[str, Any]) -> None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = [(LIVE_HEADER_PROPERTY, json.dumps(header))]
            client.publish(Topics(DEVICE).live, payload, qos=0, properties=properties)

        forged = make_chunks(("", recipient[0]), clip[:13], key=OTHER_KEY)
        broker.identity(DEVICE)  # enrolled, with its signing key made
        good = make_chunks(("", recipient[0]), clip[:13],
                           key=load_or_make_key(broker.signing_key_file(DEVICE)))
        publish(*forged[0])
        publish(*good[0])
        probe.wait_for(lambda: len(live_events(probe)) >= 2)
    finally:
        client.disconnect()
        client.loop_stop()
    refused, accepted = live_events(probe)
    assert not refused["accepted"] and "bad signature" in refused["reason"]
    assert accepted["accepted"] and accepted["alert_id"] == good[0][1]["alert_id"]
    assert [e.new for e in probe.events if e.kind == "live"] == [False, True]
    assert probe.store.alerts() == []  # never through the alert path


def test_end_to_end_a_device_streams_an_sos_to_a_playable_file_at_the_centre(
        broker, live_centre, tmp_path) -> None:
    probe, rx = live_centre
    events: queue.Queue = queue.Queue()
    status = encode(MessageKind.STATUS, {"v": 1, "device_id": DEVICE, "state": "online"})
    outbox = Outbox(tmp_path / "outbox.sqlite", signer=device_signer(broker, DEVICE))
    uplink = MqttUplink(DEVICE, broker.identity(DEVICE), outbox, events.put,
                        will_payload=status, status_payload=lambda: status,
                        receipt_keys=broker.centre_keys())
    made: list[dict[str, Any]] = []

    def publish(payload: bytes, header: dict[str, Any]) -> bool:
        made.append(header)
        return uplink.publish_live(Topics(DEVICE).live, payload, header)

    live = LiveStreamer(DEVICE, broker.fleet.live_recipients(), device_signer(broker, DEVICE),
                        publish, chunk_s=0.5, fps=FPS, size=(160, 120))
    camera = SyntheticCamera(DEVICE, size=(320, 240), fps=FPS)
    try:
        uplink.start()
        while not isinstance(events.get(timeout=10), Connected):
            pass
        camera.start(lambda frame: None, live.on_lores)  # the recorder would take on_frame
        alert_id = new_id()
        live.start(alert_id)
        probe.wait_for(lambda: len(live_events(probe)) >= 4)
        live.stop()
        probe.wait_for(lambda: any(m["final"] for m in live_events(probe)))
        assert outbox.pending() == []  # live never goes through the outbox
    finally:
        camera.stop()
        live.close()
        uplink.stop()
        outbox.close()

    received = live_events(probe)
    assert all(m["accepted"] for m in received)
    assert [m["seq"] for m in received] == list(range(len(made)))  # none lost on loopback
    frames = sum(h["frames"] for h in made)
    assert frames == sum(m["frames"] for m in received) >= 4 * 12
    directory = tmp_path / "live" / alert_id
    expected = {"codec_name": "h264", "width": 160, "height": 120,
                "nb_read_frames": str(frames)}
    assert ffprobe(directory / "live.ts") == expected
    assert ffprobe(directory / "index.m3u8") == expected
    stats = rx.stats()
    newest, first = stats["latency_newest_ms"], stats["latency_first_ms"]
    assert newest["n"] == len(made) and 0 < newest["p50"] <= newest["p95"] < 2000
    assert first["p50"] > newest["p50"]
    assert all(m["latency_newest_ms"] is not None for m in received)
    assert live.stats()["chunks_dropped"] == 0


@pytest.mark.parametrize("live_idle_s", [0.0])
def test_a_stream_left_without_its_final_chunk_is_ended_when_a_status_arrives(
        broker, live_centre, clip, tmp_path) -> None:
    """A device that lost power mid-SOS sends no final chunk: the serving centre ends the
    stream (#EXT-X-ENDLIST) on the next device status (here with no idle time allowed)."""
    probe, rx = live_centre
    broker.identity(DEVICE)
    chunks = make_chunks(("", broker.fleet.live_recipients()[0]), clip[:13],
                         key=load_or_make_key(broker.signing_key_file(DEVICE)))
    client = make_client(DEVICE, broker.identity(DEVICE))
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(broker.centre.host, broker.centre.port)
    client.loop_start()
    try:
        assert connected.wait(10)
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [(LIVE_HEADER_PROPERTY, json.dumps(chunks[0][1]))]
        client.publish(Topics(DEVICE).live, chunks[0][0], qos=0, properties=properties)
        probe.wait_for(lambda: len(live_events(probe)) >= 1)
    finally:
        client.disconnect()
        client.loop_stop()
    playlist = rx.stream_dir(chunks[0][1]["alert_id"]) / "index.m3u8"
    assert not playlist.read_text().endswith("#EXT-X-ENDLIST\n")
    status = encode(MessageKind.STATUS, {"v": 1, "device_id": DEVICE, "state": "online"})
    outbox = Outbox(tmp_path / "outbox.sqlite", signer=device_signer(broker, DEVICE))
    uplink = MqttUplink(DEVICE, broker.identity(DEVICE), outbox, lambda event: None,
                        will_payload=status, status_payload=lambda: status,
                        receipt_keys=broker.centre_keys())
    uplink.start()  # its retained status on connect
    try:
        probe.wait_for(lambda: any(e.kind == "status" for e in probe.events))
    finally:
        uplink.stop()
        outbox.close()
    assert playlist.read_text().endswith("#EXT-X-ENDLIST\n")
