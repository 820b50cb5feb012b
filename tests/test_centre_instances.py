"""Two real `sos-center serve` processes in one group, one SIGKILLed mid-stream (issue 10).

A stopped instance must not hold alerts hostage: its session is clean, so the broker stops
routing to it the moment its connection dies, and what it had taken but not stored comes again
from the devices, for want of a receipt.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from control_center.store import Store
from firmware.uplink.delivery import DeliveryWaits
from firmware.uplink.mqtt import Delivered
from tests.links import QUICK, Link

ALERTS = 40


def centre_config(broker, tmp_path: Path, name: str) -> Path:
    """`centre.<name>`'s own identity and config, sharing one store with the other instance."""
    identity = broker.identity(f"centre.{name}", "centre")
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[center]\ndb = "{tmp_path / "shared.sqlite"}"\nfleet_dir = "{broker.fleet.directory}"\n'
        f'[broker]\nhost = "{identity.host}"\nport = {identity.port}\n'
        f'ca_file = "{identity.ca_file}"\ncert_file = "{identity.cert_file}"\n'
        f'key_file = "{identity.key_file}"\n')
    return path


class Serving:
    """One `sos-center serve` process and the alert lines it prints."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "control_center.cli", "--config", str(config), "serve"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert "sos-center serving" in self.lines.get(timeout=30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


def wait_for_broker_log(broker, text: str, timeout: float = 15.0) -> None:
    """The broker writes what it noticed to its log file; no event to wait on but the file."""
    deadline = time.monotonic() + timeout
    while text not in broker.log_file.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"the broker never logged {text!r}"
        time.sleep(0.05)


def test_a_centre_instance_killed_mid_stream_holds_no_alert_hostage(broker, tmp_path) -> None:
    instances = [Serving(centre_config(broker, tmp_path, name)) for name in ("a", "b")]
    streaming = Link(broker, tmp_path / "one.sqlite", "tok-001", waits=QUICK)
    # This device never sends twice within the test: each of its alerts must reach the living
    # instance on the first try, so none may be routed to the dead instance's session.
    once = Link(broker, tmp_path / "two.sqlite", "tok-002",
                waits=DeliveryWaits(first_wait_s=3600, unrouted_wait_s=3600))
    links = (streaming, once)
    try:
        for link in links:
            link.uplink.start()
        rows = {streaming: [streaming.raise_alert() for _ in range(ALERTS // 2)], once: []}
        instances[0].lines.get(timeout=30)  # instance a has stored an alert: it is in the stream
        instances[0].proc.kill()
        wait_for_broker_log(broker, "Client centre.a ")  # "closed its connection", "disconnected"
        rows[once] = [once.raise_alert() for _ in range(ALERTS // 2)]

        for link in links:
            delivered = {link.wait_for(Delivered, timeout=60).row.seq for _ in rows[link]}
            assert delivered == {row.seq for row in rows[link]}
            assert link.outbox.pending() == []
    finally:
        for link in links:
            link.close()
        for instance in instances:
            instance.stop()
    store = Store(tmp_path / "shared.sqlite")
    try:
        stored = [a.alert_id for a in store.alerts(open_only=False)]
    finally:
        store.close()
    sent = [json.loads(row.payload)["alert_id"] for link in links for row in rows[link]]
    assert sorted(stored) == sorted(sent)
