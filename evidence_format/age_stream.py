"""Streaming age (v1, X25519) encryption of evidence video, and its decryption.

Why our own writer instead of piping into the `age` binary: the camera must be able to say which
bytes are durable (a power cut in an ambulance is normal), must control when chunks reach the
disk (fsync), and must not depend on a subprocess staying alive. The output is a standard age
file (https://c2sp.org/age): the control centre decrypts it with the stock tool,
`age -d -i evidence-identity.txt`. The device only ever holds recipients (public keys), and the
per-file key is dropped as soon as the payload cipher is set up, so it cannot decrypt its own
footage.

File layout (what the writer emits, and what the readers check)::

    age-encryption.org/v1
    -> X25519 <base64 ephemeral share>            one stanza per recipient
    <base64 ChaCha20-Poly1305(wrap key, file key)>
    --- <base64 HMAC-SHA256(HKDF(file key, "", "header"), header up to "---")>
    <16-byte nonce><chunk 0>...<chunk n>          STREAM: 64 KiB plaintext chunks + 16-byte tag

Chunk i is sealed with the 12-byte nonce `i as 11 bytes big-endian || last flag` (0x01 only on
the final chunk). Every chunk but the last is exactly 64 KiB of plaintext; the last may be full,
and may be empty only when the whole plaintext is empty.

Truncation, in numbers (H = `AgeStreamWriter.payload_offset`: header + 16-byte nonce):
a file cut at byte offset `cut >= H` decrypts, with `decrypt_salvage`, to exactly the first
`65536 * ((cut - H) // 65552)` plaintext bytes (all of it, `complete=True`, only if nothing was
cut): every chunk that lies wholly before the cut, i.e. the plaintext is complete up to fewer
than 65552 bytes (one sealed chunk) before the cut. A cut before H yields nothing.

Stock `age` 1.1.1 on a truncated file (measured): it writes every authenticated chunk before the
damage to its output (stdout, or the `-o` file, which it leaves in place), then prints
`age: error: failed to decrypt and authenticate payload chunk` (cut inside a chunk) or
`age: error: unexpected EOF` (cut on a chunk boundary) and exits 1. A cut inside the header or
nonce gives no output (`failed to read header: ...` / `failed to read nonce: ...`). So its
output is the same prefix `decrypt_salvage` returns, but only the exit status says it is
incomplete: never trust a `-o` file from a run that failed.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from hashlib import sha256
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from evidence_format import bech32

VERSION_LINE = b"age-encryption.org/v1\n"
X25519_INFO = b"age-encryption.org/v1/X25519"
CHUNK = 64 * 1024  # plaintext bytes per STREAM chunk
TAG = 16
SEALED_CHUNK = CHUNK + TAG  # 65552 bytes of ciphertext per full chunk
NONCE_SIZE = 16
_COLUMNS = 64  # header base64 lines wrap here
_MAX_LINE = 4096  # refuse longer header lines (garbage, not age)
_MAX_HEADER = 1 << 20
_ZERO_NONCE = bytes(12)
_B64_CHARS = re.compile(rb"^[A-Za-z0-9+/]*$")

NO_MATCH = "no identity matches any recipient stanza"
FINISHED = "final chunk authenticated at end of file"


class AgeFormatError(ValueError):
    """The input is not a well-formed age file for these identities; the text says what's wrong."""


# -- small primitives ----------------------------------------------------------------------------
def _b64encode(data: bytes) -> bytes:
    """RFC 4648 standard alphabet without padding, as age writes it."""
    return base64.b64encode(data).rstrip(b"=")


def _b64decode(text: bytes, what: str) -> bytes:
    """Strict unpadded base64: age rejects padding and non-canonical trailing bits."""
    if not _B64_CHARS.match(text) or len(text) % 4 == 1:
        raise AgeFormatError(f"{what}: not unpadded base64: {text[:70]!r}")
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except binascii.Error as exc:
        raise AgeFormatError(f"{what}: bad base64 ({exc})") from None
    if _b64encode(data) != text:
        raise AgeFormatError(f"{what}: non-canonical base64")
    return data


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _chunk_nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _read_exact(source: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes; fewer only at end of file (raw streams may return short reads)."""
    data = source.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = source.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def parse_recipient(text: str) -> bytes:
    """The 32-byte X25519 public key of an age recipient `age1...`."""
    key = bech32.decode(text.strip(), "age", "age recipient")
    if len(key) != 32:
        raise ValueError(f"age recipient: {len(key)}-byte key, expected 32")
    return key


def parse_identities(text: str) -> list[bytes]:
    """The 32-byte X25519 secret keys in an age identity file's text (`AGE-SECRET-KEY-1...`
    lines; blank lines and `#` comments allowed, as age-keygen writes them)."""
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.upper().startswith("AGE-SECRET-KEY-1"):
            raise ValueError(f"identity line {number}: not an AGE-SECRET-KEY-1... line "
                             f"(plugin and SSH identities are not supported)")
        key = bech32.decode(line, "age-secret-key-", f"identity line {number}")
        if len(key) != 32:
            raise ValueError(f"identity line {number}: {len(key)}-byte key, expected 32")
        keys.append(key)
    return keys


def parse_identity_file(path: str | Path) -> bytes:
    """The X25519 secret key in an age identity file holding exactly one (see
    `parse_identities` for files with several; `decrypt` accepts a list)."""
    keys = parse_identities(Path(path).read_text())
    if len(keys) != 1:
        raise ValueError(f"{path}: {len(keys)} identities, expected exactly one "
                         f"(use parse_identities for several)")
    return keys[0]


# -- writing -------------------------------------------------------------------------------------
def _x25519_stanza(recipient: bytes, file_key: bytes) -> bytes:
    ephemeral = X25519PrivateKey.generate()
    share = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    wrap_key = _hkdf(shared, share + recipient, X25519_INFO)
    body = _b64encode(ChaCha20Poly1305(wrap_key).encrypt(_ZERO_NONCE, file_key, None))
    lines = [body[i:i + _COLUMNS] for i in range(0, len(body) + 1, _COLUMNS)]
    return b"-> X25519 " + _b64encode(share) + b"\n" + b"\n".join(lines) + b"\n"


class AgeStreamWriter:
    """Encrypt a stream to age recipients, emitting each 64 KiB chunk as soon as it can.

    The header and nonce are written by the constructor. `write()` copies plaintext into one
    64 KiB buffer; a full chunk cannot be sealed yet, because only `close()` tells whether it is
    the final one (which carries a different nonce). So the writer holds back the latest full
    chunk and seals it as a middle chunk the moment another byte arrives. At most one chunk of
    plaintext (<= 65536 bytes) is ever held.

    Guarantees, with `emitted` = plaintext bytes handed to `sink` so far (`self.emitted`):
    - after `write()` returns with P bytes received in total, `emitted` is
      `65536 * ((P - 1) // 65536)` (0 if P == 0): everything but the last, held chunk;
    - with `sync_interval_s=T`, the header is synced at once, and a sealed chunk is synced
      before `write()` returns whenever the last sync is T seconds old or older (on `clock`).
      So a power cut loses at most the held chunk (<= 64 KiB) plus what was sealed in the last
      T seconds; `sync_interval_s=0` syncs every chunk. On the camera (8 Mbit/s = one chunk
      every 65 ms) T = 1 s bounds the loss to about one second of video, with 1 fsync/s
      instead of 15 (an SD card's write latency and wear both count);
    - a file cut at any byte offset `cut` decrypts, with `decrypt_salvage`, to the first
      `65536 * ((cut - payload_offset) // 65552)` plaintext bytes: a prefix that is complete up
      to fewer than 65552 file bytes (one sealed chunk) before the cut;
    - after `close()` the file is a complete age file: `age -d -i IDENTITY` decrypts it
      byte-exactly.

    `sink.write` may be a file, a BytesIO or a tee that also hashes: it receives each sealed
    chunk as one `bytes` object (never a reused buffer). `sync` should make the bytes durable
    (e.g. `lambda: os.fsync(f.fileno())`); the writer calls `sink.flush()` first when the sink
    has one. The sink is not closed.
    """

    def __init__(self, sink: BinaryIO, recipients: Sequence[str], *,
                 sync: Callable[[], None] | None = None, sync_interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(recipients, str):
            raise TypeError("recipients must be a list of age1... strings, not one string")
        if not recipients:
            raise ValueError("no recipients: the footage would be unreadable")
        if sync_interval_s is not None and sync is None:
            raise ValueError("sync_interval_s needs sync=... (e.g. os.fsync of the file)")
        if sync_interval_s is not None and sync_interval_s < 0:
            raise ValueError("sync_interval_s must be >= 0")
        keys = [parse_recipient(r) for r in recipients]
        file_key = os.urandom(16)
        header = VERSION_LINE + b"".join(_x25519_stanza(k, file_key) for k in keys) + b"---"
        mac = hmac.new(_hkdf(file_key, b"", b"header"), header, sha256).digest()
        nonce = os.urandom(NONCE_SIZE)
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        del file_key  # only the payload cipher stays; nothing here can unwrap other files
        head = header + b" " + _b64encode(mac) + b"\n" + nonce
        self.payload_offset = len(head)
        """Byte offset of chunk 0 in the file (header, MAC line and the 16-byte nonce)."""
        self._sink = sink
        self._sync = sync
        self._sync_interval_s = sync_interval_s
        self._clock = clock
        self._last_sync = clock()
        self.syncs = 0
        """How many times `sync` ran (for tests and the benchmark)."""
        self._buf = bytearray(CHUNK)
        self._fill = 0
        self._index = 0
        self._closed = False
        self.received = 0
        """Plaintext bytes passed to write() so far."""
        self._put(head)
        if sync_interval_s is not None:
            self._durable()

    @property
    def emitted(self) -> int:
        """Plaintext bytes whose sealed chunks have been handed to the sink."""
        if self._closed:
            return self.received
        return self._index * CHUNK

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed AgeStreamWriter")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = len(view)
        fill = self._fill
        if size <= CHUNK - fill:  # the usual case (TS packets): it fits in the open chunk
            self._buf[fill:fill + size] = view
            self._fill = fill + size
            self.received += size
            return size
        pos = 0
        buf = self._buf
        while pos < size:
            if self._fill == CHUNK:  # the held chunk is not the last: more data has arrived
                self._seal(buf, final=False)
                self._fill = 0
            if self._fill == 0 and size - pos > CHUNK:
                # A whole chunk straight from the caller's data, not the last (bytes follow).
                self._seal(view[pos:pos + CHUNK], final=False)
                pos += CHUNK
                continue
            take = min(CHUNK - self._fill, size - pos)
            buf[self._fill:self._fill + take] = view[pos:pos + take]
            self._fill += take
            pos += take
        self.received += size
        return size

    def close(self) -> None:
        """Seal the final chunk (full, partial, or empty only if nothing was written), flush,
        and call `sync`. Idempotent."""
        if self._closed:
            return
        self._seal(memoryview(self._buf)[:self._fill], final=True)
        self._fill = 0
        self._closed = True
        self._durable()

    def __enter__(self) -> AgeStreamWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Finalise even on an exception: what was written is authentic footage, and leaving the
        # held chunk unsealed would lose up to 64 KiB of it.
        self.close()

    def _seal(self, plaintext: bytes | bytearray | memoryview, final: bool) -> None:
        self._put(self._aead.encrypt(_chunk_nonce(self._index, final), plaintext, None))
        self._index += 1
        if (not final and self._sync_interval_s is not None
                and self._clock() - self._last_sync >= self._sync_interval_s):
            self._durable()

    def _put(self, data: bytes) -> None:
        written = self._sink.write(data)
        if written is not None and written < len(data):  # raw (unbuffered) sinks
            view = memoryview(data)
            while written < len(data):
                more = self._sink.write(view[written:])
                written += more or 0

    def _durable(self) -> None:
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            flush()
        if self._sync is not None:
            self._sync()
            self.syncs += 1
            self._last_sync = self._clock()


# -- reading -------------------------------------------------------------------------------------
@dataclass
class SalvageReport:
    """What `decrypt_salvage` recovered. Every byte counted in `bytes` was authenticated."""

    complete: bool = False  # the final chunk was seen and authenticated
    chunks: int = 0  # authenticated chunks returned
    bytes: int = 0  # plaintext bytes returned
    stopped_because: str = ""  # FINISHED when the file was whole and well formed


def _read_line(source: BinaryIO, consumed: int) -> bytes:
    line = source.readline(_MAX_LINE + 1)
    if not line.endswith(b"\n"):
        if len(line) > _MAX_LINE:
            raise AgeFormatError("header line too long: not an age file")
        raise EOFError("file ends inside the header")
    if consumed + len(line) > _MAX_HEADER:
        raise AgeFormatError("header larger than 1 MiB: not an age file")
    return line


def _read_header(source: BinaryIO) -> tuple[list[tuple[list[bytes], bytes]], bytes, bytes]:
    """(stanzas as (arguments, body), MAC, the bytes the MAC covers). EOFError if truncated."""
    first = _read_line(source, 0)
    if first != VERSION_LINE:
        if first.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----"):
            raise AgeFormatError("ASCII-armored age file: not supported here (use age -d)")
        raise AgeFormatError(f"not an age v1 file (first line {first[:40]!r})")
    covered = [first]
    size = len(first)
    stanzas: list[tuple[list[bytes], bytes]] = []
    while True:
        line = _read_line(source, size)
        size += len(line)
        if line.startswith(b"--- "):
            covered.append(b"---")
            mac = _b64decode(line[4:-1], "header MAC")
            if len(mac) != 32:
                raise AgeFormatError("header MAC: wrong length")
            if not stanzas:
                raise AgeFormatError("header has no recipient stanzas")
            return stanzas, mac, b"".join(covered)
        if not line.startswith(b"-> "):
            raise AgeFormatError(f"malformed header line {line[:40]!r}")
        covered.append(line)
        args = line[3:-1].split(b" ")
        if any(not a or any(c < 0x21 or c > 0x7E for c in a) for a in args):
            raise AgeFormatError(f"malformed stanza line {line[:40]!r}")
        body = []
        while True:
            body_line = _read_line(source, size)
            size += len(body_line)
            covered.append(body_line)
            text = body_line[:-1]
            if len(text) > _COLUMNS:
                raise AgeFormatError("stanza body line longer than 64 columns")
            body.append(_b64decode(text, "stanza body"))
            if len(text) < _COLUMNS:
                break
        stanzas.append((args, b"".join(body)))


def _file_key(stanzas: list[tuple[list[bytes], bytes]], identities: list[bytes]) -> bytes:
    for identity in identities:
        if len(identity) != 32:
            raise ValueError("an identity must be a 32-byte X25519 secret key")
        private = X25519PrivateKey.from_private_bytes(identity)
        public = private.public_key().public_bytes_raw()
        for args, body in stanzas:
            if args[0] != b"X25519":
                continue  # other recipient types (and grease) are not ours to open
            if len(args) != 2:
                raise AgeFormatError("X25519 stanza: expected exactly one argument")
            share = _b64decode(args[1], "X25519 share")
            if len(share) != 32 or len(body) != 32:
                raise AgeFormatError("X25519 stanza: wrong share or body length")
            try:
                shared = private.exchange(X25519PublicKey.from_public_bytes(share))
            except ValueError:
                raise AgeFormatError("X25519 stanza: low-order share (all-zero secret)") from None
            wrap_key = _hkdf(shared, share + public, X25519_INFO)
            try:
                return ChaCha20Poly1305(wrap_key).decrypt(_ZERO_NONCE, body, None)
            except InvalidTag:
                continue
    raise AgeFormatError(NO_MATCH)


def _identities(identity: bytes | Sequence[bytes]) -> list[bytes]:
    if isinstance(identity, bytes | bytearray):
        return [bytes(identity)]
    return [bytes(i) for i in identity]


def _open(source: BinaryIO, identity: bytes | Sequence[bytes]) -> ChaCha20Poly1305:
    """Read and verify the header and nonce; the payload cipher. EOFError if truncated."""
    stanzas, mac, covered = _read_header(source)
    file_key = _file_key(stanzas, _identities(identity))
    if not hmac.compare_digest(hmac.new(_hkdf(file_key, b"", b"header"), covered,
                                        sha256).digest(), mac):
        raise AgeFormatError("header MAC mismatch: the header was altered or damaged")
    nonce = _read_exact(source, NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise EOFError("file ends inside the payload nonce")
    return ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))


def _payload(source: BinaryIO, aead: ChaCha20Poly1305, report: SalvageReport) -> Iterator[bytes]:
    """Authenticated chunks in order; on anything else, fill in `report` and stop."""
    index = 0
    sealed = _read_exact(source, SEALED_CHUNK)
    while True:
        size = len(sealed)
        if size == 0:
            report.stopped_because = (
                "file ends after the nonce, before any chunk" if index == 0 else
                f"file ends after chunk {index - 1}, before the final chunk "
                f"(truncated on a chunk boundary)")
            return
        if size == SEALED_CHUNK:
            try:
                plain = aead.decrypt(_chunk_nonce(index, False), sealed, None)
            except InvalidTag:
                pass
            else:
                report.chunks += 1
                report.bytes += len(plain)
                yield plain
                index += 1
                sealed = _read_exact(source, SEALED_CHUNK)
                continue
        try:
            plain = aead.decrypt(_chunk_nonce(index, True), sealed, None)
        except InvalidTag:
            if size < TAG:
                why = f"only {size} bytes left, less than a tag (truncated)"
            elif size < SEALED_CHUNK:
                why = f"{size} bytes do not authenticate as the final chunk (truncated or damaged)"
            else:
                why = "does not authenticate (damaged or altered)"
            report.stopped_because = f"chunk {index}: {why}"
            return
        report.chunks += 1
        report.bytes += len(plain)
        report.complete = True
        yield plain
        if size == SEALED_CHUNK and source.read(1):
            report.stopped_because = f"data after the final chunk {index}"
        elif not plain and index > 0:
            report.stopped_because = "empty final chunk after full chunks (not allowed by age)"
        else:
            report.stopped_because = FINISHED
        return


def decrypt(source: BinaryIO, identity: bytes | Sequence[bytes]) -> Iterator[bytes]:
    """Plaintext chunks of a whole, well-formed age file; AgeFormatError otherwise.

    Like `age -d`, each chunk is authenticated before it is yielded, but truncation is only
    detected at the end: a caller that needs all-or-nothing must discard what it got when this
    raises. The header is checked on the first `next()`.
    """
    try:
        aead = _open(source, identity)
    except EOFError as exc:
        raise AgeFormatError(f"truncated: {exc}") from None
    report = SalvageReport()
    yield from _payload(source, aead, report)
    if report.stopped_because != FINISHED:
        raise AgeFormatError(report.stopped_because)


def salvage_into(source: BinaryIO, identity: bytes | Sequence[bytes],
                 sink: BinaryIO) -> SalvageReport:
    """Write every authenticated chunk of a possibly truncated age file to `sink`, in order,
    stopping at the first chunk that does not authenticate; say how far it got.

    Truncation (anywhere, including inside the header) is reported, not raised. A wrong
    identity or a header that fails its MAC raises AgeFormatError: nothing could be salvaged
    and it is not a truncation.
    """
    report = SalvageReport()
    try:
        aead = _open(source, identity)
    except EOFError as exc:
        report.stopped_because = str(exc)
        return report
    for plain in _payload(source, aead, report):
        sink.write(plain)
    return report


def decrypt_salvage(source: BinaryIO,
                    identity: bytes | Sequence[bytes]) -> tuple[bytes, SalvageReport]:
    """`salvage_into` collected in memory: (authenticated plaintext prefix, report)."""
    out = BytesIO()
    report = salvage_into(source, identity, out)
    return out.getvalue(), report
