"""`sos-center serve | alerts | ack | close` as an operator runs them, against a real broker."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from protocol import MessageKind, Topics, encode
from protocol.signing import load_or_make_key
from tests.helpers import RawClient, alert_message, device_signer
from tests.test_device_process import Device


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


def next_line(lines: queue.Queue[str], prefix: str, timeout: float = 20.0) -> str:
    """The next line `serve` printed that starts with `prefix` (others are skipped)."""
    while not (line := lines.get(timeout=timeout)).startswith(prefix):
        pass
    return line


@pytest.fixture
def token(broker, tmp_path: Path):
    """A real device process (the firmware on virtual hardware), connected."""
    device = Device(broker, tmp_path, "tok-777")
    device.start()
    device.wait_kind("link", up=True)
    yield device
    device.close()


def raise_sos(token: Device, serving: queue.Queue[str]) -> str:
    """Hold SOS on the token until `serve` prints the alert; its id."""
    token.press(1.7)
    line = next_line(serving, "SOS ")
    assert "tok-777" in line
    return line.rsplit("id ", 1)[1].strip()


def test_serve_prints_one_line_per_new_alert_and_ack_says_the_device_applied_it(
        config, serving, token) -> None:
    alert_id = raise_sos(token, serving)
    listed = sos_center(config, "alerts")
    assert alert_id in listed.stdout and "open" in listed.stdout

    acked = sos_center(config, "ack", alert_id[:6])
    assert acked.returncode == 0, acked.stderr
    assert acked.stdout.strip() == f"{alert_id} ack: applied"
    token.wait_kind("feedback", state="acknowledged")
    assert "acknowledged" in sos_center(config, "alerts").stdout


def test_ack_with_a_key_the_device_does_not_trust_says_rejected_and_why(
        broker, config, serving, token, tmp_path: Path) -> None:
    """A centre key enrolled after the device was set up: the fleet trusts it, the device's
    trust.centre_keys do not hold it yet."""
    alert_id = raise_sos(token, serving)
    broker.identity("centre.late", "centre")
    late = tmp_path / "late.toml"
    late.write_text(config.read_text().replace(
        "[broker]", f'signing_key = "{broker.signing_key_file("centre.late")}"\n[broker]'))
    done = sos_center(late, "ack", alert_id)
    assert (done.returncode, done.stdout.strip()) == (1, f"{alert_id} ack: rejected: "
                                                         "bad_signature")
    assert f"of alert {alert_id} by tok-777: bad_signature" in next_line(serving, "REJECTED ack ")
    assert "acknowledged" not in token.feedback()


def test_ack_without_an_answer_says_it_stays_pending(broker, config, serving) -> None:
    device = RawClient(broker.identity("tok-778"), "tok-778")  # takes commands, answers none
    try:
        device.subscribe(Topics("tok-778").command)
        message = device_signer(broker, "tok-778").sign(alert_message(device_id="tok-778"))
        device.publish(Topics("tok-778").alert, encode(MessageKind.ALERT, message))
        next_line(serving, "SOS ")
        done = sos_center(config, "close", message["alert_id"], "--wait", "0.5")
        assert done.returncode == 3
        assert done.stdout.strip() == (f"{message['alert_id'][:8]} close: no answer from the "
                                       "device yet; it stays pending and is sent again when the "
                                       "device reports back")
    finally:
        device.close()


def test_a_signing_key_the_fleet_does_not_trust_is_refused_at_start(
        broker, config, tmp_path: Path) -> None:
    key = tmp_path / "stranger.key"
    load_or_make_key(key)
    stranger = tmp_path / "stranger.toml"
    stranger.write_text(config.read_text().replace("[broker]",
                                                   f'signing_key = "{key}"\n[broker]'))
    done = sos_center(stranger, "serve")
    assert done.returncode == 2
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("config error:")]
    assert str(key) in line and "sos-center ca sign --kind centre --signing-key" in line


def test_ack_of_an_unknown_alert_says_so(config) -> None:
    done = sos_center(config, "ack", "deadbeef")
    assert done.returncode == 2 and "no alert 'deadbeef'" in done.stderr


def test_a_config_missing_a_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "center.toml"
    path.write_text('[center]\ndb = "x.sqlite"\nfleet_dir = "f"\n[broker]\nhost = "h"\n'
                    'ca_file = "ca.pem"\n')
    done = sos_center(path, "alerts")
    assert done.returncode == 2 and "missing key 'broker.port'" in done.stderr


@pytest.mark.parametrize(("key", "value"), [("group", "sos/+"), ("group", "#"),
                                            ("group", "a/b")])
def test_a_group_the_broker_cannot_use_is_refused_at_load(tmp_path: Path, key: str,
                                                          value: str) -> None:
    """A wildcard or '/' in the group makes a shared subscription that matches something else,
    or nothing. (`center.client_id` is refused whatever its value: tests/test_config_schema.py.)"""
    path = tmp_path / "center.toml"
    path.write_text(f'[center]\ndb = "x.sqlite"\nfleet_dir = "f"\n{key} = "{value}"\n'
                    '[broker]\nhost = "h"\nport = 8883\nca_file = "ca.pem"\n')
    done = sos_center(path, "alerts")
    assert done.returncode == 2
    assert f"key 'center.{key}'" in done.stderr
