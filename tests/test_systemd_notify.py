"""The firmware's sd_notify: READY and WATCHDOG reach a real datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from firmware.systemd_notify import notify, watchdog_interval_s


def test_notify_sends_the_state_to_the_socket_systemd_gave(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("WATCHDOG=1")
        assert server.recv(64) == b"WATCHDOG=1"


def test_outside_systemd_notify_does_nothing(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_the_watchdog_is_pinged_at_half_its_interval(monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval_s() is None
