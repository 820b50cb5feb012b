"""The hash-chained audit log: what it writes, and what `verify_log` finds."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from control_center.audit import AuditLog, line_hash, verify_log


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
