"""Disk full, end to end: a real device runtime recording onto a real, nearly full filesystem.

The card is a small tmpfs mounted for the test (the kernel's own free space and ENOSPC, no
mocks), with a filler file leaving a little room. The device records with the synthetic camera,
talks to the real broker and centre over mutual TLS, and decides with the real space planner.
What must hold (firmware/camera/space.py, docs/EVIDENCE.md):

- when ordinary recording fills the card, ordinary recording stops and the centre receives a
  `storage_alert` event from that device;
- during an SOS, evidence keeps being recorded while room remains (room is made by deleting
  uploaded segments first, then ordinary ones that were not uploaded);
- no evidence segment that was not uploaded is ever deleted, and what is left verifies.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from control_center.evidence import keys_from_fleet, verify_directory
from firmware.camera.space import SpaceLimits
from firmware.camera.store import SegmentStore
from firmware.camera.synthetic import SyntheticCamera
from firmware.config import load_device_config
from firmware.device import DeviceRuntime
from simulator.device_config import render_device_toml
from simulator.gps_receiver import PtyGps, RouteReceiver
from simulator.virtual_button import play, sequence_pattern

KiB = 2**10
MiB = 2**20
DEVICE = "tok-full-01"
CARD_MB = 8
# About 45 KB of video a second (320x240 test pattern), one-second segments. The limits are
# the defaults scaled down; min_write covers a few segments plus the SQLite journals, so the
# card is "full" for the planner before the kernel says ENOSPC.
LIMITS = SpaceLimits(low_water=320 * KiB, high_water=384 * KiB, reserve=256 * KiB,
                     min_write=128 * KiB)
ROOM_FOR_ORDINARY = 192 * KiB  # recorded above the reserve before ordinary recording stops


@pytest.fixture
def card(tmp_path: Path):
    """A real small filesystem as the device's data directory."""
    mount = tmp_path / "card"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={CARD_MB}m", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test (needs root): "
                    f"{done.stderr.strip()}")
    yield mount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)  # never leak the mount


def fill(card: Path, leave: int) -> None:
    """A filler file that leaves about `leave` bytes free on the card."""
    free = shutil.disk_usage(card).free
    with open(card / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
        f.flush()
        os.fsync(f.fileno())


class Seen:
    """What the device reports (observer) and what its store deletes, waitable."""

    def __init__(self, recordings: Path) -> None:
        self.recordings = recordings
        self.changed = threading.Condition()
        self.link_up = False
        self.committed: dict[int, dict[str, Any]] = {}  # seq -> manifest, read at commit time
        self.deleted: list[tuple[int, bool, bool]] = []  # (seq, evidence, uploaded) at deletion
        self.frames = 0  # delivered by the camera

    def frame(self) -> None:
        with self.changed:
            self.frames += 1
            self.changed.notify_all()

    def observe(self, name: str, fields: dict[str, Any]) -> None:
        with self.changed:
            if name == "link":
                self.link_up = fields["up"]
            if name == "segment":
                # The device thread reports the commit before it plans space (and deletes), so
                # the manifest is still there: what the device signed for this seq.
                seq = fields["seq"]
                self.committed[seq] = json.loads((self.recordings / f"{seq:06d}.json")
                                                 .read_text())
            self.changed.notify_all()

    def wait(self, predicate, timeout: float = 15.0) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), f"timed out: {predicate}"


class TappedCamera(SyntheticCamera):
    """The synthetic camera, telling `seen` of each frame after the device has taken it."""

    def __init__(self, seen: Seen, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = seen

    def start(self, on_frame, on_lores=None) -> None:
        def deliver(frame) -> None:
            try:
                on_frame(frame)
            finally:
                self.seen.frame()

        super().start(deliver, on_lores)


def storage_alerts(center) -> list[dict[str, Any]]:
    return [e.message for e in list(center.events)
            if e.kind == "event" and e.device_id == DEVICE
            and e.message["type"] == "storage_alert"]


def files_of(recordings: Path, seq: int) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(recordings.glob(f"{seq:06d}.*"))}


@pytest.fixture
def gps():
    receiver = PtyGps(RouteReceiver([(52.3781, 4.9000), (52.3730, 4.8928)],
                                    start_utc=datetime.now(UTC), seed=5), speed=2.0)
    receiver.start()
    yield receiver
    receiver.stop()


def test_a_full_card_alerts_the_centre_stops_ordinary_recording_and_keeps_evidence(
        broker, center, card, gps, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "sos.device")
    config_file = tmp_path / "device.toml"
    config_file.write_text(render_device_toml(
        device_id=DEVICE, profile="token", data_dir=card, broker=broker, gps_port=gps.port,
        camera=True, segment_s=1.0, preroll_s=1.0, heartbeat_s=60.0))
    config = load_device_config(config_file)
    recordings = card / "recordings"
    seen = Seen(recordings)
    factory = MockFactory()
    camera = TappedCamera(seen, DEVICE, size=config.camera.size, fps=config.camera.fps,
                          bitrate=4_000_000, gop_s=0.5)
    runtime = DeviceRuntime(config, pin_factory=factory, observer=seen.observe,
                            camera_source=camera, space_limits=LIMITS)
    store = runtime.recorder.store
    deleting = store.delete

    def spy_delete(seq: int) -> None:  # records what each deletion took, then deletes
        (row,) = [s for s in store.segments() if s.seq == seq]
        seen.deleted.append((seq, row.evidence, row.uploaded))
        deleting(seq)

    store.delete = spy_delete
    fill(card, LIMITS.reserve + ROOM_FOR_ORDINARY)
    stop = threading.Event()
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            runtime.run(stop)
        except BaseException as exc:  # the test fails on it below
            crashed.append(exc)

    thread = threading.Thread(target=run, name="device")
    thread.start()
    try:
        try:
            seen.wait(lambda: seen.link_up)

            # 1. Dispatch starts a call: ordinary recording, until the card is low.
            center.service.send_call(DEVICE, "call_start", "dispatch", call_id="call-full-1")
            center.wait_for(lambda: storage_alerts(center), timeout=30)
            (low,) = storage_alerts(center)
            assert low["storage"]["mode"] == "evidence_only", low
            assert "ordinary recording stopped" in low["reason"]
            assert low["storage"]["deleted_unuploaded"] == 0
            ordinary = dict(seen.committed)
            assert len(ordinary) >= 3 and all(m["flags"] == [] for m in ordinary.values())
            assert not runtime.recorder.policy.should_record()
            frames = seen.frames  # a second of frames later, nothing new is recorded
            seen.wait(lambda: seen.frames >= frames + config.camera.fps)
            assert seen.committed.keys() == ordinary.keys()
            assert not list(recordings.glob("*.part")) and seen.deleted == []

            # The centre confirms the oldest ordinary segment (an upload receipt).
            first = min(ordinary)
            store.mark_uploaded(first)
            before = {s.seq: s for s in store.segments()}
            before_files = {seq: files_of(recordings, seq) for seq in before}

            # 2. An SOS: evidence is recorded while there is room, until the card is full.
            pin = factory.pin(config.button.pin)
            play(pin, sequence_pattern(random.Random(1), [(0.0, 1.7)]),
                 pull_up=config.button.pull_up, wait=stop.wait)
            alert = center.wait_for(lambda: next(iter(center.store.alerts()), None))
            assert alert.device_id == DEVICE
            center.wait_for(lambda: storage_alerts(center)[-1]["storage"]["mode"] == "full",
                            timeout=30)
            assert not runtime.recorder.policy.should_record()
        finally:
            stop.set()
            thread.join(timeout=20)
        assert not thread.is_alive() and not crashed, crashed

        evidence = {seq: m for seq, m in seen.committed.items() if seq not in ordinary}
        assert len(evidence) >= 3 and all("evidence" in m["flags"] for m in evidence.values())
        alerts = storage_alerts(center)
        assert alerts[-1]["storage"]["free_mb"] * MiB < LIMITS.reserve  # recorded below it
        # What went: the uploaded segment first, then ordinary footage that was not uploaded
        # (rule 3, reported to the centre), never evidence that was not uploaded.
        assert seen.deleted[0] == (first, False, True)
        assert all(not evidence or uploaded for _, evidence, uploaded in seen.deleted)
        ordinary_lost = [seq for seq, evidence, uploaded in seen.deleted if not uploaded]
        assert sum(a["storage"]["deleted_unuploaded"] for a in alerts) == len(ordinary_lost)
        reopened = SegmentStore(recordings)  # the runtime closed its index when it stopped
        after = {s.seq: s for s in reopened.segments()}
        reopened.close()
        for seq in evidence:
            assert seq in after and after[seq].evidence and not after[seq].uploaded
        for seq, row in before.items():  # all that was kept is byte for byte what it was
            if seq in after:
                assert files_of(recordings, seq) == before_files[seq]
            else:
                assert not row.evidence and seq in [d[0] for d in seen.deleted]
        assert not list(recordings.glob("*.part"))
        report = verify_directory(recordings, keys_from_fleet(broker.fleet.directory))
        assert {f.kind for f in report.errors} <= {"gap"}, report.findings  # deleted ordinary
        assert all(not manifest.get("cut") for manifest in seen.committed.values())
        assert "No space left" not in caplog.text
    finally:
        store.close()  # idempotent: for a run that failed before the runtime stopped
