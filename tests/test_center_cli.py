"""`sos-center serve | alerts | ack | close` as an operator runs them, against a real broker."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from protocol import MessageKind, Topics, encode
from tests.helpers import RawClient, alert_message, device_signer


@pytest.fixture
def config(broker, tmp_path: Path) -> Path:
    path = tmp_path / "center.toml"
    b = broker.centre
    path.write_text(f'[center]\ndb = "{tmp_path / "center.sqlite"}"\noperator = "op-cli"\n'
                    f'fleet_dir = "{broker.fleet.directory}"\n'
                    f'[broker]\nhost = "{b.host}"\nport = {b.port}\nca_file = "{b.ca_file}"\n'
                    f'cert_file = "{b.cert_file}"\nkey_file = "{b.key_file}"\n')
    return path


def sos_center(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "control_center.cli", "--config", str(config),
                           *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def serving(config: Path):
    proc = subprocess.Popen([sys.executable, "-m", "control_center.cli", "--config", str(config),
                             "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    assert "sos-center serving" in lines.get(timeout=20)
    yield lines
    proc.terminate()
    proc.wait(timeout=10)


def test_serve_prints_one_line_per_new_alert_and_ack_reaches_the_device(broker, config,
                                                                       serving) -> None:
    device = RawClient(broker.identity("tok-777"), "tok-777")
    try:
        device.subscribe(Topics("tok-777").command)
        message = device_signer(broker, "tok-777").sign(alert_message(device_id="tok-777"))
        device.publish(Topics("tok-777").alert, encode(MessageKind.ALERT, message))
        line = serving.get(timeout=20)
        assert line.startswith("SOS ") and "tok-777" in line and message["alert_id"][:8] in line

        listed = sos_center(config, "alerts")
        assert message["alert_id"][:8] in listed.stdout and "open" in listed.stdout

        acked = sos_center(config, "ack", message["alert_id"][:6])
        assert acked.returncode == 0, acked.stderr
        received = [json.loads(p) for _, p in device.wait_messages(2)]  # receipt, then ack
        (command,) = [m for m in received if m["type"] != "delivered"]
        assert (command["type"], command["operator"]) == ("ack", "op-cli")
        assert "acknowledged" in sos_center(config, "alerts").stdout
    finally:
        device.close()


def test_ack_of_an_unknown_alert_says_so(config) -> None:
    done = sos_center(config, "ack", "deadbeef")
    assert done.returncode == 2 and "no alert 'deadbeef'" in done.stderr


def test_a_config_missing_a_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "center.toml"
    path.write_text('[center]\ndb = "x.sqlite"\nfleet_dir = "f"\n[broker]\nhost = "h"\n'
                    'ca_file = "ca.pem"\n')
    done = sos_center(path, "alerts")
    assert done.returncode == 2 and "missing key 'broker.port'" in done.stderr


@pytest.mark.parametrize(("key", "value"), [("client_id", ""), ("group", "sos/+"),
                                            ("group", "#"), ("client_id", "a b")])
def test_a_client_id_or_group_the_broker_cannot_use_is_refused_at_load(tmp_path: Path, key: str,
                                                                       value: str) -> None:
    """An empty client id makes the broker invent one (an orphan session); a wildcard or '/' in
    the group makes a shared subscription that matches something else, or nothing."""
    path = tmp_path / "center.toml"
    path.write_text(f'[center]\ndb = "x.sqlite"\nfleet_dir = "f"\n{key} = "{value}"\n'
                    '[broker]\nhost = "h"\nport = 8883\nca_file = "ca.pem"\n')
    done = sos_center(path, "alerts")
    assert done.returncode == 2
    assert f"key 'center.{key}'" in done.stderr
