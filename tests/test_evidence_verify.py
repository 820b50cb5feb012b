"""`sos-evidence` on real segment directories: stock age, minisign and ffprobe, PyAV video."""

from __future__ import annotations

import fractions
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import av
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center.audit import AuditLog
from control_center.evidence_cli import INCOMPLETE, main
from control_center.fleet import Fleet
from evidence_format import minisign
from evidence_format.manifest import build_manifest, manifest_sha256, sign_manifest
from protocol.signing import load_or_make_key

DEVICE = "tok-amb-0412"
CALL = "call-17"
CALLS = {1: None, 2: CALL, 3: CALL, 4: CALL, 5: None}  # seq -> call id
FRAMES = 5  # per segment, at 10 fps
POINTS = 2  # GPS points per segment
HINTS = {"age": "apt-get install age", "age-keygen": "apt-get install age",
         "minisign": "apt-get install minisign", "ffprobe": "apt-get install ffmpeg"}


def tool(name: str) -> str:
    """The stock tool's path; a missing tool fails the test (it is what we claim to match)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed and these tests need it: {HINTS[name]}")
    return path


def run(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([str(a) for a in args], input=stdin, capture_output=True, timeout=20,
                          check=False)
    return done


def tiny_ts(first_frame: int) -> bytes:
    """A real MPEG-TS (H.264, 64x64) whose timestamps continue from the previous segment's."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i in range(first_frame, first_frame + FRAMES):
            frame = av.VideoFrame(64, 64, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes([i * 20 % 256]) * plane.buffer_size)
            frame.pts, frame.time_base = i, fractions.Fraction(1, 10)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@dataclass
class Device:
    """A device's key material and what it recorded."""

    key: Ed25519PrivateKey
    pubkey: Path  # minisign public key file
    identity: Path  # the centre's age identity
    recipient: str
    plaintexts: dict[int, bytes]


def record_chain(directory: Path, device: Device, *, cuts: dict[int, dict] | None = None) -> None:
    """Five chained, signed, age-encrypted segments, as the device writes them."""
    directory.mkdir(parents=True)
    prev = None
    for seq, call_id in CALLS.items():
        ciphertext = run(tool("age"), "-r", device.recipient, stdin=device.plaintexts[seq])
        assert ciphertext.returncode == 0, ciphertext.stderr
        (directory / f"{seq:06d}.ts.age").write_bytes(ciphertext.stdout)
        minute = f"2024-05-01T10:{seq:02d}"
        m = build_manifest(
            device_id=DEVICE, seq=seq, start_utc=f"{minute}:00.000Z", end_utc=f"{minute}:00.500Z",
            start_mono=100.0 + seq, end_mono=100.5 + seq, frames=FRAMES,
            gps_track=[{"lat": 52.5 + seq / 1000, "lon": 13.4 + i / 1000, "alt_m": 30.0,
                        "utc": f"{minute}:0{i}.000Z"} for i in range(POINTS)],
            call_id=call_id, flags=["evidence", "sos"] if call_id else [],
            ciphertext_sha256=hashlib.sha256(ciphertext.stdout).hexdigest(),
            ciphertext_bytes=len(ciphertext.stdout), prev_manifest_sha256=prev,
            cut=(cuts or {}).get(seq))
        data, signature = sign_manifest(m, device.key)
        (directory / f"{seq:06d}.json").write_bytes(data)
        (directory / f"{seq:06d}.json.minisig").write_bytes(signature)
        prev = manifest_sha256(m)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Device:
    root = tmp_path_factory.mktemp("device")
    made = run(tool("age-keygen"), "-o", root / "identity.txt")
    assert made.returncode == 0, made.stderr
    recipient = run(tool("age-keygen"), "-y", root / "identity.txt").stdout.decode().strip()
    key = Ed25519PrivateKey.generate()
    (root / "device.pub").write_text(minisign.public_key_file(key.public_key()))
    plaintexts = {seq: tiny_ts((seq - 1) * FRAMES) for seq in CALLS}
    return Device(key, root / "device.pub", root / "identity.txt", recipient, plaintexts)


@pytest.fixture(scope="module")
def recorded(device: Device, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("recorded") / "segments"
    record_chain(directory, device)
    return directory


@pytest.fixture
def segments(recorded: Path, tmp_path: Path) -> Path:
    """A fresh copy of the recorded directory, for a test to tamper with."""
    return Path(shutil.copytree(recorded, tmp_path / "segments"))


def verify(capsys: pytest.CaptureFixture[str], directory: Path, *trust: str | Path
           ) -> tuple[int, list[str]]:
    status = main(["verify", str(directory), *(str(t) for t in trust)])
    return status, capsys.readouterr().out.splitlines()


def error_kinds(lines: list[str]) -> list[str]:
    return sorted(line.split()[1].rstrip(":") for line in lines if line.startswith("ERROR"))


# -- verify --------------------------------------------------------------------------------------
def test_a_clean_chain_verifies(segments: Path, device: Device,
                                capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = verify(capsys, segments, "--pubkey", device.pubkey)
    assert status == 0, lines
    assert lines == [f"VERIFIED: {segments}: {DEVICE}, 5 segment(s), seq 1-5, "
                     "2024-05-01T10:01:00.000Z to 2024-05-01T10:05:00.500Z; "
                     "0 error(s), 0 note(s)"]


def test_the_stock_tools_check_a_segment_by_hand(segments: Path, device: Device) -> None:
    """What docs/EVIDENCE.md tells an expert witness to run, without our code."""
    checked = run(tool("minisign"), "-V", "-p", device.pubkey, "-m", segments / "000003.json")
    assert checked.returncode == 0, checked.stderr
    manifest = json.loads((segments / "000003.json").read_bytes())
    digest = run("sha256sum", segments / "000003.ts.age").stdout.split()[0].decode()
    assert digest == manifest["ciphertext_sha256"]
    prev = run("sha256sum", segments / "000002.json").stdout.split()[0].decode()
    assert prev == manifest["prev_manifest_sha256"]
    plain = run(tool("age"), "-d", "-i", device.identity, segments / "000003.ts.age")
    assert plain.stdout == device.plaintexts[3]


def flip_byte(d: Path) -> None:
    data = bytearray((d / "000003.ts.age").read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / "000003.ts.age").write_bytes(bytes(data))


def delete_segment(d: Path) -> None:
    for path in d.glob("000003.*"):
        path.unlink()


def swap(d: Path, a: str, b: str, suffixes: tuple[str, ...]) -> None:
    for suffix in suffixes:
        (d / f"{a}{suffix}").rename(d / "tmp")
        (d / f"{b}{suffix}").rename(d / f"{a}{suffix}")
        (d / "tmp").rename(d / f"{b}{suffix}")


def resign_with_another_key(d: Path) -> None:
    data = (d / "000003.json").read_bytes()
    (d / "000003.json.minisig").write_text(
        minisign.sign(Ed25519PrivateKey.generate(), data, "file:000003.json"))


def edit_manifest(d: Path) -> None:
    m = json.loads((d / "000003.json").read_bytes())
    m["gps_track"][0]["lat"] = 48.0
    (d / "000003.json").write_bytes(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
                                    + b"\n")


TAMPERING: dict[str, tuple[Callable[[Path], None], list[str], str]] = {
    "flipped byte": (flip_byte, ["altered"], "000003.ts.age is not the file its manifest signed"),
    "deleted segment": (delete_segment, ["gap"], "segment(s) 3 missing between 000002.json and "
                                                 "000004.json"),
    "swapped segments": (lambda d: swap(d, "000002", "000003", (".ts.age", ".json",
                                                                 ".json.minisig")),
                         ["swapped"], "000002.* and 000003.* are swapped"),
    "swapped videos only": (lambda d: swap(d, "000002", "000003", (".ts.age",)),
                            ["altered", "altered"], "it is the segment of 000003.json"),
    "re-signed with another key": (resign_with_another_key, ["foreign-key"],
                                   "000003.json.minisig was made with another key"),
    "edited manifest": (edit_manifest, ["bad-signature", "chain"],
                        "000003.json.minisig does not match 000003.json"),
    "segment without manifest": (lambda d: [(d / f"000004{s}").unlink()
                                            for s in (".json", ".json.minisig")],
                                 ["gap", "no-manifest"], "000004.ts.age has no manifest"),
    "manifest without segment": (lambda d: (d / "000004.ts.age").unlink(), ["no-segment"],
                                 "describes 000004.ts.age, which is not here"),
    "signature deleted": (lambda d: (d / "000005.json.minisig").unlink(), ["unsigned"],
                          "000005.json has no signature"),
    "manifest garbled": (lambda d: (d / "000003.json").write_bytes(b"{"), ["gap", "unreadable"],
                         "files 000003.* are here but have no valid manifest"),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_each_tampering_is_reported_in_its_own_words(
        case: str, segments: Path, device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    tamper, kinds, text = TAMPERING[case]
    tamper(segments)
    status, lines = verify(capsys, segments, "--pubkey", device.pubkey)
    assert status == 1
    assert error_kinds(lines) == kinds, lines
    assert any(text in line for line in lines), lines
    assert lines[-1].startswith("NOT VERIFIED")


def test_a_segment_closed_by_crash_recovery_is_a_note_not_an_error(
        device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record_chain(tmp_path / "d", device, cuts={5: {"reason": "crash-recovery", "truncated": True}})
    (tmp_path / "d" / "000006.ts.age.part").write_bytes(b"cut")  # not yet recovered
    status, lines = verify(capsys, tmp_path / "d", "--pubkey", device.pubkey)
    assert status == 0, lines
    assert [line.split()[1] for line in lines[:-1]] == ["interrupted:", "truncated:"]
    assert "000005.ts.age was closed by recovery after a crash (crash-recovery)" in lines[1]


def test_with_the_fleet_registry_a_replaced_key_still_verifies_older_segments(
        device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet.create(tmp_path / "fleet")
    fleet.enrol_local(DEVICE, "token", tmp_path / "dev")  # makes and registers its signing key
    enrolled = replace(device, key=load_or_make_key(tmp_path / "dev" / "signing.key"))
    record_chain(tmp_path / "d", enrolled)
    status, lines = verify(capsys, tmp_path / "d", "--fleet", tmp_path / "fleet")
    assert (status, lines[-1][:9]) == (0, "VERIFIED:"), lines
    assert main(["pubkey", DEVICE, "--fleet", str(tmp_path / "fleet")]) == 0
    (tmp_path / "device.pub").write_text(capsys.readouterr().out)
    checked = run(tool("minisign"), "-V", "-p", tmp_path / "device.pub", "-m",
                  tmp_path / "d" / "000001.json")
    assert checked.returncode == 0, checked.stderr

    fleet.enrol_local(DEVICE, "token", tmp_path / "dev-replacement")  # revokes the old identity
    status, lines = verify(capsys, tmp_path / "d", "--fleet", tmp_path / "fleet")
    assert status == 0, lines
    assert [line.split()[:2] for line in lines[:-1]] == [["NOTE", "revoked-key:"]] * 5


def test_an_unknown_device_in_the_fleet_fails(tmp_path: Path, device: Device, recorded: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    Fleet.create(tmp_path / "fleet")
    status, lines = verify(capsys, recorded, "--fleet", tmp_path / "fleet")
    assert status == 1 and error_kinds(lines) == ["no-key"], lines


def test_an_empty_directory_is_not_verified(tmp_path: Path, device: Device,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = verify(capsys, tmp_path, "--pubkey", device.pubkey)
    assert status == 1 and error_kinds(lines) == ["empty"], lines


def test_the_module_runs_as_a_command(recorded: Path, device: Device) -> None:
    done = run(sys.executable, "-m", "control_center.evidence_cli", "verify", recorded,
               "--pubkey", device.pubkey)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith("VERIFIED")


# -- against the ingest's audit log, and hostile files --------------------------------------------
def audit_stored(directory: Path, log: Path, seqs: range = range(1, 6)) -> Path:
    """An audit log in which the ingest stored `seqs` of this directory, as it writes one."""
    audit = AuditLog(log)
    for seq in seqs:
        manifest = (directory / f"{seq:06d}.json").read_bytes()
        audit.append("segment_stored", DEVICE, device_id=DEVICE, seq=seq,
                     manifest_sha256=hashlib.sha256(manifest).hexdigest())
    audit.close()
    return log


def verify_process(directory: Path, device: Device, *extra: str | Path
                   ) -> tuple[int, list[str]]:
    """`sos-evidence verify` as a process; a hang fails the test (run's timeout)."""
    done = run(sys.executable, "-m", "control_center.evidence_cli", "verify", directory,
               "--pubkey", device.pubkey, *extra)
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    return done.returncode, done.stdout.decode().splitlines()


def delete_seqs(directory: Path, *seqs: int) -> None:
    for seq in seqs:
        for path in directory.glob(f"{seq:06d}.*"):
            path.unlink()


def test_a_deleted_first_segment_is_missing_against_the_audit_log(
        segments: Path, device: Device, tmp_path: Path) -> None:
    log = audit_stored(segments, tmp_path / "audit.jsonl")
    delete_seqs(segments, 1)
    status, lines = verify_process(segments, device, "--audit", log)
    assert status == 1
    assert error_kinds(lines) == ["missing"], lines
    assert any(line.startswith("ERROR missing: segment 1 (000001.*) is not here, but the "
                               "ingest stored it (audit.jsonl line 1,") for line in lines), lines


def test_deleted_last_segments_are_missing_against_the_audit_log(
        segments: Path, device: Device, tmp_path: Path) -> None:
    log = audit_stored(segments, tmp_path / "audit.jsonl")
    delete_seqs(segments, 4, 5)
    status, lines = verify_process(segments, device, "--audit", log)
    assert status == 1
    assert error_kinds(lines) == ["missing", "missing"], lines
    assert [line.split(" is not here")[0] for line in lines if "ERROR missing" in line] == [
        "ERROR missing: segment 4 (000004.*)", "ERROR missing: segment 5 (000005.*)"]


def test_without_the_audit_log_a_chain_missing_its_start_is_incomplete_not_verified(
        segments: Path, device: Device) -> None:
    delete_seqs(segments, 1, 2)
    status, lines = verify_process(segments, device)
    assert status == INCOMPLETE
    assert lines[0].startswith("NOTE  partial: the chain here starts at segment 3")
    assert lines[-1].startswith(f"INCOMPLETE: {segments}: {DEVICE}, 3 segment(s), seq 3-5")
    assert "segments before seq 3 are not here" in lines[-1]


def test_an_audit_log_without_checked_anchors_does_not_explain_a_late_start(
        segments: Path, device: Device, tmp_path: Path) -> None:
    """Without a centre key (--pubkey) nothing outside the log vouches for it: the lines of
    earlier segments could have been removed with them. (With its signed heads checked, the
    log does explain it: tests/test_audit_verify.py.)"""
    log = audit_stored(segments, tmp_path / "audit.jsonl", range(3, 6))
    delete_seqs(segments, 1, 2)
    status, lines = verify_process(segments, device, "--audit", log)
    assert status == INCOMPLETE, lines
    assert any(line.startswith("NOTE  partial: the chain here starts at segment 3")
               and "its signed heads were not checked (no centre key: give --fleet)" in line
               for line in lines), lines
    assert lines[-1].startswith(f"INCOMPLETE: {segments}: {DEVICE}, 3 segment(s), seq 3-5")


def make_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def make_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def make_symlink(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("000002" + path.name[6:]))


HOSTILE = {
    "a FIFO as a manifest": ("000003.json", make_fifo, "is a FIFO, not a regular file"),
    "a directory as a segment": ("000003.ts.age", make_directory,
                                 "is a directory, not a regular file"),
    "a symlink as a signature": ("000003.json.minisig", make_symlink,
                                 "is a symbolic link, not a regular file"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_file_that_is_not_a_regular_file_is_one_finding_and_verify_goes_on(
        case: str, segments: Path, device: Device) -> None:
    name, make, text = HOSTILE[case]
    make(segments / name)
    status, lines = verify_process(segments, device)
    assert status == 1
    assert [line for line in lines if "not-a-file" in line] == [
        f"ERROR not-a-file: {name} {text}: not read, and not evidence"], lines
    assert lines[-1].startswith(f"NOT VERIFIED: {segments}: {DEVICE}, ")


def test_a_huge_sparse_segment_is_a_size_finding_and_is_never_hashed(
        segments: Path, device: Device) -> None:
    """1 TB of nothing on disk: hashing it would keep verify busy for hours (the run's
    timeout fails the test); its size alone shows it is not the signed file."""
    os.truncate(segments / "000003.ts.age", 1 << 40)
    status, lines = verify_process(segments, device)
    assert status == 1
    assert error_kinds(lines) == ["altered"], lines
    assert any(line.startswith(f"ERROR altered: 000003.ts.age is not the file its manifest "
                               f"signed: {1 << 40} bytes (not hashed") for line in lines), lines


def test_a_deeply_nested_manifest_is_unreadable_not_a_traceback(
        segments: Path, device: Device) -> None:
    (segments / "000003.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    status, lines = verify_process(segments, device)
    assert status == 1
    assert error_kinds(lines) == ["gap", "unreadable"], lines
    assert any(line.startswith("ERROR unreadable: 000003.json is not usable JSON (nested "
                               "100000 deep") for line in lines), lines


# -- decrypt and export --------------------------------------------------------------------------
def test_decrypt_gives_back_the_recorded_stream(recorded: Path, device: Device, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "000002.ts"
    assert main(["decrypt", "--identity", str(device.identity), str(recorded / "000002.ts.age"),
                 "-o", str(out)]) == 0
    assert out.read_bytes() == device.plaintexts[2]
    wrong = tmp_path / "wrong.txt"
    run(tool("age-keygen"), "-o", wrong)
    assert main(["decrypt", "--identity", str(wrong), str(recorded / "000002.ts.age"),
                 "-o", str(tmp_path / "x.ts")]) == 2
    assert "age could not decrypt" in capsys.readouterr().err
    assert not (tmp_path / "x.ts").exists()


def export(directory: Path, device: Device, out: Path, *extra: str) -> int:
    return main(["export", str(directory), "--identity", str(device.identity), "--call", CALL,
                 "-o", str(out), "--pubkey", str(device.pubkey), *extra])


def test_export_writes_a_playable_video_and_a_gpx_track(
        recorded: Path, device: Device, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert export(recorded, device, tmp_path / "out") == 0
    assert "exported call call-17: 3 segment(s)" in capsys.readouterr().out
    video = tmp_path / "out" / f"{CALL}.ts"
    assert video.read_bytes() == b"".join(device.plaintexts[s] for s in (2, 3, 4))
    probe = run(tool("ffprobe"), "-v", "error", "-count_frames", "-show_entries",
                "stream=codec_name,nb_read_frames", "-of", "json", video)
    assert probe.returncode == 0 and probe.stderr == b"", probe.stderr
    (stream,) = json.loads(probe.stdout)["streams"]
    assert (stream["codec_name"], int(stream["nb_read_frames"])) == ("h264", 3 * FRAMES)

    gpx = ET.parse(tmp_path / "out" / f"{CALL}.gpx").getroot()
    ns = {"g": "http://www.topografix.com/GPX/1/1"}
    assert gpx.tag == "{http://www.topografix.com/GPX/1/1}gpx" and gpx.get("version") == "1.1"
    points = gpx.findall("g:trk/g:trkseg/g:trkpt", ns)
    assert len(points) == 3 * POINTS
    assert (points[0].get("lat"), points[0].findtext("g:time", namespaces=ns)) == \
        ("52.5020000", "2024-05-01T10:02:00.000Z")
    record = (tmp_path / "out" / f"{CALL}.verification.txt").read_text()
    assert "VERIFIED" in record and hashlib.sha256(video.read_bytes()).hexdigest() in record


def test_export_refuses_evidence_that_does_not_verify_unless_forced(
        segments: Path, device: Device, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    flip_byte(segments)
    assert export(segments, device, tmp_path / "out") == 2
    captured = capsys.readouterr()
    assert "refusing to export" in captured.err and "ERROR altered" in captured.out
    assert not (tmp_path / "out" / f"{CALL}.ts").exists()

    assert export(segments, device, tmp_path / "out", "--force") == 2  # age rejects the flip
    assert "age could not decrypt" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # no half-written video

    flip_byte(segments)  # undone; a problem that age cannot see instead:
    (segments / "000005.json.minisig").unlink()
    assert export(segments, device, tmp_path / "out", "--force") == 1
    captured = capsys.readouterr()
    assert "EXPORTED ALTHOUGH VERIFICATION FAILED" in captured.err
    assert "WARNING: EXPORTED WITH --force" in (
        tmp_path / "out" / f"{CALL}.verification.txt").read_text()
