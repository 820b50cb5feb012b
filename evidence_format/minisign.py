"""Minisign signatures made and checked with `cryptography`, readable by the stock `minisign`.

Formats (https://jedisct1.github.io/minisign/), all base64 standard with padding:

    public key file                 signature file
    untrusted comment: <text>       untrusted comment: <text>
    b64("Ed" || key_id || pk)       b64(alg || key_id || signature)
                                    trusted comment: <text>
                                    b64(global_signature)

`key_id` is 8 bytes; minisign prints it as the little-endian 64-bit number in upper-case hex.
`alg` is "ED" (prehashed: `signature` = Ed25519 over BLAKE2b-512(message), what we write and
what minisign >= 0.10 writes) or "Ed" (legacy: over the message itself; accepted when checking).
`global_signature` is Ed25519 over `signature || trusted_comment`, so the trusted comment cannot
be changed without the secret key; the untrusted comment can.

A device has one Ed25519 key (protocol/signing.py) and no minisign key file, so its key id is
derived from its public key: the first 8 bytes of BLAKE2b-512(pk) (`b2sum` of the raw 32 bytes).
The same device key therefore always has the same minisign key id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_ALG = b"Ed"
PREHASHED = b"ED"
LEGACY = b"Ed"
UNTRUSTED = "untrusted comment: "
TRUSTED = "trusted comment: "
COMMENT_MAX = 1000  # a comment line must fit minisign's 1024-byte buffer with its prefix


class MinisignError(ValueError):
    """A key or signature that cannot be used; the text says which and why."""


class KeyMismatch(MinisignError):
    """The signature was made by a key other than the one given (its key id differs)."""


class BadSignature(MinisignError):
    """The key id matches but the signature does not: the file or the trusted comment changed."""


@dataclass(frozen=True)
class PublicKey:
    key_id: bytes  # 8 bytes, as stored
    key: Ed25519PublicKey

    @property
    def key_id_hex(self) -> str:
        return key_id_hex(self.key_id)


@dataclass(frozen=True)
class Signature:
    algorithm: bytes  # PREHASHED or LEGACY
    key_id: bytes
    signature: bytes
    trusted_comment: str
    global_signature: bytes
    untrusted_comment: str


def key_id_for(public_key: Ed25519PublicKey) -> bytes:
    """The minisign key id of a device key: the first 8 bytes of BLAKE2b-512 of its raw bytes."""
    return hashlib.blake2b(public_key.public_bytes_raw()).digest()[:8]


def key_id_hex(key_id: bytes) -> str:
    """How minisign prints a key id (the bytes read as a little-endian integer, in hex)."""
    return f"{int.from_bytes(key_id, 'little'):016X}"


def public_key_line(public_key: Ed25519PublicKey) -> str:
    """The base64 key alone, as `minisign -P` takes it."""
    return base64.b64encode(KEY_ALG + key_id_for(public_key) + public_key.public_bytes_raw()
                            ).decode()


def public_key_file(public_key: Ed25519PublicKey, comment: str | None = None) -> str:
    """The text of a minisign public key file for a device key."""
    comment = comment or f"minisign public key {key_id_hex(key_id_for(public_key))}"
    return f"{UNTRUSTED}{_one_line(comment, 'comment')}\n{public_key_line(public_key)}\n"


def parse_public_key(text: str) -> PublicKey:
    """A public key file's text, or just its base64 line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith(UNTRUSTED.strip()):
        lines = lines[1:]
    if len(lines) != 1:
        raise MinisignError("not a minisign public key (expected one base64 line after the "
                            "untrusted comment)")
    raw = _b64(lines[0], "public key")
    if len(raw) != 42 or raw[:2] != KEY_ALG:
        raise MinisignError(f"not a minisign Ed25519 public key ({len(raw)} bytes, "
                            f"algorithm {raw[:2]!r})")
    return PublicKey(raw[2:10], Ed25519PublicKey.from_public_bytes(raw[10:]))


def sign(private_key: Ed25519PrivateKey, message: bytes, trusted_comment: str,
         untrusted_comment: str | None = None) -> str:
    """The text of a prehashed ("ED") minisign signature file for `message`."""
    trusted = _one_line(trusted_comment, "trusted comment")
    key_id = key_id_for(private_key.public_key())
    untrusted = _one_line(untrusted_comment or
                          f"signature from minisign secret key {key_id_hex(key_id)}", "comment")
    signature = private_key.sign(hashlib.blake2b(message).digest())
    global_signature = private_key.sign(signature + trusted.encode())
    return (f"{UNTRUSTED}{untrusted}\n"
            f"{base64.b64encode(PREHASHED + key_id + signature).decode()}\n"
            f"{TRUSTED}{trusted}\n"
            f"{base64.b64encode(global_signature).decode()}\n")


def parse_signature(text: str) -> Signature:
    lines = text.splitlines()
    if len(lines) < 4 or not lines[0].startswith(UNTRUSTED) or not lines[2].startswith(TRUSTED):
        raise MinisignError("not a minisign signature (expected 4 lines: untrusted comment, "
                            "signature, trusted comment, global signature)")
    raw = _b64(lines[1], "signature")
    if len(raw) != 74 or raw[:2] not in (PREHASHED, LEGACY):
        raise MinisignError(f"unsupported signature ({len(raw)} bytes, algorithm {raw[:2]!r})")
    global_signature = _b64(lines[3], "global signature")
    if len(global_signature) != 64:
        raise MinisignError("global signature is not 64 bytes")
    return Signature(raw[:2], raw[2:10], raw[10:], lines[2][len(TRUSTED):], global_signature,
                     lines[0][len(UNTRUSTED):])


def verify_with(public_key: PublicKey, message: bytes, signature_text: str) -> str:
    """The trusted comment, if `public_key` signed `message` and that comment; else raise
    KeyMismatch (another key's signature), BadSignature or MinisignError (malformed)."""
    sig = parse_signature(signature_text)
    if sig.key_id != public_key.key_id:
        raise KeyMismatch(f"signed by key {key_id_hex(sig.key_id)}, "
                          f"not by key {public_key.key_id_hex}")
    signed = hashlib.blake2b(message).digest() if sig.algorithm == PREHASHED else message
    try:
        public_key.key.verify(sig.signature, signed)
    except InvalidSignature:
        raise BadSignature("signature does not match the file (the file was changed after "
                           "signing, or the signature is corrupt)") from None
    try:
        public_key.key.verify(sig.global_signature, sig.signature + sig.trusted_comment.encode())
    except InvalidSignature:
        raise BadSignature("global signature does not match the trusted comment (the comment "
                           "was changed after signing)") from None
    return sig.trusted_comment


def verify(public_key_text: str, message: bytes, signature_text: str) -> str:
    """`minisign -V` in Python: the trusted comment of a valid signature, else MinisignError."""
    return verify_with(parse_public_key(public_key_text), message, signature_text)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MinisignError(f"{what} is not base64") from None


def _one_line(text: str, what: str) -> str:
    if "\n" in text or "\r" in text:
        raise MinisignError(f"{what} must be one line")
    if len(text.encode()) > COMMENT_MAX:
        raise MinisignError(f"{what} longer than {COMMENT_MAX} bytes")
    return text
