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


HEARD = 0.8  # the voice issue's bar: the received envelope follows the sent one this well
CONNECTED_WITHIN_MS = 5000.0
needs_browser = pytest.mark.skipif(BROWSER_MISSING is not None, reason=str(BROWSER_MISSING))


@pytest.fixture(scope="module")
def pillar_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One `sos-sim run pillar-sos --json` with the console open in Chromium and an operator
    on duty answering by voice; the tests below read different parts of its result."""
    out = tmp_path_factory.mktemp("pillar-sos")
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "run", "pillar-sos", "--json",
                           "--speed", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.stdout, done.stderr
    return json.loads(done.stdout), out


@needs_browser
def test_the_pillar_scenario_ends_with_its_alert_stored_once_and_acknowledged(
        pillar_run: tuple[dict, Path]) -> None:
    result, _ = pillar_run
    assert result["ok"], result["problems"]
    (alert,) = result["alerts"]
    assert alert["feedback"][:3] == ["sending", "delivered", "acknowledged"]
    assert alert["latency_ms"] > 0 and alert["ack_latency_ms"] > 0
    assert (alert["device_kind"], alert["position_source"]) == ("pillar", "surveyed")


@needs_browser
def test_the_operator_on_duty_answers_the_pillar_and_each_side_hears_the_other(
        pillar_run: tuple[dict, Path]) -> None:
    """`sos-sim run pillar-sos` sets up the voice call: the pillar's microphone plays an
    espeak-ng citizen, an operator on duty in headless Chromium (its fake microphone playing an
    espeak-ng operator) answers at once, and each side's received sound must follow what the
    other sent (energy envelope correlation >= 0.8 after alignment)."""
    result, out = pillar_run
    console = result["console"]
    assert console["why_not"] is None and console["voice_why_not"] is None
    (row,) = console["alerts"]
    voice = row["voice"]
    assert voice["error"] is None
    assert 0 < voice["answered_to_connected_ms"] < voice["pressed_to_connected_ms"] \
        <= CONNECTED_WITHIN_MS
    assert voice["operator_heard_caller_r"] >= HEARD, voice
    assert voice["caller_heard_operator_r"] >= HEARD, voice
    (alert,) = result["alerts"]
    assert alert["decisions"] == {"ack": "applied", "voice_offer": "applied", "close": "applied"}
    short = row["alert_id"][:8]  # what each side heard, kept for a person to listen to
    assert (out / "voices" / f"{short}-operator-heard.wav").stat().st_size > 48_000
    assert (out / "voices" / f"{short}-caller-heard.wav").stat().st_size > 48_000


@needs_browser
def test_json_reports_each_alerts_row_as_shown_in_the_browser(
        pillar_run: tuple[dict, Path]) -> None:
    result, _ = pillar_run
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
