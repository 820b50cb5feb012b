"""`sos-center audit verify` and `sos-evidence verify --audit` on what a real ingest server
wrote: its audit log, the signed heads beside it, the receipts a device kept, the store.

One server run stores four segments of one device and stops (signing the final head); each test
tampers with its own copy and runs the real commands as processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from control_center.audit import AuditHeads, AuditLog, encode, line_hash
from tests.test_ingest_support import decode_receipt, new_env, random_bytes, stop_all

DEVICE = "tok-001"
SEGMENTS = 4


def ingest(root: Path, uploaded: range) -> Path:
    """The device records seq 1 to the last of `uploaded`, and uploads `uploaded` to a real
    ingest server, which then stops. root/: fleet/, evidence/tok-001/, audit.jsonl,
    audit.jsonl.heads and the device's receipts.jsonl."""
    env = new_env(root, device=DEVICE)
    try:
        client = env.client(env.start())
        card = env.card()
        receipts = []
        for seq in range(1, uploaded[-1] + 1):
            seg = card.record(random_bytes(2000))
            if seq in uploaded:
                reply = client.upload(seg)
                assert reply.status == 204, reply.body
                receipts.append(decode_receipt(reply.header("upload-receipt") or ""))
    finally:
        stop_all(env)
    (env.root / "receipts.jsonl").write_text(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in receipts))
    return env.root


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seq 1-4 uploaded and stored."""
    return ingest(tmp_path_factory.mktemp("ingested"), range(1, SEGMENTS + 1))


@pytest.fixture(scope="module")
def ingested_late(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only seq 3-4 uploaded (the card dropped 1-2 before the dock): the chain in the store
    starts at 3, which names a predecessor the centre never saw."""
    return ingest(tmp_path_factory.mktemp("late"), range(3, SEGMENTS + 1))


@pytest.fixture
def root(ingested: Path, tmp_path: Path) -> Path:
    """A fresh copy of the ingest's files, for a test to tamper with."""
    return Path(shutil.copytree(ingested, tmp_path / "centre"))


@pytest.fixture
def late(ingested_late: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ingested_late, tmp_path / "centre"))


def audit_verify(root: Path, *extra: str | Path) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "control_center.cli", "audit", "verify",
                           str(root / "audit.jsonl"), "--fleet", str(root / "fleet"),
                           *map(str, extra)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout.splitlines()


def evidence_verify(root: Path) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "control_center.evidence_cli", "verify",
                           str(root / "evidence" / DEVICE), "--fleet", str(root / "fleet"),
                           "--audit", str(root / "audit.jsonl")],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout.splitlines()


def log_lines(root: Path) -> list[bytes]:
    return (root / "audit.jsonl").read_bytes().splitlines(keepends=True)


def write_lines(root: Path, lines: list[bytes]) -> None:
    (root / "audit.jsonl").write_bytes(b"".join(lines))


def kinds(lines: list[str], level: str = "ERROR") -> list[str]:
    return sorted(line.split()[1].rstrip(":") for line in lines if line.startswith(level))


# -- what the ingest writes ----------------------------------------------------------------------
def test_each_receipt_names_the_audit_line_that_records_it(ingested: Path) -> None:
    by_hash = {line_hash(raw): json.loads(raw) for raw in log_lines(ingested)}
    for raw in (ingested / "receipts.jsonl").read_text().splitlines():
        receipt = json.loads(raw)
        line = by_hash[receipt["audit_head"]]
        assert (line["event"], line["receipt_id"], line["seq"]) == (
            "receipt_issued", receipt["receipt_id"], receipt["seq"])


def test_the_log_the_ingest_wrote_verifies_up_to_its_last_line(root: Path) -> None:
    status, lines = audit_verify(root, "--receipts", root / "receipts.jsonl")
    assert status == 0, lines
    assert lines == [f"VERIFIED: {root / 'audit.jsonl'}: {3 * SEGMENTS} line(s), 1 signed "
                     f"head(s), {SEGMENTS} receipt(s); 0 error(s), 0 note(s)"]


def test_the_signed_head_lists_the_highest_seq_stored_per_device(ingested: Path) -> None:
    (head,) = [json.loads(raw) for raw in (ingested / "audit.jsonl.heads").read_bytes()
               .splitlines()]
    assert head["stored"] == {DEVICE: SEGMENTS}
    assert head["head"] == line_hash(log_lines(ingested)[-1])


# -- tampering with the log ----------------------------------------------------------------------
def test_an_edited_line_is_found(root: Path) -> None:
    lines = log_lines(root)
    lines[4] = lines[4].replace(b'"seq":2', b'"seq":7')
    write_lines(root, lines)
    status, out = audit_verify(root)
    assert status == 1
    assert "ERROR link: line 6: prev does not match the SHA-256 of line 5: line 5 was edited" \
           in out[0], out
    assert out[-1].startswith("NOT VERIFIED")


def test_an_edited_last_line_contradicts_the_signed_head(root: Path) -> None:
    lines = log_lines(root)
    lines[-1] = lines[-1].replace(b'"seq":4', b'"seq":5')
    write_lines(root, lines)
    status, out = audit_verify(root)
    assert status == 1
    assert kinds(out) == ["edited"], out
    assert f"vouches for line {3 * SEGMENTS}, but no line of the log has that hash" in out[0]


def test_a_removed_last_line_is_found(root: Path) -> None:
    write_lines(root, log_lines(root)[:-1])
    status, out = audit_verify(root)
    assert status == 1
    assert kinds(out) == ["cut"], out
    assert (f"vouches for line {3 * SEGMENTS} " in out[0]
            and f"but the log ends at line {3 * SEGMENTS - 1}" in out[0]
            and "its last line(s) were removed" in out[0]), out


def test_a_cut_tail_is_found_by_a_receipt_even_without_the_signed_heads(root: Path) -> None:
    (root / "audit.jsonl.heads").unlink()
    write_lines(root, log_lines(root)[:-2])  # seq 4's segment_stored and receipt_issued
    status, out = audit_verify(root, "--receipts", root / "receipts.jsonl")
    assert status == 1
    assert kinds(out) == ["receipt-line-missing"], out
    assert f"{DEVICE} seq 4" in out[0] and "the line was edited or removed" in out[0]


def test_a_forged_appended_line_is_reported_as_unanchored(root: Path) -> None:
    """A line with a correct prev is indistinguishable by hashing: what verify can say is
    that nothing outside the file vouches for it."""
    head = json.loads((root / "audit.jsonl.heads").read_text())
    forged = {"time": "2026-03-01T09:00:00.000Z", "event": "decrypted", "actor": "anna",
              "prev": line_hash(log_lines(root)[-1]), "device_id": DEVICE, "seq": 9}
    with open(root / "audit.jsonl", "ab") as f:
        f.write(encode(forged) + b"\n")
    status, out = audit_verify(root)
    assert status == 0
    assert out[0] == (f"NOTE  unanchored: 1 line(s) after the last signed head at {head['time']} "
                      f"(line {3 * SEGMENTS}): nothing outside the file vouches for them yet, so "
                      f"a line forged and appended there, or one cut off the end, would not show")
    assert out[-1].startswith(f"VERIFIED UP TO LINE {3 * SEGMENTS}:")


def test_a_head_with_a_bad_signature_is_found(root: Path) -> None:
    head = json.loads((root / "audit.jsonl.heads").read_text())
    head["stored"] = {DEVICE: 2}
    (root / "audit.jsonl.heads").write_bytes(encode(head) + b"\n")
    status, out = audit_verify(root)
    assert status == 1
    assert kinds(out) == ["bad-head-signature"], out


def test_a_log_that_is_not_a_regular_file_is_refused_with_a_reason(root: Path) -> None:
    (root / "audit.jsonl").unlink()
    os.mkfifo(root / "audit.jsonl")  # opening it to read would block without O_NONBLOCK
    done = subprocess.run([sys.executable, "-m", "control_center.cli", "audit", "verify",
                           str(root / "audit.jsonl"), "--fleet", str(root / "fleet")],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "sos-center audit: audit.jsonl is a FIFO, not a regular file\n"


# -- the evidence store against the log ----------------------------------------------------------
def test_deleted_last_segments_are_found_through_the_signed_head_even_with_the_log_cut(
        root: Path) -> None:
    for path in (root / "evidence" / DEVICE).glob("000004.*"):
        path.unlink()
    write_lines(root, log_lines(root)[:-2])  # the log forgets seq 4 too
    status, out = evidence_verify(root)
    assert status == 1
    assert kinds(out) == ["audit-cut", "missing"], out
    assert any(f"that it had stored segments of {DEVICE} up to seq 4" in line
               and "segment(s) 4 are neither here nor in the audit log" in line for line in out)



# -- a chain that starts late --------------------------------------------------------------------
def partial_notes(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("NOTE  partial:")]


def test_a_late_start_is_explained_by_a_log_its_signed_heads_anchor(late: Path) -> None:
    status, out = evidence_verify(late)
    assert status == 0, out
    (note,) = partial_notes(out)
    assert f"audit.jsonl shows that the ingest never stored a segment of {DEVICE} before it" \
           in note and "vouched for by the last signed head at" in note, note
    assert out[-1].startswith("VERIFIED:")


def test_without_the_signed_heads_a_late_start_stays_incomplete(late: Path) -> None:
    """The log alone cannot say no earlier segment was stored: those lines could have been
    removed with the segments, and nothing outside the log would show it."""
    (late / "audit.jsonl.heads").unlink()
    status, out = evidence_verify(late)
    assert status == 3, out
    (note,) = partial_notes(out)
    assert "no signed head or receipt vouches for its line 2 (the first for tok-001)" in note
    assert out[-1].startswith("INCOMPLETE:")


# -- the ingest's signed heads -------------------------------------------------------------------
def signed_statements(heads: AuditHeads) -> tuple[list[dict[str, Any]], threading.Event]:
    """The statements `heads` signs from now on, and an event set at the first."""
    signed: list[dict[str, Any]] = []
    first = threading.Event()
    sign_now = heads.sign_now

    def recording() -> dict[str, Any] | None:
        statement = sign_now()
        if statement is not None:
            signed.append(statement)
            first.set()
        return statement

    heads.sign_now = recording  # type: ignore[method-assign]
    return signed, first


def test_an_idle_ingest_signs_the_lines_another_writer_appends(tmp_path: Path) -> None:
    """The timer runs from the server's start, not from its own first line: what
    `sos-evidence` appends while no device uploads is anchored within the interval too."""
    env = new_env(tmp_path, device=DEVICE)
    server = env.make()
    server.audit_heads.interval_s = 0.05
    signed, first = signed_statements(server.audit_heads)
    try:
        server.start()
        AuditLog(env.audit).append("decrypted", "operator anna", device_id=DEVICE, seq=1)
        assert first.wait(10), "no head signed while the ingest was idle"
        assert (signed[0]["lines"], signed[0]["head"]) == (1, line_hash(env.audit.read_bytes()))
    finally:
        stop_all(env)
