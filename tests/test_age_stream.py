"""evidence_format.age_stream against the stock `age` 1.1.x binary (no mocks): round trips both
ways, several recipients, the truncation guarantee at many cut points, tampering, and the
control centre's own evidence key."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from control_center.fleet import Fleet, age_x25519_keypair
from evidence_format.age_stream import (
    CHUNK,
    FINISHED,
    NO_MATCH,
    SEALED_CHUNK,
    AgeFormatError,
    AgeStreamWriter,
    decrypt,
    decrypt_salvage,
    parse_identities,
    parse_identity_file,
    parse_recipient,
)

SIZES = [0, 1, 65535, 65536, 65537, 3 * 65536, 1_000_003]


@pytest.fixture(scope="module")
def age_bin() -> str:
    for tool in ("age", "age-keygen"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is not installed: run `make sysdeps` (Debian: apt-get install "
                        f"age); these tests check interoperability with the stock tool")
    return "age"


class Key:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.recipient = subprocess.run(["age-keygen", "-y", str(path)], check=True,
                                        capture_output=True, text=True).stdout.strip()
        self.secret = parse_identity_file(path)


def keygen(path: Path) -> Key:
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    return Key(path)


@pytest.fixture(scope="module")
def key(age_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Key:
    return keygen(tmp_path_factory.mktemp("age") / "id.txt")


def plaintext(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def encrypt(data: bytes, recipients: list[str], seed: int = 1) -> tuple[bytes, int]:
    """Ours, fed in irregular pieces (TS-packet sized and large) so every write path runs;
    returns (ciphertext, payload offset)."""
    rng = random.Random(seed)
    sink = io.BytesIO()
    writer = AgeStreamWriter(sink, recipients)
    pos = 0
    while pos < len(data):
        step = rng.choice([1316, 188, 1, 70_000, 200_000, rng.randrange(1, 3 * CHUNK)])
        writer.write(data[pos:pos + step])
        pos += step
    writer.close()
    return sink.getvalue(), writer.payload_offset


def age_decrypt(ciphertext: bytes, identity: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["age", "-d", "-i", str(identity)], input=ciphertext,
                          capture_output=True, timeout=30)


def expected_prefix(cut: int, payload_offset: int) -> int:
    """The docstring's promise: plaintext bytes salvageable from a file cut at `cut`."""
    return CHUNK * max(0, (cut - payload_offset) // SEALED_CHUNK) if cut >= payload_offset else 0


# -- round trips with the stock tool -------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_ours_decrypts_with_stock_age(key: Key, size: int) -> None:
    data = plaintext(size, seed=size)
    ciphertext, offset = encrypt(data, [key.recipient], seed=size)
    chunks = max(1, -(-size // CHUNK))
    assert len(ciphertext) == offset + size + 16 * chunks
    done = age_decrypt(ciphertext, key.path)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == data
    assert b"".join(decrypt(io.BytesIO(ciphertext), key.secret)) == data


@pytest.mark.parametrize("size", SIZES)
def test_stock_age_output_decrypts_with_ours(key: Key, size: int) -> None:
    data = plaintext(size, seed=size + 7)
    ciphertext = subprocess.run(["age", "-r", key.recipient], input=data, check=True,
                                capture_output=True).stdout
    assert b"".join(decrypt(io.BytesIO(ciphertext), key.secret)) == data
    salvaged, report = decrypt_salvage(io.BytesIO(ciphertext), key.secret)
    assert salvaged == data
    assert (report.complete, report.stopped_because) == (True, FINISHED)


def test_file_sink_with_fsync_every_chunk(key: Key, tmp_path: Path) -> None:
    data = plaintext(5 * CHUNK + 123)
    path = tmp_path / "seg.ts.age"
    syncs = []
    with path.open("wb") as f:
        writer = AgeStreamWriter(f, [key.recipient], sync_interval_s=0,
                                 sync=lambda: syncs.append(os.fsync(f.fileno())))
        for i in range(0, len(data), 1316):
            writer.write(data[i:i + 1316])
        assert len(syncs) == 1 + 5  # header, then each of the 5 full chunks once released
        writer.close()
    assert len(syncs) == 7
    done = subprocess.run(["age", "-d", "-i", str(key.path), str(path)], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == data


def test_sync_interval_bounds_unsynced_time_not_chunks(key: Key) -> None:
    """With a 1 s interval a sealed chunk is synced only once the last sync is 1 s old: the
    loss on a power cut is bounded in time (plus the held chunk), not per chunk."""
    now = [0.0]
    syncs: list[float] = []
    writer = AgeStreamWriter(io.BytesIO(), [key.recipient], sync_interval_s=1.0,
                             sync=lambda: syncs.append(now[0]), clock=lambda: now[0])
    assert syncs == [0.0]  # the header, at once
    for _ in range(10):  # ten chunks sealed 0.3 s apart
        now[0] += 0.3
        writer.write(plaintext(CHUNK))
    # chunks are sealed when the next one's first byte arrives: at 0.6, 0.9, ... 3.0 s
    assert syncs == [0.0, 1.2, 2.4]
    writer.close()
    assert syncs[-1] == now[0] and writer.syncs == 4


def test_sync_interval_needs_a_sync_function(key: Key) -> None:
    with pytest.raises(ValueError, match="sync_interval_s needs sync"):
        AgeStreamWriter(io.BytesIO(), [key.recipient], sync_interval_s=1.0)


def test_two_recipients_each_decrypts(key: Key, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other.txt")
    stranger = keygen(tmp_path / "stranger.txt")
    data = plaintext(2 * CHUNK + 5)
    ciphertext, _ = encrypt(data, [key.recipient, other.recipient])
    for identity in (key, other):
        assert age_decrypt(ciphertext, identity.path).stdout == data
        assert b"".join(decrypt(io.BytesIO(ciphertext), identity.secret)) == data
    assert b"".join(decrypt(io.BytesIO(ciphertext), [stranger.secret, other.secret])) == data
    assert age_decrypt(ciphertext, stranger.path).returncode != 0
    with pytest.raises(AgeFormatError, match=NO_MATCH):
        next(decrypt(io.BytesIO(ciphertext), stranger.secret))
    with pytest.raises(AgeFormatError, match=NO_MATCH):
        decrypt_salvage(io.BytesIO(ciphertext), stranger.secret)


# -- streaming: what reaches the sink, and when ---------------------------------------------------
def test_writer_holds_back_only_the_latest_chunk(key: Key) -> None:
    sink = io.BytesIO()
    writer = AgeStreamWriter(sink, [key.recipient], sync=lambda: None)
    header = writer.payload_offset
    assert len(sink.getvalue()) == header  # header and nonce at once
    writer.write(bytes(CHUNK))
    assert (len(sink.getvalue()), writer.emitted) == (header, 0)  # full, but maybe the last
    writer.write(b"x")
    assert (len(sink.getvalue()), writer.emitted) == (header + SEALED_CHUNK, CHUNK)
    writer.write(bytes(3 * CHUNK - 1))  # ends exactly on a chunk boundary: that one is held
    assert writer.emitted == 3 * CHUNK
    assert len(sink.getvalue()) == header + 3 * SEALED_CHUNK
    writer.close()
    writer.close()  # idempotent
    assert len(sink.getvalue()) == header + 4 * SEALED_CHUNK  # the last chunk is a full one
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"late")
    assert b"".join(decrypt(io.BytesIO(sink.getvalue()), key.secret)) == (
        bytes(CHUNK) + b"x" + bytes(3 * CHUNK - 1))


def test_emitted_matches_the_documented_formula(key: Key) -> None:
    rng = random.Random(5)
    writer = AgeStreamWriter(io.BytesIO(), [key.recipient])
    received = 0
    for _ in range(300):
        step = rng.choice([0, 1, 188, 1316, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK])
        writer.write(bytes(step))
        received += step
        assert writer.emitted == (CHUNK * ((received - 1) // CHUNK) if received else 0)


# -- truncation and tampering --------------------------------------------------------------------
@pytest.mark.parametrize("size", [3 * CHUNK + 1000, 3 * CHUNK])
def test_salvage_of_a_file_cut_anywhere(key: Key, size: int) -> None:
    data = plaintext(size, seed=size)
    ciphertext, offset = encrypt(data, [key.recipient])
    rng = random.Random(size)
    cuts = {rng.randrange(len(ciphertext)) for _ in range(150)}
    for boundary in [0, offset - 16, offset] + [offset + i * SEALED_CHUNK for i in range(1, 4)]:
        cuts.update(c for c in range(boundary - 3, boundary + 4) if 0 <= c < len(ciphertext))
    cuts.update(range(0, offset, 7))  # inside the header
    for cut in sorted(cuts):
        salvaged, report = decrypt_salvage(io.BytesIO(ciphertext[:cut]), key.secret)
        want = expected_prefix(cut, offset)
        assert salvaged == data[:want], cut
        assert (report.complete, report.bytes, report.chunks) == (False, want, want // CHUNK)
        assert report.stopped_because and report.stopped_because != FINISHED
        with pytest.raises(AgeFormatError):
            b"".join(decrypt(io.BytesIO(ciphertext[:cut]), key.secret))
    salvaged, report = decrypt_salvage(io.BytesIO(ciphertext), key.secret)
    assert salvaged == data and report.complete and report.stopped_because == FINISHED


def test_flipped_byte_stops_salvage_at_that_chunk(key: Key) -> None:
    data = plaintext(3 * CHUNK + 1000)
    ciphertext, offset = encrypt(data, [key.recipient])
    for chunk in range(4):
        damaged = bytearray(ciphertext)
        damaged[offset + chunk * SEALED_CHUNK + 1000] ^= 0x40
        salvaged, report = decrypt_salvage(io.BytesIO(bytes(damaged)), key.secret)
        assert salvaged == data[:chunk * CHUNK]
        assert (report.complete, report.chunks) == (False, chunk)
        assert report.stopped_because.startswith(f"chunk {chunk}:")
        assert age_decrypt(bytes(damaged), key.path).returncode != 0
    damaged = bytearray(ciphertext)
    damaged[offset - 20] ^= 0x01  # in the MAC's base64 (the nonce is the last 16 bytes)
    with pytest.raises(AgeFormatError, match="MAC"):
        decrypt_salvage(io.BytesIO(bytes(damaged)), key.secret)
    full, _ = encrypt(data[:3 * CHUNK], [key.recipient])  # full final chunk: appending shows
    with pytest.raises(AgeFormatError, match="data after the final chunk"):
        b"".join(decrypt(io.BytesIO(full + b"extra"), key.secret))


def test_header_tampering_is_caught_by_the_mac(key: Key) -> None:
    ciphertext, _ = encrypt(b"evidence", [key.recipient])
    header_end = ciphertext.index(b"\n---") + 1
    # An extra (unknown-type) stanza keeps the file parseable but breaks the header MAC.
    tampered = ciphertext[:header_end] + b"-> grease x\n\n" + ciphertext[header_end:]
    with pytest.raises(AgeFormatError, match="header MAC mismatch"):
        next(decrypt(io.BytesIO(tampered), key.secret))
    assert age_decrypt(tampered, key.path).returncode != 0


def test_stock_age_on_a_truncated_file(key: Key) -> None:
    """Documents what the stock tool does (the module docstring states it): it writes the
    authenticated chunks before the cut, then fails with exit status 1."""
    data = plaintext(3 * CHUNK + 1000)
    ciphertext, offset = encrypt(data, [key.recipient])
    for cut, message in [(offset + 2 * SEALED_CHUNK + 500, b"failed to decrypt and authenticate"),
                         (offset + 2 * SEALED_CHUNK, b"unexpected EOF"),
                         (offset - 5, b"failed to read nonce")]:
        done = age_decrypt(ciphertext[:cut], key.path)
        assert done.returncode == 1
        assert message in done.stderr, done.stderr
        salvaged, _ = decrypt_salvage(io.BytesIO(ciphertext[:cut]), key.secret)
        assert done.stdout == salvaged == data[:expected_prefix(cut, offset)]


# -- keys: ours, age-keygen's and the control centre's -------------------------------------------
def test_fleet_evidence_key_interop(age_bin: str, tmp_path: Path) -> None:
    identity, recipient = age_x25519_keypair()
    path = tmp_path / "centre.txt"
    path.write_text(f"# created: now\n# public key: {recipient}\n{identity}\n")
    data = plaintext(CHUNK + 17)
    ciphertext, _ = encrypt(data, [recipient])
    done = age_decrypt(ciphertext, path)
    assert (done.returncode, done.stdout) == (0, data), done.stderr.decode()

    fleet = Fleet.create(tmp_path / "fleet")
    evidence_recipient = fleet.ensure_evidence_key()
    assert fleet.evidence_recipients() == [evidence_recipient]
    ciphertext, _ = encrypt(data, fleet.evidence_recipients())
    done = age_decrypt(ciphertext, fleet.evidence_identity_file)
    assert (done.returncode, done.stdout) == (0, data), done.stderr.decode()
    secret = parse_identity_file(fleet.evidence_identity_file)
    assert b"".join(decrypt(io.BytesIO(ciphertext), secret)) == data


def test_key_parsing(key: Key) -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    public = X25519PrivateKey.from_private_bytes(key.secret).public_key().public_bytes_raw()
    assert parse_recipient(key.recipient) == public
    assert parse_recipient(key.recipient.upper()) == public  # Bech32 is case-insensitive
    text = key.path.read_text()
    assert parse_identities(text + "\n# another\n" + text.splitlines()[-1] + "\n") == [
        key.secret, key.secret]

    swapped = key.recipient[:-1] + ("q" if key.recipient[-1] != "q" else "p")
    with pytest.raises(ValueError, match="checksum"):
        parse_recipient(swapped)
    secret_line = text.splitlines()[-1]
    with pytest.raises(ValueError, match="HRP"):
        parse_recipient(secret_line)
    with pytest.raises(ValueError, match="mixed"):
        parse_recipient("Age" + key.recipient[3:])
    with pytest.raises(ValueError, match="character 'b'"):
        parse_recipient(key.recipient[:10] + "b" + key.recipient[11:])
    with pytest.raises(ValueError, match="no recipients"):
        AgeStreamWriter(io.BytesIO(), [])
    with pytest.raises(ValueError, match="AGE-SECRET-KEY"):
        parse_identities("ssh-ed25519 AAAA\n")
