"""`sos-sim run pillar-sos` sets up the voice call (issue 15, item 6): the pillar's microphone plays
an espeak-ng citizen, an operator on duty in headless Chromium (its fake microphone playing an
espeak-ng operator) answers at once, and each side's received sound must follow what the other
sent (energy envelope correlation >= 0.8 after alignment, simulator/audio_compare.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.console_watch import why_not_here

BROWSER_MISSING = why_not_here() or (None if shutil.which("espeak-ng") else
                                     "espeak-ng not installed (make sysdeps)")
HEARD = 0.8  # the bar
CONNECTED_WITHIN_MS = 5000.0


@pytest.mark.skipif(BROWSER_MISSING is not None, reason=str(BROWSER_MISSING))
def test_the_operator_on_duty_answers_the_pillar_and_each_side_hears_the_other(
        tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "run", "pillar-sos", "--json",
                           "--speed", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.stdout, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"], result["problems"]  # the claimed alert was still closed as before
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
    assert (tmp_path / "voices" / f"{short}-operator-heard.wav").stat().st_size > 48_000
    assert (tmp_path / "voices" / f"{short}-caller-heard.wav").stat().st_size > 48_000
