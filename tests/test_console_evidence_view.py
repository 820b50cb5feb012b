"""The console's evidence browser (control_center/web/evidence_view.py) on real evidence.

The segments are real: H.264 MPEG-TS, age-encrypted to the fleet's evidence key, chained and
signed with the enrolled device's key (tests/test_ingest_support.Card), then put into the
ingest's DirectoryStore as the ingest does. Exports are checked with the stock ffprobe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control_center import evidence
from control_center.audit import AuditLog
from control_center.evidence import EvidenceError
from control_center.fleet import Fleet
from control_center.ingest import DirectoryStore
from control_center.web import evidence_view
from control_center.web.evidence_view import CallRefused, EvidenceBrowser, InvalidId
from tests.test_evidence_verify import FRAMES, tiny_ts, tool
from tests.test_ingest_support import Card, enrol, make_fleet

DEVICE = "tok-ev-01"
CALL = "call-17"
ODD = "odd-01"  # a device whose dispatch call id looks like a path
ODD_CALL = "../../../etc/call 7"
CALLS = {1: None, 2: CALL, 3: CALL, 4: "call-18"}  # seq -> call id of DEVICE's segments
USER = "alice"


@dataclass
class Recorded:
    fleet: Fleet
    root: Path  # the ingest's evidence root: <root>/<device id>/NNNNNN.*
    plaintexts: dict[int, bytes]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    base = tmp_path_factory.mktemp("evidence")
    fleet = make_fleet(base)
    store = DirectoryStore(base / "evidence")
    plaintexts = {seq: tiny_ts((seq - 1) * FRAMES) for seq in CALLS}
    card = Card(fleet, enrol(fleet, base, DEVICE), base / "card")
    for seq, call_id in CALLS.items():
        seg = card.record(plaintexts[seq], call_id=call_id, flags=("evidence",))
        store.put(DEVICE, seg.seq, seg.ciphertext, seg.manifest, seg.signature)
    odd = Card(fleet, enrol(fleet, base, ODD), base / "odd-card")
    seg = odd.record(plaintexts[1], call_id=ODD_CALL)
    store.put(ODD, seg.seq, seg.ciphertext, seg.manifest, seg.signature)
    return Recorded(fleet, store.root, plaintexts)


@dataclass
class Console:
    browser: EvidenceBrowser
    evidence: Path  # this test's copy of the evidence root
    exports: Path
    audit_file: Path

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]


@pytest.fixture
def console(recorded: Recorded, tmp_path: Path) -> Iterator[Console]:
    """A browser on a fresh copy of the evidence, for a test to tamper with."""
    copy = Path(shutil.copytree(recorded.root, tmp_path / "evidence"))
    audit = AuditLog(tmp_path / "audit.log")
    browser = EvidenceBrowser(copy, recorded.fleet, tmp_path / "exports", audit)
    yield Console(browser, copy, tmp_path / "exports", audit.path)
    audit.close()


def device(overview: dict[str, Any], device_id: str = DEVICE) -> dict[str, Any]:
    (found,) = [d for d in overview["devices"] if d["device_id"] == device_id]
    return found


def flip_byte(path: Path, at: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def ffprobe_frames(path: Path) -> int:
    done = subprocess.run([tool("ffprobe"), "-v", "error", "-count_frames", "-show_entries",
                           "stream=codec_name,nb_read_frames", "-of", "json", str(path)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    (stream,) = json.loads(done.stdout)["streams"]
    assert stream["codec_name"] == "h264"
    return int(stream["nb_read_frames"])


# -- the overview --------------------------------------------------------------------------------
def test_good_evidence_verifies_with_its_calls(console: Console) -> None:
    found = device(console.browser.overview(USER))
    assert (found["verdict"], found["ok"], found["errors"], found["segments"]) == \
        ("VERIFIED", True, [], 4)
    assert found["calls"] == [
        {"call_id": CALL, "segments": 2, "first_at": "2026-03-01T08:02:00.000Z",
         "last_at": "2026-03-01T08:03:10.000Z", "ok": True, "errors": []},
        {"call_id": "call-18", "segments": 1, "first_at": "2026-03-01T08:04:00.000Z",
         "last_at": "2026-03-01T08:04:10.000Z", "ok": True, "errors": []}]


def test_a_flipped_byte_in_a_segment_is_an_error(console: Console) -> None:
    flip_byte(console.evidence / DEVICE / "000003.ts.age")
    found = device(console.browser.overview(USER))
    assert (found["verdict"], found["ok"]) == ("NOT VERIFIED", False)
    assert [e.split(":")[0] for e in found["errors"]] == ["altered"]
    assert "000003.ts.age" in found["errors"][0]
    assert device(console.browser.overview(USER), ODD)["ok"]  # other devices unaffected


def calls_of(overview: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["call_id"]: c for c in device(overview)["calls"]}


def test_a_tampered_segment_fails_its_own_call_and_not_the_other(console: Console) -> None:
    flip_byte(console.evidence / DEVICE / "000004.ts.age")  # call-18's only segment
    calls = calls_of(console.browser.overview(USER))
    assert (calls["call-18"]["ok"], [e.split(":")[0] for e in calls["call-18"]["errors"]]) == \
        (False, ["altered"])
    assert "000004.ts.age" in calls["call-18"]["errors"][0]
    assert (calls[CALL]["ok"], calls[CALL]["errors"]) == (True, [])
    assert device(console.browser.overview(USER))["errors"] == calls["call-18"]["errors"]


def test_a_tampered_manifest_fails_its_call_and_the_chain_link_to_the_next(
        console: Console) -> None:
    """000003.json edited: its signature fails (call-17), and 000004.json, which names the
    original's hash, no longer follows it: the link concerns both calls."""
    manifest = console.evidence / DEVICE / "000003.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"seq"', b'"seq" '))
    calls = calls_of(console.browser.overview(USER))
    kinds = {c: sorted(e.split(":")[0] for e in calls[c]["errors"]) for c in calls}
    assert kinds == {CALL: ["bad-signature", "chain"], "call-18": ["chain"]}
    assert not calls[CALL]["ok"] and not calls["call-18"]["ok"]


def test_an_error_about_no_file_concerns_every_call(console: Console, recorded: Recorded,
                                                    tmp_path: Path) -> None:
    """Without the device's key no signature can be checked: no call verifies."""
    fleet = Fleet.create(tmp_path / "fleet-without-the-device")  # an empty registry
    audit = AuditLog(tmp_path / "other-audit.log")
    browser = EvidenceBrowser(console.evidence, fleet, console.exports, audit)
    calls = calls_of(browser.overview(USER))
    assert {c: (calls[c]["ok"], [e.split(":")[0] for e in calls[c]["errors"]])
            for c in calls} == {CALL: (False, ["no-key"]), "call-18": (False, ["no-key"])}
    audit.close()


def test_every_view_is_audited_with_its_user(console: Console) -> None:
    console.browser.overview(USER)
    console.browser.overview("bob")
    lines = console.audit_lines()
    assert [(e["event"], e["actor"], e["count"]) for e in lines] == [
        ("console_evidence_view", USER, 2), ("console_evidence_view", "bob", 2)]


def test_no_evidence_yet_is_an_empty_list(recorded: Recorded, tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    browser = EvidenceBrowser(tmp_path / "none", recorded.fleet, tmp_path / "exports", audit)
    assert browser.overview(USER) == {"devices": []}
    audit.close()


def test_a_symlinked_device_directory_is_not_listed(console: Console, tmp_path: Path) -> None:
    outside = Path(shutil.copytree(console.evidence / DEVICE, tmp_path / "outside"))
    (console.evidence / "tok-link-01").symlink_to(outside)
    names = [d["device_id"] for d in console.browser.overview(USER)["devices"]]
    assert names == [ODD, DEVICE]


# -- the verification cache ----------------------------------------------------------------------
@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories the browser verifies, in order."""
    seen: list[Path] = []

    def counting(directory: Path, keys_for: Any) -> evidence.Report:
        seen.append(Path(directory))
        return evidence.verify_directory(directory, keys_for)

    monkeypatch.setattr(evidence_view, "verify_directory", counting)
    return seen


def test_a_repeat_view_of_unchanged_evidence_verifies_nothing_again(
        console: Console, verifications: list[Path]) -> None:
    first = console.browser.overview(USER)
    assert len(verifications) == 2
    assert console.browser.overview(USER) == first
    assert len(verifications) == 2


def test_a_segment_rewritten_with_its_mtime_set_back_is_verified_again(
        console: Console, verifications: list[Path]) -> None:
    console.browser.overview(USER)
    segment = console.evidence / DEVICE / "000002.ts.age"
    before = segment.stat()
    flip_byte(segment)
    os.utime(segment, ns=(before.st_atime_ns, before.st_mtime_ns))  # ctime still moves
    assert not device(console.browser.overview(USER))["ok"]
    assert verifications[-1] == console.evidence / DEVICE
    assert len(verifications) == 3  # the other device's result came from the cache


# -- exporting -----------------------------------------------------------------------------------
def test_an_export_is_a_playable_video_a_track_and_a_record(console: Console,
                                                            recorded: Recorded) -> None:
    done = console.browser.export(USER, DEVICE, CALL)
    assert (done["device_id"], done["call_id"], done["verified"]) == (DEVICE, CALL, True)
    names = sorted(f["name"] for f in done["files"])
    assert names == [f"{CALL}.gpx", f"{CALL}.ts", f"{CALL}.verification.txt"]
    directory = console.exports / done["export_id"]
    video = directory / f"{CALL}.ts"
    assert video.read_bytes() == recorded.plaintexts[2] + recorded.plaintexts[3]
    assert ffprobe_frames(video) == 2 * FRAMES
    gpx = ET.parse(directory / f"{CALL}.gpx").getroot()
    assert len(gpx.findall(".//{http://www.topografix.com/GPX/1/1}trkpt")) == 2
    assert "VERIFIED" in (directory / f"{CALL}.verification.txt").read_text()


def test_an_exports_files_are_listed_with_their_hashes_and_urls(console: Console) -> None:
    done = console.browser.export(USER, DEVICE, CALL)
    for entry in done["files"]:
        path = console.exports / done["export_id"] / entry["name"]
        assert entry["sha256"] == evidence.file_sha256(path)
        assert entry["size"] == path.stat().st_size
        assert entry["url"] == f"/api/exports/{done['export_id']}/{entry['name']}"


def test_an_export_is_audited_with_its_user_ids_and_file_hashes(console: Console) -> None:
    done = console.browser.export(USER, DEVICE, CALL)
    (line,) = console.audit_lines()
    assert (line["event"], line["actor"], line["device_id"], line["call_id"],
            line["export_id"], line["verified"]) == (
        "console_evidence_export", USER, DEVICE, CALL, done["export_id"], True)
    assert line["files"] == [{k: f[k] for k in ("name", "size", "sha256")}
                             for f in done["files"]]
    assert line["seqs"] == [2, 3]


def test_an_exported_file_is_served_from_its_export(console: Console) -> None:
    done = console.browser.export(USER, DEVICE, CALL)
    path = console.browser.export_file(done["export_id"], f"{CALL}.gpx")
    assert path == console.exports / done["export_id"] / f"{CALL}.gpx"


def test_a_call_that_does_not_verify_is_refused_and_audited(console: Console) -> None:
    flip_byte(console.evidence / DEVICE / "000004.ts.age")  # another call's segment, same chain
    with pytest.raises(CallRefused) as refused:
        console.browser.export(USER, DEVICE, CALL)
    assert [e.split(":")[0] for e in refused.value.errors] == ["altered"]
    assert "does not verify" in str(refused.value)
    (line,) = console.audit_lines()
    assert (line["event"], line["actor"], line["device_id"], line["call_id"],
            line["error_count"]) == ("console_evidence_export_refused", USER, DEVICE, CALL, 1)
    assert line["errors"] == refused.value.errors
    assert not console.exports.exists() or list(console.exports.iterdir()) == []


def test_a_call_id_that_looks_like_a_path_exports_inside_its_export(console: Console) -> None:
    """The id comes from a signed manifest; it is matched, never joined into a path."""
    done = console.browser.export(USER, ODD, ODD_CALL)
    directory = console.exports / done["export_id"]
    assert sorted(p.parent for p in console.exports.rglob("*") if p.is_file()) == [directory] * 3
    assert ffprobe_frames(directory / done["files"][1]["name"]) == FRAMES


def test_an_export_without_the_evidence_identity_is_refused(console: Console, tmp_path: Path,
                                                            recorded: Recorded) -> None:
    fleet = Fleet.create(tmp_path / "fleet-without-key")  # no evidence identity made
    fleet.identities = recorded.fleet.identities
    audit = AuditLog(tmp_path / "other-audit.log")
    browser = EvidenceBrowser(console.evidence, fleet, console.exports, audit)
    with pytest.raises(EvidenceError, match="evidence identity"):
        browser.export(USER, DEVICE, CALL)
    audit.close()


# -- what comes from a URL -----------------------------------------------------------------------
@pytest.mark.parametrize("device_id", ["../tok-ev-01", "/etc", "tok-ev-01/../odd-01", ".",
                                       "..", "", "TOK-EV-01", "tok-ev-01\n", "tok ev", "x" * 70])
def test_a_device_id_that_is_none_is_refused(console: Console, device_id: str) -> None:
    with pytest.raises(InvalidId):
        console.browser.export(USER, device_id, CALL)


@pytest.mark.parametrize("call_id", ["", "x" * 201, "call-17\n", "call\x00-17"])
def test_a_call_id_that_is_none_is_refused(console: Console, call_id: str) -> None:
    with pytest.raises(InvalidId):
        console.browser.export(USER, DEVICE, call_id)


def test_an_unknown_device_or_call_is_not_found(console: Console) -> None:
    with pytest.raises(LookupError):
        console.browser.export(USER, "tok-nobody", CALL)
    with pytest.raises(LookupError):
        console.browser.export(USER, DEVICE, "call-99")
    with pytest.raises(LookupError):  # the call is the other device's
        console.browser.export(USER, DEVICE, ODD_CALL)


def test_a_refused_id_is_audited_with_the_user(console: Console) -> None:
    with pytest.raises(InvalidId):
        console.browser.export(USER, "../../etc", CALL)
    (line,) = console.audit_lines()
    assert (line["event"], line["actor"], line["device_id"], line["call_id"]) == (
        "console_evidence_export_refused", USER, "../../etc", CALL)


def test_a_symlinked_device_directory_is_not_exported(console: Console, tmp_path: Path) -> None:
    outside = Path(shutil.copytree(console.evidence / DEVICE, tmp_path / "outside"))
    (console.evidence / "tok-link-01").symlink_to(outside)
    with pytest.raises(LookupError):
        console.browser.export(USER, "tok-link-01", CALL)


@pytest.mark.parametrize("name", ["../../audit.log", "/etc/passwd", ".", "..", "", "a/b",
                                  f"{CALL}.ts.part", ".hidden"])
def test_a_file_name_that_is_not_plain_is_not_served(console: Console, name: str) -> None:
    done = console.browser.export(USER, DEVICE, CALL)
    with pytest.raises(LookupError):
        console.browser.export_file(done["export_id"], name)


@pytest.mark.parametrize("export_id", ["..", "../exports", "/tmp", "0" * 31, "A" * 32,
                                       ".staging-" + "0" * 32, "0" * 32 + "/.."])
def test_an_export_id_not_of_our_form_is_not_served(console: Console, export_id: str) -> None:
    console.browser.export(USER, DEVICE, CALL)
    with pytest.raises(LookupError):
        console.browser.export_file(export_id, f"{CALL}.ts")


def test_a_missing_export_or_file_is_not_found(console: Console) -> None:
    done = console.browser.export(USER, DEVICE, CALL)
    with pytest.raises(LookupError):
        console.browser.export_file("0" * 32, f"{CALL}.ts")
    with pytest.raises(LookupError):
        console.browser.export_file(done["export_id"], "call-18.ts")


def test_a_symlink_planted_in_an_export_is_not_served(console: Console) -> None:
    done = console.browser.export(USER, DEVICE, CALL)
    (console.exports / done["export_id"] / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(LookupError):
        console.browser.export_file(done["export_id"], "passwd")


def test_an_export_that_cannot_be_audited_is_removed(recorded: Recorded, tmp_path: Path) -> None:
    """No plaintext leaves without its audit line."""
    audit = AuditLog(tmp_path / "audit.log")
    browser = EvidenceBrowser(recorded.root, recorded.fleet, tmp_path / "exports", audit)
    audit.close()  # every append now fails
    with pytest.raises(EvidenceError, match="the export was removed"):
        browser.export(USER, DEVICE, CALL)
    assert list((tmp_path / "exports").iterdir()) == []
