"""The hash-chained audit log: what it writes, and what `verify_log` finds."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center import audit
from control_center.audit import (
    LINE_LIMITS,
    AuditHeads,
    AuditLog,
    check_audit,
    entry_hash,
    line_hash,
    verify_log,
)
from protocol.signing import Signer, public_key_from_b64, verify

T = TypeVar("T")
MiB = 1 << 20


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def write_log(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    for seq in range(1, n + 1):
        log.append("segment_stored", "tok-001", device_id="tok-001", seq=seq, sha256="ab" * 32)
    return log


def test_an_entry_carries_time_event_actor_prev_and_its_fields(tmp_path: Path) -> None:
    entry = AuditLog(tmp_path / "audit.jsonl").append("exported", "operator anna",
                                                      device_id="tok-001", call_id="call-17")
    assert entry["event"] == "exported" and entry["actor"] == "operator anna"
    assert entry["prev"] is None and entry["call_id"] == "call-17"
    assert entry["time"].endswith("Z")
    assert json.loads((tmp_path / "audit.jsonl").read_text()) == entry


def test_each_line_names_the_hash_of_the_line_before(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    lines = lines_of(path)
    assert [json.loads(line)["prev"] for line in lines] == [
        None, line_hash(lines[0].encode()), line_hash(lines[1].encode())]


def test_a_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2).close()
    AuditLog(path).append("decrypted", "operator anna", device_id="tok-001", seq=1)
    assert verify_log(path) == []
    assert len(lines_of(path)) == 3


def test_appends_from_many_threads_form_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)

    def work(n: int) -> None:
        for i in range(50):
            log.append("upload_created", f"tok-{n:03d}", seq=i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lines_of(path)) == 400
    assert verify_log(path) == []


def test_two_processes_appending_to_one_log_form_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    script = ("import sys; from control_center.audit import AuditLog; log = AuditLog(sys.argv[1])"
              "\nfor i in range(100): log.append('decrypted', sys.argv[2], seq=i)")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), name])
             for name in ("operator a", "operator b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert len(lines_of(path)) == 200
    assert verify_log(path) == []


def test_verify_log_finds_an_edited_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = lines_of(path)
    lines[2] = lines[2].replace('"seq":3', '"seq":4')
    path.write_text("".join(lines))
    assert verify_log(path) == [
        "line 4: prev does not match the SHA-256 of line 3: line 3 was edited, or lines were "
        "deleted, inserted or moved here"]


def test_verify_log_finds_a_deleted_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = lines_of(path)
    del lines[1]
    path.write_text("".join(lines))
    assert [p.split(":")[0] for p in verify_log(path)] == ["line 2"]


def test_verify_log_finds_reordered_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = lines_of(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))
    assert [p.split(":")[0] for p in verify_log(path)] == ["line 2", "line 3", "line 4"]


def test_verify_log_finds_the_beginning_deleted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    path.write_text("".join(lines_of(path)[1:]))
    assert verify_log(path) == ["line 1: it names a predecessor, so the lines before it were "
                                "deleted"]


def test_a_line_torn_by_a_crash_is_reported_and_the_chain_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2).close()
    with open(path, "a") as f:
        f.write('{"event":"segment_sto')  # power lost mid-write
    AuditLog(path).append("segment_stored", "tok-001", seq=3)
    assert verify_log(path) == ["line 3: not JSON"]


@pytest.mark.parametrize("field", ["time", "prev"])
def test_reserved_names_cannot_be_fields(tmp_path: Path, field: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        AuditLog(tmp_path / "audit.jsonl").append("exported", "anna", **{field: "x"})


def test_an_event_name_is_a_lower_case_word(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lower-case word"):
        AuditLog(tmp_path / "audit.jsonl").append("Segment Stored", "anna")


def test_an_entry_hash_is_the_hash_of_the_line_written_for_it(tmp_path: Path) -> None:
    entry = AuditLog(tmp_path / "audit.jsonl").append("receipt_issued", "tok-001", seq=1)
    assert entry_hash(entry) == line_hash((tmp_path / "audit.jsonl").read_bytes())


def test_a_deeply_nested_line_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 1).close()
    with open(path, "ab") as f:
        f.write(b"[" * 50_000 + b"]" * 50_000 + b"\n")
    assert verify_log(path) == ["line 2: nested 50000 deep, over the limit of 16"]


def peak_memory(work: Callable[[], T]) -> tuple[T, int]:
    """What `work()` returns, and the most memory Python held for it at once (bytes)."""
    tracemalloc.start()
    try:
        return work(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_line_over_the_size_limit_is_a_finding_read_in_bounded_memory(tmp_path: Path) -> None:
    """A hostile log with megabytes (or gigabytes) and no newline: reported, never held."""
    path = tmp_path / "audit.jsonl"
    write_log(path, 1).close()
    long = b"a" * (LINE_LIMITS.max_bytes + 4 * MiB)
    with open(path, "ab") as f:
        f.write(long + b"\n")
    AuditLog(path).append("decrypted", "operator anna", seq=3)  # chained to the long line
    problems, peak = peak_memory(lambda: verify_log(path))
    assert problems == [f"line 2: {len(long)} bytes is over the size limit of "
                        f"{LINE_LIMITS.max_bytes} for one line; not read"]
    assert peak < 3 * LINE_LIMITS.max_bytes < len(long)


# -- signed heads --------------------------------------------------------------------------------
def statements(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_closing_the_head_signer_signs_the_newest_line(tmp_path: Path) -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    log = write_log(tmp_path / "audit.jsonl", 3)
    heads = AuditHeads(log, signer)
    log.append("segment_stored", "tok-002", device_id="tok-002", seq=7)
    heads.close()
    (head,) = statements(tmp_path / "audit.jsonl.heads")
    verify(head, [public_key_from_b64(signer.public_key_b64)])
    assert {k: head[k] for k in ("type", "lines", "bytes", "head", "stored")} == {
        "type": "audit_head", "lines": 4, "bytes": (tmp_path / "audit.jsonl").stat().st_size,
        "head": line_hash(lines_of(tmp_path / "audit.jsonl")[-1].encode()),
        "stored": {"tok-001": 3, "tok-002": 7}}


def test_a_head_is_signed_every_n_appends_without_waiting_for_the_interval(
        tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    heads = AuditHeads(log, Signer(Ed25519PrivateKey.generate()), interval_s=3600,
                       every_lines=3)
    signed = Attempts(heads, "sign_now")
    for seq in range(3):
        log.append("upload_created", "tok-001", seq=seq)
    assert signed.wait(1), "no head signed after 3 appends"
    heads.close()
    assert [s["lines"] for s in statements(tmp_path / "audit.jsonl.heads")] == [3]


def test_a_new_head_signer_continues_from_the_last_signed_head(tmp_path: Path) -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    log = write_log(tmp_path / "audit.jsonl", 2)
    AuditHeads(log, signer).close()
    heads = AuditHeads(log, signer)  # a restarted ingest server
    log.append("segment_stored", "tok-009", device_id="tok-009", seq=1)
    heads.close()
    assert [(s["lines"], s["stored"]) for s in statements(tmp_path / "audit.jsonl.heads")] == [
        (2, {"tok-001": 2}), (3, {"tok-009": 1})]


def test_an_over_long_line_in_the_heads_file_is_a_bad_head_read_in_bounded_memory(
        tmp_path: Path) -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    log = write_log(tmp_path / "audit.jsonl", 2)
    AuditHeads(log, signer).close()
    with open(tmp_path / "audit.jsonl.heads", "ab") as f:
        f.write(b"{" * (5 * MiB))  # no newline

    def reopen_and_check() -> list[str]:
        AuditHeads(log, signer).close()  # what a restarted ingest server does first
        check = check_audit(tmp_path / "audit.jsonl", [public_key_from_b64(
            signer.public_key_b64)])
        return [f.kind for f in check.findings]

    kinds, peak = peak_memory(reopen_and_check)
    assert kinds == ["bad-head"]
    assert peak < 3 * MiB


class Attempts:
    """Counts calls of a wrapped method; `wait(n)` until there have been n."""

    def __init__(self, owner: Any, name: str) -> None:
        self.count = 0
        self._cond = threading.Condition()
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                with self._cond:
                    self.count += 1
                    self._cond.notify_all()

        setattr(owner, name, counted)

    def wait(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= n, timeout)


def test_a_head_that_cannot_be_written_is_logged_once_and_not_retried_before_the_interval(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    (tmp_path / "heads").mkdir()  # the heads file cannot be written
    heads = AuditHeads(log, Signer(Ed25519PrivateKey.generate()), path=tmp_path / "heads",
                       interval_s=3600, every_lines=1)
    attempts = Attempts(heads, "sign_now")
    with caplog.at_level(logging.ERROR, logger="control_center.audit"):
        log.append("upload_created", "tok-001", seq=1)  # due at once: every_lines=1
        assert attempts.wait(1)
        for seq in range(2, 6):  # due again by count, but after a failure it waits
            log.append("upload_created", "tok-001", seq=seq)
        heads.close()  # stops the timer, and tries once more
    assert attempts.count == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"audit: cannot sign the head of {tmp_path / 'audit.jsonl'} into {tmp_path / 'heads'}; "
        f"trying again every 3600 s"]


def test_the_log_is_fsynced_before_its_head_is_signed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines written without their own fsync: the signed head must not name bytes a power
    cut could take."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    heads = AuditHeads(log, Signer(Ed25519PrivateKey.generate()), interval_s=3600)
    for seq in range(3):
        log.append("upload_created", "tok-001", durable=False, seq=seq)
    synced: list[int] = []  # inode of each file fsynced, in order
    fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        fsync(fd)

    monkeypatch.setattr(audit.os, "fsync", spy)
    assert heads.sign_now() is not None
    monkeypatch.undo()
    heads.close()
    assert synced == [path.stat().st_ino, (tmp_path / "audit.jsonl.heads").stat().st_ino]
