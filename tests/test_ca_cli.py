"""`sos-center ca ...` as an operator runs it: a subprocess on a fleet dir, no centre config."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center import pki
from control_center.fleet import MAX_PACKET_BYTES, Fleet, age_x25519_keypair
from evidence_format.bech32 import encode as bech32_encode
from evidence_format.bech32 import words as bech32_words
from protocol import signing


def ca(fleet: Path | None, *args: str, env: dict[str, str] | None = None,
       cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`sos-center ca ARGS --fleet FLEET`, with no usable centre config anywhere."""
    where = ["--fleet", str(fleet)] if fleet is not None else []
    return subprocess.run(
        [sys.executable, "-m", "control_center.cli", "ca", *args, *where],
        capture_output=True, text=True, timeout=60, cwd=cwd,
        env={**os.environ, "SOS_CENTER_CONFIG": "/nonexistent/center.toml", **(env or {})})


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    directory = tmp_path / "fleet"
    ok(ca(directory, "init"))
    return directory


def csr_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.csr"
    path.write_bytes(pki.make_csr(ec.generate_private_key(ec.SECP256R1()), name))
    return path


def signing_key_b64() -> str:
    return signing.Signer(Ed25519PrivateKey.generate()).public_key_b64


def listed(fleet: Path) -> dict[str, dict]:
    return {i["name"]: i for i in json.loads(ok(ca(fleet, "list", "--json")))}


# -- commands ------------------------------------------------------------------------------------
def test_init_twice_is_safe_and_uses_sos_fleet_dir(tmp_path: Path) -> None:
    directory = tmp_path / "fleet"
    env = {"SOS_FLEET_DIR": str(directory)}
    first = ok(ca(None, "init", "--name", "Test fleet CA", env=env))
    assert "created" in first
    files = ["ca.pem", "ca.key", "centre-signing.key", "evidence-identity.txt", "evidence.pub"]
    before = {name: (directory / name).read_bytes() for name in files}
    second = ok(ca(None, "init", env=env))
    assert "already initialised" in second and "created" not in second
    assert {name: (directory / name).read_bytes() for name in files} == before
    assert stat.S_IMODE((directory / "evidence-identity.txt").stat().st_mode) == 0o600


def test_commands_before_init_say_to_run_init(tmp_path: Path) -> None:
    result = ca(tmp_path / "nothing", "list")
    assert result.returncode == 2 and "sos-center ca init" in result.stderr


def test_server_certificate_verifies_against_the_ca(fleet: Path, tmp_path: Path) -> None:
    out = ok(ca(fleet, "server", "broker", "--host", "127.0.0.1", "--host", "localhost"))
    cert_file, key_file = fleet / "servers" / "broker.pem", fleet / "servers" / "broker.key"
    assert str(cert_file) in out and str(key_file) in out
    ca_cert = x509.load_pem_x509_certificate((fleet / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    cert.verify_directly_issued_by(ca_cert)  # raises unless the CA signed it
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)

    ok(ca(fleet, "server", "ingest", "--host", "ingest.example.org", "--out", str(tmp_path / "o")))
    elsewhere = x509.load_pem_x509_certificate((tmp_path / "o" / "ingest.pem").read_bytes())
    elsewhere.verify_directly_issued_by(ca_cert)
    assert ca(fleet, "server", "../evil", "--host", "x").returncode == 2


def test_sign_then_list_shows_it_active_with_its_signing_key(fleet: Path, tmp_path: Path) -> None:
    csr, key = csr_file(tmp_path, "tok-amb-0412"), signing_key_b64()
    out = ok(ca(fleet, "sign", str(csr), "--kind", "token", "--signing-key", key,
                "-o", str(tmp_path / "tok.pem")))
    assert "signed tok-amb-0412" in out
    cert = x509.load_pem_x509_certificate((tmp_path / "tok.pem").read_bytes())
    assert pki.common_name(cert) == "tok-amb-0412"
    entry = listed(fleet)["tok-amb-0412"]
    assert entry["status"] == "active" and entry["kind"] == "token"
    assert entry["has_signing_key"] and entry["signing_key"] == key
    assert entry["serial"] == f"{cert.serial_number:x}"
    assert "tok-amb-0412" in ok(ca(fleet, "list"))

    again = ca(fleet, "sign", str(csr), "--kind", "token")  # same key: same cert, on stdout
    assert again.returncode == 0 and again.stdout.encode() == (tmp_path / "tok.pem").read_bytes()
    assert "already enrolled" in again.stderr


def test_sign_refuses_a_csr_whose_name_is_not_a_device_id(fleet: Path, tmp_path: Path) -> None:
    result = ca(fleet, "sign", str(csr_file(tmp_path, "Bad Name")), "--kind", "token")
    assert result.returncode == 2 and result.stdout == ""
    assert "'Bad Name'" in result.stderr and "not a valid device id" in result.stderr
    assert "make a new CSR" in result.stderr
    assert listed(fleet) == {}


def test_revoke_then_list_shows_revoked_and_the_crl_has_the_serial(fleet: Path,
                                                                   tmp_path: Path) -> None:
    ok(ca(fleet, "sign", str(csr_file(tmp_path, "pil-0007")), "--kind", "pillar",
          "--signing-key", signing_key_b64(), "-o", str(tmp_path / "pil.pem")))
    out = ok(ca(fleet, "revoke", "pil-0007"))
    assert "revoked pil-0007" in out and "systemctl reload mosquitto" in out
    entry = listed(fleet)["pil-0007"]
    assert entry["status"] == "revoked"
    crl = x509.load_pem_x509_crl((fleet / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(entry["serial"], 16)) is not None
    twice = ca(fleet, "revoke", "pil-0007")
    assert twice.returncode == 2 and "ca list" in twice.stderr


def test_broker_config_writes_a_mutual_tls_conf(fleet: Path, tmp_path: Path) -> None:
    missing = ca(fleet, "broker-config", "--port", "8883", "--host", "0.0.0.0",
                 "--server", "broker", "--out", str(tmp_path / "etc"))
    assert missing.returncode == 2 and "ca server broker" in missing.stderr
    ok(ca(fleet, "server", "broker", "--host", "127.0.0.1"))
    out = ok(ca(fleet, "broker-config", "--port", "8883", "--host", "0.0.0.0",
                "--server", "broker", "--out", str(tmp_path / "etc")))
    conf = tmp_path / "etc" / "mosquitto.conf"
    assert str(conf) in out
    text = conf.read_text()
    for line in ("require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true", f"crlfile {fleet / 'crl.pem'}",
                 f"plugin_opt_config_file {tmp_path / 'etc' / 'data' / 'dynamic-security.json'}",
                 f"max_packet_size {MAX_PACKET_BYTES}", "set_tcp_nodelay true",
                 "listener 8883 0.0.0.0", f"certfile {fleet / 'servers' / 'broker.pem'}"):
        assert line in text
    assert (tmp_path / "etc" / "data" / "dynamic-security.json").exists()
    assert (fleet / "crl.pem").exists()


def test_keys_json_gives_the_centre_key_and_an_age_recipient(fleet: Path) -> None:
    keys = json.loads(ok(ca(fleet, "keys", "--json")))
    assert Path(keys["ca_file"]) == fleet / "ca.pem"
    assert keys["centre_keys"] == Fleet(fleet).centre_public_keys()
    assert all(len(base64.b64decode(k)) == 32 for k in keys["centre_keys"])
    assert len(keys["evidence_recipients"]) == 1
    assert keys["evidence_recipients"][0].startswith("age1")
    assert "evidence recipient: age1" in ok(ca(fleet, "keys"))


# -- Bech32 and age keys -------------------------------------------------------------------------
BIP173_VALID = [
    "A12UEL5L",
    "a12uel5l",
    "an83characterlonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1tt5tgs",
    "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
    "11" + "q" * 82 + "c8247j",  # 90 characters, the BIP 173 maximum
    "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
    "?1ezyfcl",
]


@pytest.mark.parametrize("vector", BIP173_VALID)
def test_bech32_encoder_reproduces_the_bip173_vectors(vector: str) -> None:
    hrp, _, data = vector.lower().rpartition("1")
    words = ["qpzry9x8gf2tvdw0s3jn54khce6mua7l".index(c) for c in data[:-6]]
    assert bech32_encode(hrp, words) == vector.lower()


def test_bech32_words_regroup_bytes_as_bip173_segwit_addresses_do() -> None:
    program = bytes.fromhex("751e76e8199196d454941c45d1b3a323f1433bd6")
    assert (bech32_encode("bc", [0, *bech32_words(program)])
            == "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4".lower())


def test_age_keypair_has_the_age_shapes() -> None:
    identity, recipient = age_x25519_keypair()
    assert identity.startswith("AGE-SECRET-KEY-1") and len(identity) == 74
    assert recipient.startswith("age1") and len(recipient) == 62


def test_the_stock_age_tool_decrypts_with_the_centre_identity(fleet: Path, tmp_path: Path) -> None:
    if shutil.which("age") is None:
        pytest.fail("the `age` tool is missing: install it (apt-get install age, or make "
                    "sysdeps) to prove devices' evidence can be decrypted by the centre")
    identity = fleet / "evidence-identity.txt"
    lines = identity.read_text().splitlines()
    assert lines[0].startswith("# created: ") and lines[2].startswith("AGE-SECRET-KEY-1")
    (recipient,) = Fleet(fleet).evidence_recipients()
    assert lines[1] == f"# public key: {recipient}"
    if shutil.which("age-keygen"):
        derived = subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True,
                                 text=True, check=True, timeout=10).stdout.strip()
        assert derived == recipient
    plain = tmp_path / "clip.mp4"
    plain.write_bytes(os.urandom(100_000))
    subprocess.run(["age", "-r", recipient, "-o", str(tmp_path / "clip.age"), str(plain)],
                   check=True, timeout=10)
    decrypted = subprocess.run(["age", "-d", "-i", str(identity), str(tmp_path / "clip.age")],
                               capture_output=True, check=True, timeout=10).stdout
    assert decrypted == plain.read_bytes()
