"""A partner control centre written in JavaScript takes a real device's SOS through its life.

The receiver (tests/interop/receiver.mjs) knows only docs/PROTOCOL.md, the JSON Schemas, the
fleet registry and npm packages: if it can validate and verify what the Python device sends, and
the device accepts its receipt and commands, the protocol is implementable from its documents.
Node also re-makes the signed bytes (RFC 8785) of Python-signed messages where Python's own JSON
differs from JavaScript's. `make test` installs its packages (`npm ci --prefix tests/interop`).
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.signing import Signer, legacy_canonical
from simulator.broker import PrivateBroker
from tests.test_device_process import Device

ROOT = Path(__file__).resolve().parent.parent
INTEROP = ROOT / "tests" / "interop"
SCHEMAS = ROOT / "protocol" / "schemas"
PARTNER = "centre.partner"
TIMEOUT_S = 30.0


def node() -> str:
    found = shutil.which("node")
    if found is None or not (INTEROP / "node_modules").is_dir():
        pytest.fail("the interop tests need Node.js and tests/interop's packages: run "
                    "`make test`, or `npm ci --prefix tests/interop`")
    return found


class NodeReceiver:
    """`node tests/interop/receiver.mjs CONFIG` with its JSON lines, waitable one step at a time."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        config_file = workdir / "receiver.json"
        config_file.write_text(json.dumps(config, indent=2))
        self.steps: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.process = subprocess.Popen([node(), str(INTEROP / "receiver.mjs"), str(config_file)],
                                        cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)  # the script exited

    def wait_for(self, step: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        """The first line of `step` not yet seen; fails on the script's exit or its `failed`."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no '{step}' from the receiver within {timeout} s: {self.steps}")
            if line is None:
                pytest.fail(f"the receiver exited ({self.process.wait()}) before '{step}': "
                            f"{self.steps}\n{self.stderr()}")
            self.steps.append(line)
            if line["step"] == "failed":
                pytest.fail(f"the receiver failed: {line['error']}")
            if line["step"] == step:
                return line

    def stderr(self) -> str:
        return self.process.stderr.read() if self.process.stderr else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def enrol_partner(broker: PrivateBroker, directory: Path) -> None:
    """What an integrator's centre gets from the fleet operator: a certificate for its own
    `centre.<name>` and its own command-signing key in the registry, told to the broker."""
    broker.fleet.enrol_local(PARTNER, "centre", directory)
    broker.sync()


def receiver_config(broker: PrivateBroker, partner: Path, device_id: str) -> dict[str, Any]:
    return {"host": broker.centre.host, "port": broker.port,
            "ca_file": str(broker.ca.cert_file), "cert_file": str(partner / "identity.pem"),
            "key_file": str(partner / "identity.key"),
            "signing_key_file": str(partner / "signing.key"),
            "schemas_dir": str(SCHEMAS), "registry_file": str(broker.fleet.registry_file),
            "device_id": device_id, "group": "partner", "timeout_s": TIMEOUT_S}


def test_a_node_partner_centre_receipts_acknowledges_and_closes_a_real_devices_sos(
        broker: PrivateBroker, tmp_path: Path) -> None:
    partner = tmp_path / "partner"
    enrol_partner(broker, partner)
    # Rendered after the enrolment, so the device's trust.centre_keys holds the partner's key.
    device = Device(broker, tmp_path, "tok-interop-01")
    partner_key = broker.fleet.active(PARTNER).signing_key
    assert partner_key in (tmp_path / device.id / "device.toml").read_text()
    device.start()
    receiver = NodeReceiver(receiver_config(broker, partner, device.id), tmp_path)
    try:
        device.wait_kind("link", up=True)
        assert receiver.wait_for("connected")["identity"] == PARTNER
        receiver.wait_for("subscribed")

        device.press(1.7)

        alert = receiver.wait_for("alert_verified")
        (trigger,) = device.recorder.find(kind="trigger")
        assert (alert["device_id"], alert["alert_id"]) == (device.id, trigger.data["alert_id"])
        receipt = receiver.wait_for("receipt_sent")
        assert (receipt["message"], receipt["seq"]) == ("alert", alert["seq"])
        ack = receiver.wait_for("ack_applied")
        close = receiver.wait_for("close_applied")
        assert ack["alert_id"] == close["alert_id"] == alert["alert_id"]
        receiver.wait_for("done")
        assert receiver.process.wait(timeout=TIMEOUT_S) == 0

        device.wait_kind("feedback", state="closed")
        shown = device.feedback()
        assert shown.index("delivered") < shown.index("acknowledged") < shown.index("closed")
    finally:
        receiver.stop()
        device.close()


# Where Python's json.dumps form (the legacy signatures) and RFC 8785 differ: floats with a zero
# fraction, exponents, non-ASCII text; plus key order by UTF-16 code units and the largest
# integer JCS allows.
AWKWARD = [
    {"v": 1, "battery": {"percent": 76.0, "charging": False}, "accuracy_m": 5.0},
    {"v": 1, "operator": "Zoë Çelik, Zürich 東京 🚑", "reason": "tab\tquote\" slash/"},
    {"v": 1, "tiny": 1e-7, "huge": 1e21, "negative_zero": -0.0, "pi": 3.141592653589793},
    {"v": 1, "\u00e9": 1, "z": 2, "\U0001f600": 3, "\ufb33": 4, "seq": 2**53 - 1},
]


def test_node_verifies_python_signatures_where_json_dumps_and_rfc8785_differ() -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    assert all(rfc8785.dumps(m) != legacy_canonical(m) for m in AWKWARD)  # they do differ
    messages = [signer.sign(m) for m in AWKWARD]
    out = subprocess.run([node(), str(INTEROP / "check-signatures.mjs")], cwd=ROOT, check=True,
                         input=json.dumps({"public_key": signer.public_key_b64,
                                           "messages": messages}),
                         capture_output=True, text=True, timeout=TIMEOUT_S).stdout
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["canonical"].encode() for r in results] == [rfc8785.dumps(m) for m in AWKWARD]
    assert all(r["valid"] for r in results)
