"""Live view, device side: the synthetic camera's lores stream, LiveStreamer's chunks (pure core,
driven frame by frame with a fake clock), the uplink's live publish over a real Mosquitto, the
ACL, the fleet's live key and stock `age` on a chunk."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import stat
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from typing import Any

import av
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center.fleet import Fleet, age_x25519_keypair
from evidence_format.age_stream import decrypt, parse_identities
from firmware.camera.frames import EncodedFrame, starts_stream
from firmware.camera.live import LiveStreamer
from firmware.camera.synthetic import SyntheticCamera, encode_clip
from firmware.uplink.mqtt import Connected, MqttUplink
from firmware.uplink.outbox import Outbox
from protocol import MessageKind, Topics, encode, new_id
from protocol.mqtt import make_client
from protocol.signing import Signer, verify
from protocol.topics import LIVE_HEADER_PROPERTY
from tests.helpers import device_signer

DEVICE = "tok-001"
FPS = 25
UTC0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
LORES = (160, 120)
SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # fixed: reproducible


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    """(identity, recipient): a live key pair for the pure tests."""
    return age_x25519_keypair()


@pytest.fixture(scope="module")
def clip() -> list[EncodedFrame]:
    """4 s of lores video at 25 fps, a keyframe every 12 frames (0.48 s), pts from 100.0 s."""
    return encode_clip(DEVICE, 100, size=LORES, fps=FPS, bitrate=200_000, gop_s=0.5, t0=100.0,
                       utc0=UTC0)


class Sent:
    """An injected publish that keeps what it is given."""

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, dict[str, Any]]] = []

    def __call__(self, payload: bytes, header: dict[str, Any]) -> bool:
        self.chunks.append((payload, header))
        return True


def streamer(keys: tuple[str, str], publish, **kwargs: Any) -> LiveStreamer:
    """A LiveStreamer on a fixed clock; no thread unless asked (the test calls pump())."""
    kwargs.setdefault("threaded", False)
    kwargs.setdefault("max_pending", 16)
    return LiveStreamer(DEVICE, [keys[1]], Signer(SIGNING_KEY), publish,
                        kwargs.pop("chunk_s", 0.5), clock=lambda: 1000.0, fps=FPS, size=LORES,
                        **kwargs)


def plaintext(keys: tuple[str, str], payload: bytes) -> bytes:
    return b"".join(decrypt(BytesIO(payload), parse_identities(keys[0])))


def decoded_frames(ts: bytes) -> list[float]:
    """pts (s) of every frame PyAV decodes from an MPEG-TS byte string."""
    with av.open(BytesIO(ts), format="mpegts") as container:
        stream = container.streams.video[0]
        return [float(f.pts * stream.time_base) for f in container.decode(stream)]


# -- the synthetic camera's lores stream -----------------------------------------------------------
def test_the_synthetic_camera_runs_a_lores_stream_beside_the_main_one() -> None:
    main: list[EncodedFrame] = []
    lores: list[EncodedFrame] = []
    enough = threading.Event()

    def on_lores(frame: EncodedFrame) -> None:
        lores.append(frame)
        if len(lores) >= 30:
            enough.set()

    camera = SyntheticCamera(DEVICE, size=(320, 240), fps=FPS)
    assert camera.lores_size == LORES  # half the main size by default
    camera.start(main.append, on_lores)
    try:
        assert enough.wait(15), f"only {len(lores)} lores frames"
    finally:
        camera.stop()
    keyframes = [i for i, f in enumerate(lores) if f.keyframe]
    assert keyframes[:3] == [0, 12, 24]  # a 0.5 s GOP at 25 fps, rounded: 12 frames
    assert all(starts_stream(lores[i].data) for i in keyframes)
    # Same instants as the main stream's frames of the same index.
    for small, big in zip(lores, main, strict=False):
        assert (small.pts_s, small.utc) == (big.pts_s, big.utc)
    with av.open(BytesIO(b"".join(f.data for f in lores[:12])), format="h264") as container:
        picture = next(container.decode(video=0))
    assert (picture.width, picture.height) == LORES
    assert camera.lores_frames_delivered == len(lores)


# -- LiveStreamer: the pure core -------------------------------------------------------------------
def test_chunks_are_cut_at_keyframes_with_the_expected_duration(keys, clip) -> None:
    sent = Sent()
    live = streamer(keys, sent)
    alert_id = new_id()
    live.start(alert_id)
    for frame in clip[:60]:  # keyframes at 0, 12, 24, 36, 48
        live.on_lores(frame)
    live.stop()
    live.pump()

    headers = [h for _, h in sent.chunks]
    assert [h["seq"] for h in headers] == [0, 1, 2, 3, 4]
    assert [h["frames"] for h in headers] == [12, 12, 12, 12, 12]
    assert [h["final"] for h in headers] == [False] * 4 + [True]
    assert all(h["duration_s"] == pytest.approx(0.48) for h in headers)
    assert [h["first_frame_utc"] for h in headers] == [
        (UTC0 + timedelta(seconds=12 * k / FPS)).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z") for k in range(5)]
    assert headers[0]["first_frame_mono"] == pytest.approx(100.0)
    assert headers[0]["last_frame_mono"] == pytest.approx(100.0 + 11 / FPS)
    assert all(h["alert_id"] == alert_id and h["device_id"] == DEVICE for h in headers)
    assert all(h["ready_mono"] == 1000.0 for h in headers)  # the injected clock

    all_pts: list[float] = []
    for payload, header in sent.chunks:
        verify(header, [SIGNING_KEY.public_key()])
        assert header["ciphertext_sha256"] == hashlib.sha256(payload).hexdigest()
        assert header["ciphertext_bytes"] == len(payload)
        ts = plaintext(keys, payload)
        assert ts[0] == 0x47 and len(ts) % 188 == 0
        pts = decoded_frames(ts)  # each chunk decodes on its own...
        assert len(pts) == 12
        all_pts += pts
    # ... and the timestamps run on across chunks: one continuous stream.
    steps = {round(b - a, 6) for a, b in itertools.pairwise(all_pts)}
    assert steps == {round(1 / FPS, 6)}


def test_start_and_stop_bound_the_stream_to_the_sos(keys, clip) -> None:
    sent = Sent()
    live = streamer(keys, sent)
    for frame in clip[:30]:  # before the SOS: nothing
        live.on_lores(frame)
    live.start(new_id())
    for frame in clip[30:78]:  # frames 30..35 wait for the keyframe at 36
        live.on_lores(frame)
    live.stop()
    for frame in clip[78:]:  # after the SOS: nothing
        live.on_lores(frame)
    live.pump()

    headers = [h for _, h in sent.chunks]
    assert sum(h["frames"] for h in headers) == 78 - 36
    assert headers[0]["first_frame_mono"] == pytest.approx(clip[36].pts_s)
    assert headers[-1]["last_frame_mono"] == pytest.approx(clip[77].pts_s)
    assert headers[-1]["final"] and not any(h["final"] for h in headers[:-1])
    assert live.frames_skipped == 6
    # The next SOS is a new stream: its own alert id, seq from 0.
    second = new_id()
    live.start(second)
    for frame in clip[84:]:
        live.on_lores(frame)
    live.stop()
    live.pump()
    assert [(h["alert_id"], h["seq"]) for h in (h for _, h in sent.chunks[len(headers):])] == [
        (second, 0), (second, 1)]


def test_a_stuck_publisher_drops_whole_old_chunks_and_memory_stays_bounded(keys, clip) -> None:
    entered = threading.Event()
    release = threading.Event()
    published: list[int] = []

    def stuck(payload: bytes, header: dict[str, Any]) -> bool:
        entered.set()
        assert release.wait(30)
        published.append(header["seq"])
        return True

    live = streamer(keys, stuck, threaded=True, max_pending=2)
    try:
        live.start(new_id())
        for frame in clip[:13]:  # chunk 0 is made at frame 12 and the publisher takes it
            live.on_lores(frame)
        assert entered.wait(10)
        high_water = 0

        def camera() -> None:  # the camera thread must never block on a stuck link
            nonlocal high_water
            for frame in clip[13:]:
                live.on_lores(frame)
                high_water = max(high_water, live.pending)

        feeder = threading.Thread(target=camera)
        feeder.start()
        feeder.join(15)
        assert not feeder.is_alive(), "on_lores blocked behind the publisher"
        made = live.chunks_made  # 0..7 (keyframes at 12, 24, ... 96)
        assert made == 8
        assert high_water == 2 and live.pending == 2
        assert live.chunks_dropped == made - 1 - 2  # all but the one in flight and the newest 2
        assert live.pending_bytes < 2 * 64 * 1024
        release.set()
        assert live.wait_idle(10)
        assert published == [0, made - 2, made - 1]  # whole chunks, the oldest dropped
    finally:
        release.set()
        live.close()


def test_a_chunk_without_a_keyframe_in_sight_is_sent_and_the_next_waits_for_one(keys) -> None:
    """A source whose GOP is longer than max_chunk_s cannot grow the open chunk without bound."""
    frames = encode_clip(DEVICE, 50, size=LORES, fps=FPS, bitrate=200_000, gop_s=1.6, t0=0.0,
                         utc0=UTC0)  # keyframes at 0 and 40
    sent = Sent()
    live = streamer(keys, sent, chunk_s=0.5, max_chunk_s=1.0)
    live.start(new_id())
    for frame in frames:
        live.on_lores(frame)
    live.stop()
    live.pump()
    headers = [h for _, h in sent.chunks]
    assert [h["frames"] for h in headers] == [25, 10]  # 0..24, then from the keyframe at 40
    assert headers[0]["duration_s"] == pytest.approx(1.0)
    assert live.frames_skipped == 15  # 25..39


# -- transport -------------------------------------------------------------------------------------
class Subscriber:
    """The centre's identity, subscribed to every device's live topic; keeps whole messages."""

    def __init__(self, broker) -> None:
        self.messages: queue.Queue = queue.Queue()
        subscribed = threading.Event()
        self.client = make_client("live-watch", broker.centre)
        self.client.on_connect = lambda c, *a: c.subscribe("sos/v1/dev/+/live", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.connect(broker.centre.host, broker.centre.port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def uplink(broker, tmp_path) -> Iterator[tuple[MqttUplink, queue.Queue, Outbox]]:
    events: queue.Queue = queue.Queue()
    status = encode(MessageKind.STATUS, {"v": 1, "device_id": DEVICE, "state": "online"})
    outbox = Outbox(tmp_path / "outbox.sqlite", signer=device_signer(broker, DEVICE))
    link = MqttUplink(DEVICE, broker.identity(DEVICE), outbox, events.put,
                      will_payload=status, status_payload=lambda: status,
                        receipt_keys=broker.centre_keys())
    yield link, events, outbox
    link.stop()
    outbox.close()


def test_publish_live_is_qos0_with_the_header_in_a_user_property_and_never_in_the_outbox(
        broker, uplink) -> None:
    link, events, outbox = uplink
    header = {"v": 1, "seq": 0, "alert_id": new_id(), "sig": "x"}
    assert link.publish_live(Topics(DEVICE).live, b"age payload", header) is False  # offline
    watcher = Subscriber(broker)
    try:
        link.start()
        while not isinstance(events.get(timeout=10), Connected):
            pass
        assert link.publish_live(Topics(DEVICE).live, b"age payload", header) is True
        message = watcher.messages.get(timeout=10)
    finally:
        watcher.close()
    assert message.topic == Topics(DEVICE).live
    assert message.qos == 0 and not message.retain
    assert bytes(message.payload) == b"age payload"
    (name, value), = message.properties.UserProperty
    assert name == LIVE_HEADER_PROPERTY
    assert value == f'{{"alert_id":"{header["alert_id"]}","seq":0,"sig":"x","v":1}}'
    assert outbox.pending() == []


def test_the_acl_lets_a_device_write_only_its_own_live_topic(broker) -> None:
    results: queue.Queue = queue.Queue()
    connected = threading.Event()
    client = make_client(DEVICE, broker.identity(DEVICE))
    client.on_connect = lambda *a: connected.set()
    client.on_publish = lambda c, u, mid, rc, props: results.put(rc.value)
    client.connect(broker.centre.host, broker.centre.port)
    client.loop_start()
    try:
        assert connected.wait(10)
        client.publish(Topics(DEVICE).live, b"x", qos=1)  # QoS 1 only to read the PUBACK
        assert results.get(timeout=10) < 0x80
        client.publish(Topics("tok-002").live, b"x", qos=1)
        assert results.get(timeout=10) == 135  # Not authorized
    finally:
        client.disconnect()
        client.loop_stop()


# -- keys ------------------------------------------------------------------------------------------
def test_the_fleet_makes_a_separate_live_key_once(tmp_path) -> None:
    fleet = Fleet.create(tmp_path / "fleet")
    assert fleet.live_recipients() == []
    recipient = fleet.ensure_live_key()
    assert fleet.ensure_live_key() == recipient  # idempotent
    assert fleet.live_recipients() == [recipient]
    assert stat.S_IMODE(os.stat(fleet.live_identity_file).st_mode) == 0o600
    assert fleet.ensure_evidence_key() != recipient  # not the (offline) evidence key
    assert Fleet(fleet.directory).live_recipients() == [recipient]


def test_stock_age_decrypts_a_chunk_with_the_live_identity(tmp_path, clip) -> None:
    fleet = Fleet.create(tmp_path / "fleet")
    recipient = fleet.ensure_live_key()
    sent = Sent()
    identity = fleet.live_identity_file.read_text().split("\n")[2]
    live = streamer((identity, recipient), sent)
    live.start(new_id())
    for frame in clip[:13]:
        live.on_lores(frame)
    live.pump()
    (payload, _header), = sent.chunks
    (tmp_path / "chunk.ts.age").write_bytes(payload)
    subprocess.run(["age", "-d", "-i", str(fleet.live_identity_file), "-o",
                    str(tmp_path / "chunk.ts"), str(tmp_path / "chunk.ts.age")], check=True,
                   timeout=30)
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                            "-show_entries", "stream=nb_read_frames,width,height", "-of",
                            "json", str(tmp_path / "chunk.ts")], check=True,
                           capture_output=True, text=True, timeout=30)
    (stream,) = json.loads(probe.stdout)["streams"]
    assert stream == {"width": 160, "height": 120, "nb_read_frames": "12"}
