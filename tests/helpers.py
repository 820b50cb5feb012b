"""Small builders shared by tests."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol import MessageKind, Topics, encode, new_id
from protocol.mqtt import BrokerConfig, make_client, session_properties
from protocol.signing import Signer, load_or_make_key
from simulator.device_config import render_device_toml
from simulator.gps_receiver import PtyGps, RouteReceiver
from simulator.processes import DeviceProcess, Recorder

NO_POSITION = {"source": "none", "lat": None, "lon": None, "alt_m": None, "accuracy_m": None,
               "fix_time": None, "age_s": None}


def device_signer(broker, device_id: str) -> Signer:
    """The signing key the broker's fleet enrolled for `device_id` (made on first use)."""
    broker.identity(device_id)
    return Signer(load_or_make_key(broker.signing_key_file(device_id)))


def alert_message(device_id: str = "tok-001", seq: int = 1, **overrides: Any) -> dict[str, Any]:
    return {"v": 1, "alert_id": new_id(), "device_id": device_id, "device_kind": "token",
            "seq": seq, "trigger": "button_hold", "created_at": "2026-11-23T10:00:00.000Z",
            "position": NO_POSITION, "battery": {"percent": 80.0, "charging": False},
            **overrides}


def send_alert(broker, device_id: str, **overrides: Any) -> dict[str, Any]:
    """An alert as its device sends it: signed with its enrolled key, published with its own
    certificate through `broker`. Returns the message (the centre stores it soon after)."""
    message = device_signer(broker, device_id).sign(alert_message(device_id, **overrides))
    client = RawClient(broker.identity(device_id), device_id)
    try:
        client.publish(Topics(device_id).alert, encode(MessageKind.ALERT, message))
    finally:
        client.close()
    return message


def raise_alert(rig, device_id: str = "tok-001", **overrides: Any) -> str:
    """`send_alert` to a centre rig (simulator.console_rig.ConsoleRig); its id once stored."""
    alert_id = send_alert(rig.broker, device_id, **overrides)["alert_id"]
    rig.wait_for(lambda: rig.store.alert(alert_id) is not None)
    return alert_id


class RawClient:
    """A bare paho client: publishes, subscribes, and lets a test wait for messages."""

    def __init__(self, broker: BrokerConfig, client_id: str = "raw-test",
                 will: tuple[str, bytes] | None = None, *, persistent: bool = False) -> None:
        """`persistent`: the broker keeps the session (and queues for it) after a disconnect."""
        self.client = make_client(client_id, broker)
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.disconnected = threading.Event()  # set when the broker drops or kicks us
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.on_message = self._on_message
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.connect(broker.host, broker.port, clean_start=not persistent,
                            properties=session_properties() if persistent else None)
        self.client.loop_start()
        assert self._connected.wait(10), "raw client could not connect"

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload)))
            self._cond.notify_all()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10)

    def subscribe_reason(self, topic: str) -> int:
        """SUBSCRIBE one filter and return the SUBACK's reason code (0x87: not authorised)."""
        answer: queue.Queue[int] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, rcs, props: answer.put(rcs[0].value)
        self.client.subscribe(topic, qos=1)
        return answer.get(timeout=10)

    def publish_reason(self, topic: str, payload: bytes) -> int:
        """PUBLISH at QoS 1 and return the PUBACK's reason code (0x87: not authorised)."""
        answer: queue.Queue[int] = queue.Queue()
        self.client.on_publish = lambda c, u, mid, rc, props: answer.put(rc.value)
        self.client.publish(topic, payload, qos=1)
        return answer.get(timeout=10)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)

    def wait_messages(self, n: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.messages) >= n, timeout), \
                f"got {len(self.messages)} of {n} messages"
            return list(self.messages)

    def drop(self) -> None:
        """Vanish without a DISCONNECT, as a crashed device does: the broker sends the will."""
        self.client.loop_stop()
        self.client.socket().close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RecordingProcess:
    """`simulator.recording_process` as a real process (to SIGKILL mid-segment), with a way to
    wait for the lines it prints (`recovered ...`, `committed N`, `stopped`)."""

    def __init__(self, keys: dict[str, Any], directory: Path, segment_s: float = 1.0) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulator.recording_process", "--dir", str(directory),
             "--recipient", keys["recipient"], "--signing-key", str(keys["signing_key"]),
             "--segment-s", str(segment_s)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout],
                         daemon=True).start()

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            if line.startswith(prefix):
                return line


ROUTE = [(52.3781, 4.9000), (52.3730, 4.8928)]


class Device:
    """One virtual token process with a GPS on a real pty, plus its recorded output."""

    def __init__(self, broker, tmp_path: Path, device_id: str = "tok-test-01",
                 profile: str = "token", camera: bool = False,
                 microphone_wav: Path | None = None,
                 voice: dict[str, Any] | None = None) -> None:
        """`microphone_wav`: the device has sound (docs/VOICE.md); `voice`: its [voice] keys."""
        self.id = device_id
        self.recorder = Recorder()
        self.gps = PtyGps(RouteReceiver(ROUTE, start_utc=datetime.now(UTC), seed=3), speed=2.0)
        self.gps.start()
        directory = tmp_path / device_id
        directory.mkdir()
        config = directory / "device.toml"
        surveyed = {"lat": 52.3789, "lon": 4.9003} if profile == "pillar" else None
        config.write_text(render_device_toml(
            device_id=device_id, profile=profile, data_dir=directory / "data", broker=broker,
            gps_port=None if surveyed else self.gps.port, surveyed=surveyed, camera=camera,
            segment_s=1.0, preroll_s=2.0, microphone_wav=microphone_wav, voice=voice))
        self.speaker = directory / "data" / "speaker.wav"  # a pillar's, with sound
        self.recordings = directory / "data" / "recordings"
        self.process = DeviceProcess(device_id, config, directory / "device.log", self.recorder,
                                     battery=90.0)
        self.log_file = directory / "device.log"

    def start(self) -> None:
        runs = self.process.starts
        self.process.start()
        self.wait(lambda es: any(e.kind == "ready" and e.data["run"] == runs + 1 for e in es))

    def wait(self, predicate, timeout: float = 20.0) -> None:
        assert self.recorder.wait_for(predicate, timeout), f"timed out: {self.recorder.entries}"

    def wait_kind(self, kind: str, timeout: float = 20.0, **data) -> None:
        self.wait(lambda es: any(e.kind == kind and all(e.data.get(k) == v
                                                        for k, v in data.items()) for e in es),
                  timeout)

    def feedback(self) -> list[str]:
        return [e.data["state"] for e in self.recorder.find(kind="feedback")]

    def press(self, hold_s: float, seed: int = 1, gap_s: float = 0.0) -> None:
        self.process.send({"op": "press", "hold_s": hold_s, "seed": seed, "gap_s": gap_s})

    def close(self) -> None:
        self.process.stop()
        self.gps.stop()
