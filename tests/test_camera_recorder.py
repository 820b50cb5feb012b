"""Recording end to end, with the stock tools a court expert would use, and SIGKILL mid-segment."""

from __future__ import annotations

import errno
import json
import queue
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from control_center.evidence import keys_from_pubkey_file, verify_directory
from control_center.fleet import age_x25519_keypair
from evidence_format import minisign
from evidence_format.age_stream import decrypt_salvage, parse_identities
from firmware.camera.recorder import SegmentRecorder
from firmware.camera.recording import RecordingPolicy
from firmware.camera.store import SegmentStore
from firmware.camera.synthetic import SyntheticCamera, encode_clip
from protocol.signing import load_or_make_key
from tests.helpers import RecordingProcess


@pytest.fixture
def keys(tmp_path: Path):
    identity, recipient = age_x25519_keypair()
    identity_file = tmp_path / "centre-identity.txt"
    identity_file.write_text(identity + "\n")
    signing_key_file = tmp_path / "device-signing.key"
    pub = tmp_path / "device.pub"
    pub.write_text(minisign.public_key_file(load_or_make_key(signing_key_file).public_key()))
    return {"identity": identity_file, "recipient": recipient, "signing_key": signing_key_file,
            "pub": pub}


def ffprobe_frames(path: Path) -> int:
    done = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                           "-show_entries", "stream=codec_name,nb_read_frames", "-of", "json",
                           str(path)], capture_output=True, text=True, check=True)
    (stream,) = json.loads(done.stdout)["streams"]
    assert stream["codec_name"] == "h264"
    return int(stream["nb_read_frames"])


def test_a_recorded_call_verifies_decrypts_with_age_and_plays(keys, tmp_path) -> None:
    cards = tmp_path / "card"
    committed: queue.Queue[int] = queue.Queue()
    policy = RecordingPolicy(preroll_s=1.0)
    recorder = SegmentRecorder(
        SegmentStore(cards), device_id="tok-rec-01", recipients=[keys["recipient"]],
        signing_key=load_or_make_key(keys["signing_key"]), fps=20, size=(320, 240),
        policy=policy, segment_s=1.0, on_commit=committed.put)
    camera = SyntheticCamera("tok-rec-01", size=(320, 240), fps=20, gop_s=0.5)
    camera.start(recorder.on_frame)
    try:
        recorder.change(lambda p: p.call_start("call-17"))
        committed.get(timeout=20)
        recorder.change(lambda p: p.sos_start("a" * 32, at_s=time.monotonic()))
        committed.get(timeout=20)
        recorder.change(lambda p: (p.call_end(), p.sos_end("a" * 32, at_s=time.monotonic())))
    finally:
        camera.stop()
    report = verify_directory(cards, keys_from_pubkey_file(keys["pub"]))
    assert report.ok, report.summary()
    manifests = [json.loads(p.read_text()) for p in sorted(cards.glob("*.json"))]
    assert len(manifests) >= 3 and all(m["call_id"] == "call-17" for m in manifests)
    assert any("evidence" in m["flags"] for m in manifests)
    first = cards / manifests[0]["file"]
    out = tmp_path / "first.ts"
    subprocess.run(["age", "-d", "-i", str(keys["identity"]), "-o", str(out), str(first)],
                   check=True)
    assert ffprobe_frames(out) == manifests[0]["frames"]
    sig = first.with_suffix("").with_suffix(".json.minisig")
    subprocess.run(["minisign", "-V", "-p", str(keys["pub"]), "-m",
                    str(first.with_suffix("").with_suffix(".json")), "-x", str(sig)], check=True,
                   capture_output=True)


def crash_many_times(keys, directory: Path, kills: int, seed: int) -> list[int]:
    """Kill the recorder at random moments `kills` times; returns the seqs recovery closed."""
    rng = random.Random(seed)
    recovered: list[int] = []
    for _ in range(kills):
        process = RecordingProcess(keys, directory)
        recovered += [int(s) for s in process.expect("recovered").split()[1:]]
        process.expect("committed")  # at least one segment closed in this life
        threading.Event().wait(rng.uniform(0.05, 1.2))  # the stimulus: kill at a random moment
        process.proc.kill()
        process.proc.wait()
    last = RecordingProcess(keys, directory)
    recovered += [int(s) for s in last.expect("recovered").split()[1:]]
    last.expect("committed")
    last.proc.terminate()
    last.expect("stopped")
    last.proc.wait()
    return recovered


def check_after_crashes(keys, directory: Path, recovered: list[int]) -> None:
    report = verify_directory(directory, keys_from_pubkey_file(keys["pub"]))
    assert report.ok, report.summary()  # every closed segment verifies; the chain is unbroken
    for seq in recovered:  # the cut is visible exactly where it happened
        manifest = json.loads((directory / f"{seq:06d}.json").read_text())
        assert manifest["cut"] == {"reason": "crash-recovery", "truncated": True}
        data = (directory / manifest["file"]).open("rb")
        identity = parse_identities(keys["identity"].read_text())[0]
        plaintext, salvage = decrypt_salvage(data, identity)
        assert not salvage.complete  # decrypts up to its last complete chunk, and says so
        assert len(plaintext) == salvage.bytes


def test_a_recorder_killed_at_random_moments_loses_no_closed_segment(keys, tmp_path) -> None:
    directory = tmp_path / "card"
    recovered = crash_many_times(keys, directory, kills=5, seed=3)  # 50: make soak
    assert recovered, "no kill landed inside a segment: the test proved nothing"
    check_after_crashes(keys, directory, recovered)


@pytest.mark.slow
def test_soak_fifty_kills(keys, tmp_path) -> None:
    directory = tmp_path / "card"
    recovered = crash_many_times(keys, directory, kills=50, seed=11)
    check_after_crashes(keys, directory, recovered)


class CardFullOnce(SegmentStore):
    """The real store, whose first commit fails as a full card does (after the data reached
    the file, before its manifest could be written)."""

    failed = False

    def commit(self, seq, segment, **kwargs) -> None:
        if not self.failed:
            self.failed = True
            segment.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        super().commit(seq, segment, **kwargs)


def test_a_failed_commit_becomes_a_cut_segment_and_recording_goes_on(keys, tmp_path) -> None:
    cards = tmp_path / "card"
    policy = RecordingPolicy(preroll_s=0.0)
    policy.call_start("call-full")
    recorder = SegmentRecorder(
        CardFullOnce(cards), device_id="tok-rec-01", recipients=[keys["recipient"]],
        signing_key=load_or_make_key(keys["signing_key"]), fps=20, size=(320, 240),
        policy=policy, segment_s=1.0)
    recorder.update()
    failures = 0
    for frame in encode_clip("tok-rec-01", 100, size=(320, 240), fps=20, gop_s=0.5):
        try:
            recorder.on_frame(frame)
        except OSError:
            failures += 1
    recorder.close()
    assert failures == 1  # reported once, to the caller that plans the space
    manifests = {int(p.name[:6]): json.loads(p.read_text()) for p in cards.glob("*.json")}
    assert manifests[1]["cut"] == {"reason": "crash-recovery", "truncated": True}
    assert len(manifests) >= 4 and all(not m["cut"] for seq, m in manifests.items() if seq > 1)
    report = verify_directory(cards, keys_from_pubkey_file(keys["pub"]))
    assert report.ok, report.summary()  # the chain goes on through the cut segment
