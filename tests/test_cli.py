"""The commands answer --help with what they do."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("module", "words"), [
    ("firmware.cli", ["run", "check-config", "selftest", "upload"]),
    ("simulator.cli", ["run", "list"]),
    ("control_center.cli", ["serve", "alerts", "ack", "close", "ca"]),
    ("control_center.evidence_cli", ["verify", "decrypt", "export"]),
    ("provisioning.cli", ["--id", "--profile", "--target", "--fleet", "--broker"]),
])
def test_help_lists_the_commands(module: str, words: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for word in words:
        assert word in done.stdout


def test_sos_sim_run_help_describes_json_and_speed() -> None:
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "run", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert "--json" in done.stdout and "--speed" in done.stdout
