"""Virtual device processes and the log of everything that happened in a run."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from firmware.uplink.upload_plan import Progress, render_bar


@dataclass(frozen=True)
class Entry:
    wall: float
    source: str  # a device id, "centre", "operator" or "sim"
    kind: str  # "trigger", "feedback", "link", "button", "alert", "ack", "close", ...
    text: str
    data: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Thread-safe, append-only run log that tests and the runner can wait on."""

    def __init__(self, on_entry: Callable[[Entry], None] | None = None) -> None:
        self.entries: list[Entry] = []
        self._cond = threading.Condition()
        self._on_entry = on_entry

    def add(self, source: str, kind: str, text: str, wall: float | None = None,
            **data: Any) -> Entry:
        entry = Entry(wall if wall is not None else time.time(), source, kind, text, data)
        with self._cond:
            self.entries.append(entry)
            self._cond.notify_all()
        if self._on_entry:
            self._on_entry(entry)
        return entry

    def wait_for(self, predicate: Callable[[list[Entry]], object], timeout: float) -> bool:
        with self._cond:
            return bool(self._cond.wait_for(lambda: predicate(self.entries), timeout))

    def find(self, **match: Any) -> list[Entry]:
        with self._cond:
            entries = list(self.entries)
        return [e for e in entries
                if all(getattr(e, k, e.data.get(k)) == v for k, v in match.items())]


class DeviceProcess:
    """`python -m simulator.virtual_device` for one device; can be killed and started again."""

    def __init__(self, device_id: str, config: Path, log_file: Path, recorder: Recorder,
                 battery: float | None, gps_port: str | None = None) -> None:
        self.device_id = device_id
        self.config = config
        self.log_file = log_file
        self.recorder = recorder
        self.battery = battery
        self.gps_port = gps_port  # overrides the config's port: the simulator's pty
        self.starts = 0
        self._proc: subprocess.Popen[str] | None = None
        self._log: TextIO | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        cmd = [sys.executable, "-m", "simulator.virtual_device", "--config", str(self.config)]
        if self.battery is not None:
            cmd += ["--battery", str(self.battery)]
        if self.gps_port is not None:
            cmd += ["--gps-port", self.gps_port]
        self._log = self.log_file.open("a")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, bufsize=1)
        self.starts += 1
        threading.Thread(target=self._read, args=(self._proc, self.starts), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str], run: int) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = event.pop("ev")
            wall = event.pop("wall")
            self.recorder.add(self.device_id, kind, _describe(kind, event), wall=wall, run=run,
                              **event)

    def send(self, order: dict[str, Any]) -> None:
        if not self.running or self._proc is None or self._proc.stdin is None:
            raise RuntimeError(f"device {self.device_id} is not running")
        self._proc.stdin.write(json.dumps(order) + "\n")
        self._proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL: no clean-up runs, exactly like a crash or a pulled battery."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
            self._close_log()

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None


def _describe(kind: str, event: dict[str, Any]) -> str:
    match kind:
        case "ready":
            pending = event.get("pending", 0)
            return "process started" + (f", {pending} message(s) in its outbox" if pending else "")
        case "link":
            return "connected to the broker" if event["up"] else "lost the broker"
        case "trigger":
            return "SOS recognised by the button logic"
        case "feedback":
            return f"feedback: {event['state'].upper()}"
        case "button":
            if event["op"] == "press":
                return f"button pressed for {event['hold_s']} s (with contact bounce)"
            return "cancel gesture on the button"
        case "dock":
            return "docked at the station" if event["docked"] else "taken off the dock"
        case "upload_started":
            return "upload started"
        case "upload_progress":
            return "upload " + render_bar(Progress(
                event["segments_total"], event["bytes_total"], event["segments_done"],
                event["bytes_done"]))
        case "upload":
            text = (f"upload pass done: {len(event['uploaded'])} segment(s) receipted, "
                    f"{event['bytes_sent'] / 1e6:.1f} MB sent ({event['bytes_resent']} B resent)")
            if event["refused"]:
                text += f", REFUSED {sorted(event['refused'])}"
            if event["remaining"]:
                text += f", {event['remaining']} left for later"
            return text
        case "segment":
            return f"segment {event['seq']:06d} closed"
    return kind
