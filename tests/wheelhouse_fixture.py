"""A wheelhouse for THIS machine's platform, made once per test session the way `make flash`
makes the Pi's: so tests provision cards offline (`--wheelhouse`) and install them here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from control_center.fleet import Fleet


@pytest.fixture(scope="session")
def host_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NETWORK, once per session: `sos-provision --platform host` fetches this machine's wheels
    of every dependency (about 45 MB; from pip's cache when an earlier run fetched them)."""
    base = tmp_path_factory.mktemp("host-wheelhouse")
    fleet = Fleet.create(base / "fleet")
    card = base / "card"
    card.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "provisioning.cli", "--id", "tok-wheels-0001", "--profile",
         "token", "--target", str(card), "--fleet", str(fleet.directory), "--broker",
         "127.0.0.1:8883", "--platform", "host"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return card / "opt" / "sos-device" / "wheelhouse"
