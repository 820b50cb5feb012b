"""Segment manifests, and minisign signatures that the stock `minisign` tool agrees with."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jsonschema import Draft202012Validator, FormatChecker

from evidence_format import minisign
from evidence_format.manifest import (
    MANIFEST_SCHEMA,
    build_manifest,
    manifest_bytes,
    manifest_sha256,
    sign_manifest,
)

MINISIGN_HINT = "apt-get install minisign"


def tool(name: str, hint: str) -> str:
    """The stock tool's path; a missing tool fails the test (it is what we claim to match)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed and these tests need it: {hint}")
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False,
                          timeout=10)


def manifest(**overrides) -> dict:
    fields = dict(device_id="tok-amb-0412", seq=123, start_utc="2026-11-23T10:00:00.000Z",
                  end_utc="2026-11-23T10:00:10.000Z", start_mono=5000.0, end_mono=5010.0,
                  frames=300, gps_track=[{"lat": 52.52, "lon": 13.405, "utc":
                                          "2026-11-23T10:00:05.000Z", "alt_m": 34.0}],
                  call_id="call-17", flags=["evidence", "sos"], ciphertext_sha256="ab" * 32,
                  ciphertext_bytes=4096, prev_manifest_sha256="cd" * 32)
    return build_manifest(**{**fields, **overrides})


# -- minisign: our signatures, stock verifier ----------------------------------------------------
def test_our_signature_verifies_with_stock_minisign(tmp_path: Path) -> None:
    exe = tool("minisign", MINISIGN_HINT)
    key = Ed25519PrivateKey.generate()
    (tmp_path / "device.pub").write_text(minisign.public_key_file(key.public_key()))
    (tmp_path / "m.json").write_bytes(b'{"a":1}\n')
    (tmp_path / "m.json.minisig").write_text(minisign.sign(key, b'{"a":1}\n', "seq:1\tx"))

    for extra in ([], ["-H"]):  # -H: minisign insists on the prehashed ("ED") form
        done = run(exe, "-V", *extra, "-p", tmp_path / "device.pub", "-m", tmp_path / "m.json")
        assert done.returncode == 0, done.stderr
        assert "Trusted comment: seq:1\tx" in done.stdout
    done = run(exe, "-V", "-P", minisign.public_key_line(key.public_key()), "-m",
               tmp_path / "m.json")
    assert done.returncode == 0, done.stderr


def test_stock_minisign_rejects_our_signature_with_another_key_or_an_edit(tmp_path: Path) -> None:
    exe = tool("minisign", MINISIGN_HINT)
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "other.pub").write_text(minisign.public_key_file(other.public_key()))
    (tmp_path / "device.pub").write_text(minisign.public_key_file(key.public_key()))
    (tmp_path / "m.json").write_bytes(b"original\n")
    (tmp_path / "m.json.minisig").write_text(minisign.sign(key, b"original\n", "c"))

    wrong_key = run(exe, "-V", "-p", tmp_path / "other.pub", "-m", tmp_path / "m.json")
    assert wrong_key.returncode != 0 and "key id" in wrong_key.stderr.lower()
    (tmp_path / "m.json").write_bytes(b"edited\n")
    edited = run(exe, "-V", "-p", tmp_path / "device.pub", "-m", tmp_path / "m.json")
    assert edited.returncode != 0


def test_the_key_id_is_derived_from_the_device_key() -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes_raw()
    assert minisign.key_id_for(key.public_key()) == hashlib.blake2b(raw).digest()[:8]
    assert minisign.public_key_file(key.public_key()) == minisign.public_key_file(
        Ed25519PrivateKey.from_private_bytes(key.private_bytes_raw()).public_key())
    parsed = minisign.parse_public_key(minisign.public_key_file(key.public_key()))
    assert parsed.key.public_bytes_raw() == raw
    assert parsed.key_id_hex in minisign.public_key_file(key.public_key())


# -- minisign: stock signatures, our verifier ----------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["prehashed", "legacy"])
def test_stock_signatures_verify_with_ours(tmp_path: Path, legacy: bool) -> None:
    exe = tool("minisign", MINISIGN_HINT)
    pub, sec, msg = tmp_path / "stock.pub", tmp_path / "stock.key", tmp_path / "file.bin"
    made = run(exe, "-G", "-W", "-p", pub, "-s", sec)  # -W: no password on the secret key
    assert made.returncode == 0, made.stderr
    msg.write_bytes(b"\x00evidence\xff" * 100)
    signed = run(exe, "-S", *(["-l"] if legacy else []), "-s", sec, "-m", msg,
                 "-t", "stock trusted comment")
    assert signed.returncode == 0, signed.stderr
    signature = (tmp_path / "file.bin.minisig").read_text()
    assert minisign.parse_signature(signature).algorithm == (b"Ed" if legacy else b"ED")

    assert minisign.verify(pub.read_text(), msg.read_bytes(), signature) == \
        "stock trusted comment"
    with pytest.raises(minisign.BadSignature):
        minisign.verify(pub.read_text(), msg.read_bytes() + b"x", signature)
    with pytest.raises(minisign.BadSignature, match="trusted comment"):
        minisign.verify(pub.read_text(), msg.read_bytes(),
                        signature.replace("stock trusted comment", "forged comment"))
    other = minisign.public_key_file(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(minisign.KeyMismatch, match="signed by key"):
        minisign.verify(other, msg.read_bytes(), signature)


def test_malformed_signatures_are_refused_clearly() -> None:
    pub = minisign.public_key_file(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(minisign.MinisignError, match="expected 4 lines"):
        minisign.verify(pub, b"m", "garbage")
    with pytest.raises(minisign.MinisignError, match="not base64"):
        minisign.verify(pub, b"m", "untrusted comment: x\n!!!\ntrusted comment: y\nAAAA\n")
    with pytest.raises(minisign.MinisignError, match="one line"):
        minisign.sign(Ed25519PrivateKey.generate(), b"m", "two\nlines")


# -- manifests -----------------------------------------------------------------------------------
def test_a_manifest_meets_its_schema_and_serialises_canonically() -> None:
    m = manifest(start_utc=datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
                 cut={"reason": "crash-recovery", "truncated": True})
    Draft202012Validator(MANIFEST_SCHEMA, format_checker=FormatChecker()).validate(m)
    assert m["file"] == "000123.ts.age" and m["start_utc"] == "2026-11-23T10:00:00.000Z"
    data = manifest_bytes(m)
    assert data.endswith(b"}\n") and b" " not in data and data.isascii()
    assert manifest_bytes(json.loads(data)) == data  # a verifier can re-derive the same bytes
    assert manifest_sha256(m) == hashlib.sha256(data).hexdigest()


def test_the_chain_may_start_only_at_the_first_segment_or_with_a_reason() -> None:
    assert manifest(seq=1, prev_manifest_sha256=None)["prev_manifest_sha256"] is None
    with pytest.raises(ValueError, match="chain_restart"):
        manifest(seq=7, prev_manifest_sha256=None)
    assert manifest(seq=7, prev_manifest_sha256=None,
                    chain_restart="storage wiped")["chain_restart"] == "storage wiped"


@pytest.mark.parametrize("overrides, message", [
    ({"ciphertext_sha256": "ABC"}, "ciphertext_sha256"),
    ({"gps_track": [{"lat": 91, "lon": 0, "utc": "2026-11-23T10:00:00Z"}]}, "gps_track/0/lat"),
    ({"start_utc": "yesterday"}, "start_utc"),
    ({"end_mono": 1.0}, "end_mono is before start_mono"),
    ({"flags": ["sos", "sos"]}, "flags"),
])
def test_invalid_manifests_are_refused_at_build_time(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        manifest(**overrides)


def test_a_signed_manifest_verifies_with_stock_minisign(tmp_path: Path) -> None:
    exe = tool("minisign", MINISIGN_HINT)
    key = Ed25519PrivateKey.generate()
    data, signature = sign_manifest(manifest(), key)
    (tmp_path / "000123.json").write_bytes(data)
    (tmp_path / "000123.json.minisig").write_bytes(signature)
    (tmp_path / "device.pub").write_text(minisign.public_key_file(key.public_key()))
    done = run(exe, "-V", "-p", tmp_path / "device.pub", "-m", tmp_path / "000123.json")
    assert done.returncode == 0, done.stderr
    assert "file:000123.json\tdevice:tok-amb-0412\tseq:123" in done.stdout
