"""`sos-evidence decrypt` on segments cut short, and the audit of `decrypt` and `export`.

The segments are real: the recorder (synthetic camera, our age writer) runs as its own process
and is SIGKILLed in the middle of a segment; the next run's recovery closes the cut segment with
a manifest that says so. Other cuts are made by hand from a complete recorded segment. Every
recovered video is checked with ffprobe (it must decode frames).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from control_center.audit import AuditLog, verify_log
from control_center.evidence import file_sha256
from control_center.evidence_cli import NOTHING_RECOVERED, main
from control_center.fleet import age_x25519_keypair
from evidence_format import minisign
from evidence_format.age_stream import CHUNK, SEALED_CHUNK, decrypt_salvage, parse_identities
from protocol.signing import load_or_make_key
from tests.helpers import RecordingProcess

DEVICE = "tok-rec-01"  # simulator.recording_process's default
CALL = "call-crash-test"
SEGMENT_S = 4.0  # ~190 KB of ciphertext: several 64 KiB chunks per segment


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed and these tests need it: apt-get install "
                    f"{'ffmpeg' if name == 'ffprobe' else name}")
    return path


def payload_offset(ciphertext: bytes) -> int:
    """Where chunk 0 starts: after the header's MAC line and the 16-byte nonce."""
    mac_line = ciphertext.index(b"\n---") + 1
    return ciphertext.index(b"\n", mac_line) + 1 + 16


def on_disk_chunks(part: Path) -> int:
    """Sealed chunks of a segment being written that have reached the file."""
    try:
        data = part.read_bytes()
        return (len(data) - payload_offset(data)) // SEALED_CHUNK
    except (FileNotFoundError, ValueError):  # not there yet, or its header not yet flushed
        return 0


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A card on which the recorder was killed mid-segment and then restarted: segment 1 is
    complete, segment 2 was cut by the kill and closed by recovery (`cut` in its manifest)."""
    root = tmp_path_factory.mktemp("crash")
    identity, recipient = age_x25519_keypair()
    (root / "identity.txt").write_text(identity + "\n")
    signing_key = root / "device-signing.key"
    (root / "device.pub").write_text(
        minisign.public_key_file(load_or_make_key(signing_key).public_key()))
    keys = {"identity": root / "identity.txt", "recipient": recipient,
            "signing_key": signing_key, "pub": root / "device.pub"}
    directory = root / "card"
    first = RecordingProcess(keys, directory, SEGMENT_S)
    try:
        first.expect("recovered")
        assert first.expect("committed") == "committed 1"
        part = directory / "000002.ts.age.part"
        deadline = time.monotonic() + 20
        while not on_disk_chunks(part) >= 2:  # what a power cut would leave: bytes the kernel has
            assert time.monotonic() < deadline, "segment 2 never reached two chunks on disk"
            time.sleep(0.05)
    finally:
        first.proc.kill()  # mid-segment: segment 2 is a .part file
        first.proc.wait()
    second = RecordingProcess(keys, directory, SEGMENT_S)
    try:
        assert second.expect("recovered") == "recovered 2"  # printed once it is closed
    finally:
        second.proc.kill()
        second.proc.wait()
    manifest = json.loads((directory / "000002.json").read_text())
    assert manifest["cut"] == {"reason": "crash-recovery", "truncated": True}
    return {**keys, "dir": directory}


def decrypt(card: dict, segment: Path, out: Path, *extra: str) -> int:
    return main(["decrypt", "--identity", str(card["identity"]), str(segment), "-o", str(out),
                 *extra])


def ffprobe_frames(path: Path) -> int:
    done = subprocess.run([tool("ffprobe"), "-v", "error", "-count_frames", "-select_streams",
                           "v:0", "-show_entries", "stream=codec_name,nb_read_frames", "-of",
                           "json", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    (stream,) = json.loads(done.stdout)["streams"]
    assert stream["codec_name"] == "h264"
    return int(stream["nb_read_frames"])


def salvageable(card: dict, segment: Path) -> bytes:
    with open(segment, "rb") as f:
        return decrypt_salvage(f, parse_identities(card["identity"].read_text()))[0]


def cut_copy(card: dict, tmp_path: Path, size: int | None = None, *,
             damage_at: int | None = None) -> Path:
    """Segment 1 (complete) and its manifest, copied; the copy cut to `size` bytes, or with one
    byte flipped at `damage_at`. Its manifest does not say it was cut: stock age is tried."""
    directory = tmp_path / "copy"
    directory.mkdir(exist_ok=True)
    data = bytearray((card["dir"] / "000001.ts.age").read_bytes())
    if damage_at is not None:
        data[damage_at] ^= 0x01
    (directory / "000001.ts.age").write_bytes(bytes(data[:size]))
    shutil.copy(card["dir"] / "000001.json", directory)
    return directory / "000001.ts.age"


# -- decrypt ---------------------------------------------------------------------------------------
def test_a_complete_segment_decrypts_with_stock_age_byte_for_byte(card, tmp_path, capsys) -> None:
    out = tmp_path / "000001.ts"
    assert decrypt(card, card["dir"] / "000001.ts.age", out) == 0
    assert capsys.readouterr().out.startswith("decrypted ")
    stock = subprocess.run([tool("age"), "-d", "-i", str(card["identity"]),
                            str(card["dir"] / "000001.ts.age")], capture_output=True, check=True)
    assert out.read_bytes() == stock.stdout
    manifest = json.loads((card["dir"] / "000001.json").read_text())
    assert ffprobe_frames(out) == manifest["frames"]


def test_a_segment_cut_by_a_crash_gives_its_authenticated_part_and_says_so(
        card, tmp_path, capsys) -> None:
    segment = card["dir"] / "000002.ts.age"
    refused = subprocess.run([tool("age"), "-d", "-i", str(card["identity"]), "-o",
                              str(tmp_path / "age.ts"), str(segment)], capture_output=True,
                             text=True)
    assert refused.returncode == 1, "stock age should refuse a file cut short"
    out = tmp_path / "000002.ts"
    assert decrypt(card, segment, out) == 0
    (line,) = capsys.readouterr().out.splitlines()
    recovered = out.read_bytes()
    chunks = len(recovered) // CHUNK
    assert chunks >= 2 and len(recovered) == chunks * CHUNK
    assert line.startswith(f"PARTLY RECOVERED 000002.ts.age -> {out}: {len(recovered)} bytes "
                           f"in {chunks} authenticated 64 KiB chunk(s); the rest of the segment "
                           f"was lost (cut short: "), line
    assert recovered == salvageable(card, segment)
    assert ffprobe_frames(out) > 0
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("where", ["inside-chunk-2", "after-chunk-2", "after-chunk-1-tag"])
def test_a_segment_that_stock_age_finds_truncated_falls_back_to_salvage(
        card, tmp_path, capsys, where: str) -> None:
    whole = (card["dir"] / "000001.ts.age").read_bytes()
    start = payload_offset(whole)
    size = {"inside-chunk-2": start + 2 * SEALED_CHUNK + 1000,
            "after-chunk-2": start + 2 * SEALED_CHUNK,
            "after-chunk-1-tag": start + SEALED_CHUNK + 10}[where]
    assert size < len(whole)
    segment = cut_copy(card, tmp_path, size)
    out = tmp_path / "cut.ts"
    assert decrypt(card, segment, out) == 0
    line = capsys.readouterr().out
    want = CHUNK * ((size - start) // SEALED_CHUNK)
    assert f"PARTLY RECOVERED 000001.ts.age -> {out}: {want} bytes" in line
    assert "the rest of the segment was lost" in line
    assert out.read_bytes() == salvageable(card, card["dir"] / "000001.ts.age")[:want]
    assert ffprobe_frames(out) > 0


@pytest.mark.parametrize("where", ["in-the-header", "in-chunk-0"])
def test_a_segment_cut_before_its_first_chunk_recovers_nothing_and_exits_3(
        card, tmp_path, capsys, where: str) -> None:
    whole = (card["dir"] / "000001.ts.age").read_bytes()
    size = {"in-the-header": 40, "in-chunk-0": payload_offset(whole) + 5000}[where]
    out = tmp_path / "nothing.ts"
    assert decrypt(card, cut_copy(card, tmp_path, size), out) == NOTHING_RECOVERED == 3
    assert "NOTHING RECOVERED from 000001.ts.age" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_an_altered_segment_or_a_wrong_key_is_refused_not_salvaged(card, tmp_path,
                                                                   capsys) -> None:
    whole = (card["dir"] / "000001.ts.age").read_bytes()
    altered = cut_copy(card, tmp_path, damage_at=payload_offset(whole) + SEALED_CHUNK + 7)
    out = tmp_path / "x.ts"
    assert decrypt(card, altered, out) == 2
    assert "altered or damaged, not cut short" in capsys.readouterr().err
    assert not out.exists()

    stranger = tmp_path / "stranger.txt"
    stranger.write_text(age_x25519_keypair()[0] + "\n")
    assert main(["decrypt", "--identity", str(stranger), str(card["dir"] / "000002.ts.age"),
                 "-o", str(out)]) == 2  # a cut segment goes to salvage: it refuses too
    assert "no identity matches" in capsys.readouterr().err
    assert not out.exists()


# -- audit ---------------------------------------------------------------------------------------
def entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_decrypt_and_export_append_to_the_audit_log(card, tmp_path, capsys) -> None:
    log = tmp_path / "audit" / "evidence.jsonl"
    audit = ["--audit", str(log), "--operator", "insp.jansen"]
    whole, cut = card["dir"] / "000001.ts.age", card["dir"] / "000002.ts.age"
    assert decrypt(card, whole, tmp_path / "1.ts", *audit) == 0
    assert decrypt(card, cut, tmp_path / "2.ts", *audit) == 0
    only_complete = tmp_path / "call"
    only_complete.mkdir()
    for suffix in (".ts.age", ".json", ".json.minisig"):
        shutil.copy(card["dir"] / f"000001{suffix}", only_complete)
    assert main(["export", str(only_complete), "--identity", str(card["identity"]), "--call",
                 CALL, "-o", str(tmp_path / "out"), "--pubkey", str(card["pub"]), *audit]) == 0
    assert decrypt(card, whole, tmp_path / "3.ts", "--audit", str(log),
                   "--identity", str(tmp_path / "missing.txt")) == 2  # failed: not audited
    capsys.readouterr()

    assert verify_log(log) == []
    first, second, exported = entries(log)
    assert first["prev"] is None and first["event"] == "decrypted"
    assert {k: first[k] for k in ("actor", "device_id", "seq", "sha256", "output", "complete",
                                  "method")} == {
        "actor": "insp.jansen", "device_id": DEVICE, "seq": 1, "sha256": file_sha256(whole),
        "output": str((tmp_path / "1.ts").resolve()), "complete": True, "method": "age"}
    assert first["output_sha256"] == file_sha256(tmp_path / "1.ts")
    assert first["input"] == str(whole.resolve())
    assert (second["event"], second["seq"], second["sha256"], second["complete"],
            second["method"]) == ("decrypted", 2, file_sha256(cut), False, "salvage")
    assert second["plaintext_bytes"] == (tmp_path / "2.ts").stat().st_size
    video = tmp_path / "out" / f"{CALL}.ts"
    assert {k: exported[k] for k in ("event", "actor", "device_id", "call_id", "seqs", "sha256",
                                     "output", "output_sha256", "verified", "forced")} == {
        "event": "exported", "actor": "insp.jansen", "device_id": DEVICE, "call_id": CALL,
        "seqs": [1], "sha256": [file_sha256(whole)], "output": str(video.resolve()),
        "output_sha256": file_sha256(video), "verified": True, "forced": False}


def test_the_audit_log_defaults_to_sos_audit_log_and_the_login_name(
        card, tmp_path, monkeypatch, capsys) -> None:
    log = tmp_path / "from-env.jsonl"
    monkeypatch.setenv("SOS_AUDIT_LOG", str(log))
    monkeypatch.setenv("LOGNAME", "op-nightshift")
    assert decrypt(card, card["dir"] / "000001.ts.age", tmp_path / "a.ts") == 0
    (entry,) = entries(log)
    assert (entry["event"], entry["actor"]) == ("decrypted", "op-nightshift")

    monkeypatch.delenv("SOS_AUDIT_LOG")
    assert decrypt(card, card["dir"] / "000001.ts.age", tmp_path / "b.ts") == 0
    assert len(entries(log)) == 1  # no log named: no audit
    assert verify_log(log) == []


def test_an_audit_log_that_cannot_be_opened_stops_the_decryption(card, tmp_path,
                                                                 capsys) -> None:
    out = tmp_path / "x.ts"
    assert decrypt(card, card["dir"] / "000001.ts.age", out, "--audit", str(tmp_path)) == 2
    assert "cannot open the audit log" in capsys.readouterr().err
    assert not out.exists()


def test_plaintext_whose_audit_entry_cannot_be_written_is_removed(card, tmp_path, monkeypatch,
                                                                  capsys) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AuditLog, "append", disk_full)
    out = tmp_path / "x.ts"
    assert decrypt(card, card["dir"] / "000001.ts.age", out,
                   "--audit", str(tmp_path / "audit.jsonl")) == 2
    assert "the output was removed" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["decrypt", "export"])
def test_help_describes_the_audit_options(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--audit FILE" in text and "$SOS_AUDIT_LOG" in text
    assert "--operator NAME" in text and "login name" in text
    if command == "decrypt":
        assert "cut short" in text and "3 when nothing could be recovered" in text
