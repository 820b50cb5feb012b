"""`sos-device upload --now` as a real process, SIGKILLed in the middle of an upload and started
again: it resumes where the server's durable offset stands, resends at most one chunk, and every
segment ends up at the centre with a receipt and gone from the card."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from control_center.audit import AuditLog, verify_log
from control_center.evidence import keys_from_fleet, verify_directory
from control_center.ingest import DirectoryStore, IngestServer
from firmware.camera.store import SegmentStore
from protocol.signing import load_or_make_key
from simulator.broker import HOST, PrivateBroker
from simulator.device_config import render_device_toml
from tests.test_uploader import Camera

DEVICE = "tok-kill-01"
CHUNK = 64 * 1024
SEGMENT_PLAINTEXT = 3 * 2**20  # 48 chunks each: a kill lands inside a segment


class Audit:
    """The ingest's audit entries as they happen, to wait on."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self._changed = threading.Condition()

    def __call__(self, entry: dict) -> None:
        with self._changed:
            self.entries.append(entry)
            self._changed.notify_all()

    def wait_for(self, event: str, count: int, timeout: float = 30.0) -> None:
        with self._changed:
            done = self._changed.wait_for(
                lambda: sum(e["event"] == event for e in self.entries) >= count, timeout)
        assert done, f"no {count} x {event} within {timeout} s: {self.entries}"


def upload_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "firmware.cli", "--config", str(config), "upload", "--now"]


def test_a_killed_upload_resumes_after_a_restart_and_resends_at_most_one_chunk(
        tmp_path: Path) -> None:
    broker = PrivateBroker(tmp_path / "broker")  # its fleet and identities; no broker needed
    fleet = broker.fleet
    server_cert = fleet.issue_server("ingest", [HOST, "localhost"])
    audit = Audit()
    server = IngestServer(fleet, DirectoryStore(tmp_path / "evidence"),
                          AuditLog(tmp_path / "audit.jsonl"), workdir=tmp_path / "ingest",
                          cert_file=server_cert.cert_file, key_file=server_cert.key_file,
                          host=HOST, on_event=audit)
    server.start()
    try:
        data = tmp_path / "device" / "data"
        text = render_device_toml(device_id=DEVICE, profile="token", data_dir=data,
                                  broker=broker, surveyed={"lat": 52.0, "lon": 4.0},
                                  camera=True, upload_url=server.url)
        text = text.replace(f'url = "{server.url}"', f'url = "{server.url}"\n'
                            f"chunk_bytes = {CHUNK}")
        config = tmp_path / "device" / "device.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(text)
        store = SegmentStore(data / "recordings")
        camera = Camera(store, load_or_make_key(broker.signing_key_file(DEVICE)),
                        fleet.evidence_recipients()[0], device_id=DEVICE)
        seqs = [camera.record(SEGMENT_PLAINTEXT) for _ in range(3)]
        store.close()

        first = subprocess.Popen(upload_command(config), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        audit.wait_for("segment_stored", 1)  # one segment done, the next one under way
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        stored_before = sum(e["event"] == "segment_stored" for e in audit.entries)
        assert stored_before < len(seqs), "the kill came after the whole upload: proved nothing"

        second = subprocess.run(upload_command(config), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        resent = int(second.stdout.split("resent ")[1].split(" bytes")[0])
        assert resent <= CHUNK, second.stdout
        assert "nothing left to upload" in second.stdout
    finally:
        server.stop()
    card = SegmentStore(data / "recordings")
    assert card.segments() == [] and not list((data / "recordings").glob("*.ts.age"))
    card.close()
    receipts = (data / "receipts.jsonl").read_text().splitlines()
    assert sorted({int(line.split('"seq":')[1].split(",")[0]) for line in receipts}) == seqs
    report = verify_directory(tmp_path / "evidence" / DEVICE, keys_from_fleet(fleet.directory))
    assert report.ok, report.summary()
    assert verify_log(tmp_path / "audit.jsonl") == []
