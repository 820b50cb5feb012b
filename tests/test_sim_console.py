"""`sos-sim run` with the operator console: the console's figures in `--json` (the page open in
headless Chromium, each alert's row timed), and `--console` keeping the run's centre and console
up for a person until Ctrl-C."""

from __future__ import annotations

import json
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from simulator.console_watch import why_not_here

BROWSER_MISSING = why_not_here()


@pytest.mark.skipif(BROWSER_MISSING is not None, reason=str(BROWSER_MISSING))
def test_json_reports_each_alerts_row_as_shown_in_the_browser() -> None:
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "run", "pillar-sos", "--json",
                           "--speed", "4"], capture_output=True, text=True, timeout=240)
    assert done.stdout, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"], result["problems"]
    console = result["console"]
    assert console["url"].startswith("https://localhost:")
    assert console["user"] == "operator"
    assert console["why_not"] is None and console["browser"].startswith("Chromium ")
    assert [row["alert_id"] for row in console["alerts"]] == \
        [alert["alert_id"] for alert in result["alerts"]]
    for row in console["alerts"]:
        assert row["stored_to_row_ms"] > 0
        assert row["pressed_to_row_ms"] > row["stored_to_row_ms"]  # the press came first


class Lines:
    """A process's stdout, line by line, from a reader thread (so the test can wait on it)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def read() -> None:
            for line in stdout:
                self._queue.put(line)
            self._queue.put(None)

        threading.Thread(target=read, daemon=True).start()

    def until(self, text: str, timeout: float = 120.0) -> str:
        """Read lines until one contains `text`; all of the output so far."""
        while True:
            line = self._queue.get(timeout=timeout)
            assert line is not None, "exited early:\n" + "".join(self.seen)
            self.seen.append(line)
            if text in line:
                return "".join(self.seen)

    def rest(self) -> str:
        while (line := self._queue.get(timeout=30)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def test_console_keeps_the_run_up_until_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "simulator.cli", "run", "pillar-sos",
                             "--speed", "4", "--console", "--no-browser",
                             "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(proc)
        shown = lines.until("until Ctrl-C")
        # the URL is on the timeline from the start (the setup entry `make sim` shows) ...
        setup = re.search(r"operator console on (https://localhost:\d+/) : log in as "
                          r"'operator', password '(\S+)'", shown)
        assert setup, shown
        url, password = setup.groups()
        # ... and again with the credentials once the result is printed
        assert re.search(rf"console:\s+{re.escape(url)}\s+user operator\s+password "
                         rf"{re.escape(password)}", shown), shown
        ca_file = re.search(r"fleet CA (\S+): trust", shown).group(1)
        assert Path(ca_file) == tmp_path / "broker" / "fleet" / "ca.pem"
        assert "OK:" in shown and proc.poll() is None

        context = ssl.create_default_context(cafile=ca_file)  # the run's CA, nothing else
        with urllib.request.urlopen(url + "login", context=context, timeout=10) as answer:
            assert answer.status == 200
            assert b"<form" in answer.read()
        login = urllib.request.Request(
            url + "api/login", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"username": "operator", "password": password}).encode())
        with urllib.request.urlopen(login, context=context, timeout=10) as answer:
            assert json.load(answer)["role"] == "operator"  # the printed password works

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        assert "SIGINT: stopping" in lines.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
