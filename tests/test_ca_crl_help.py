"""`sos-center ca crl`: the help says how long the CRL it writes is valid, and that is true."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509


def ca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "control_center.cli", "ca", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SOS_CENTER_CONFIG": "/nonexistent/center.toml"})


def test_the_help_says_ten_years_not_30_days() -> None:
    for help_text in (ca("crl", "--help").stdout, ca("--help").stdout):
        text = " ".join(help_text.split())
        assert "ten years" in text and "30 days" not in text


def test_the_crl_it_writes_is_valid_for_ten_years(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    assert ca("init", "--fleet", str(fleet)).returncode == 0
    assert ca("crl", "--fleet", str(fleet)).returncode == 0
    crl = x509.load_pem_x509_crl((fleet / "crl.pem").read_bytes())
    valid = crl.next_update_utc - crl.last_update_utc
    assert dt.timedelta(days=3649) <= valid <= dt.timedelta(days=3651)
