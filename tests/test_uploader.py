"""The shift-end uploader: receipts, order, refusals, backoff, resume after a cut and a reboot.

Two halves. First against `ScriptedServer`, an in-memory tus model behind the client's
interface, for the decisions that need an exact script (which error when). Then end to end:
real segments from the project's segment writer, the real ingest server over mutual TLS
(control_center.ingest), and a TCP proxy on 127.0.0.1 that can cut the connection mid-PATCH.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import socket
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center.fleet import age_x25519_keypair
from control_center.ingest.receipts import make_receipt
from evidence_format.age_stream import AgeStreamWriter
from evidence_format.manifest import build_manifest, manifest_sha256, sign_manifest
from firmware.camera.store import SegmentStore
from firmware.uplink.tus import (
    ConnectionLost,
    Created,
    OffsetMismatch,
    PatchResult,
    RetryLater,
    SegmentRefused,
    TusClient,
    Unauthorized,
    UploadGone,
    mutual_tls_context,
)
from firmware.uplink.upload_cli import ProgressPrinter, upload_now
from firmware.uplink.upload_machine import receipt_problems
from firmware.uplink.upload_plan import Backoff, Progress
from firmware.uplink.upload_settings import UploadSettings
from firmware.uplink.uploader import Uploader
from protocol.signing import Signer, load_or_make_key

DEVICE = "tok-001"
CHUNK = 64 * 1024


# -- real segments, written as the recorder writes them --------------------------------------
class Camera:
    """Segments made the recorder's way: age-encrypted through a hashing sink, manifest chained
    to the previous one and signed with the device key, committed to the SegmentStore."""

    def __init__(self, store: SegmentStore, key: Ed25519PrivateKey, recipient: str,
                 device_id: str = DEVICE) -> None:
        self.store, self.key, self.recipient, self.device_id = store, key, recipient, device_id
        last = store.last()
        self.seq = last[0] + 1 if last else 1
        self.prev = last[1] if last else None

    def record(self, plaintext_bytes: int, *, flags: tuple[str, ...] = ()) -> int:
        seq, self.seq = self.seq, self.seq + 1
        file = self.store.open_segment(seq)
        age = AgeStreamWriter(file, [self.recipient])
        age.write(random.Random(seq).randbytes(plaintext_bytes))
        age.close()
        file.flush()
        ciphertext = self.store.path(seq, ".ts.age.part").read_bytes()
        minute = f"2024-05-01T10:{seq % 60:02d}"
        manifest = build_manifest(
            device_id=self.device_id, seq=seq, start_utc=f"{minute}:00.000Z",
            end_utc=f"{minute}:09.000Z", start_mono=10.0 * seq, end_mono=10.0 * seq + 9,
            frames=270, gps_track=[], call_id="call-1" if "evidence" in flags else None,
            flags=list(flags), ciphertext_sha256=hashlib.sha256(ciphertext).hexdigest(),
            ciphertext_bytes=len(ciphertext), prev_manifest_sha256=self.prev)
        body, signature = sign_manifest(manifest, self.key)
        self.prev = manifest_sha256(manifest)
        self.store.commit(seq, file, manifest=body, signature=signature,
                          manifest_sha256=self.prev, evidence="evidence" in flags,
                          call_id=manifest["call_id"])
        return seq


def files_of(store: SegmentStore, seq: int) -> list[Path]:
    return [p for p in (store.path(seq, s) for s in (".ts.age", ".json", ".json.minisig"))
            if p.exists()]


def corrupt(store: SegmentStore, seq: int) -> None:
    """Flip one byte in the middle of the encrypted segment (same size, wrong hash)."""
    path = store.path(seq, ".ts.age")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class Sleeps:
    """The injected sleep: records each delay; `then` runs on each call (e.g. resume)."""

    def __init__(self, then: Callable[[float], None] | None = None) -> None:
        self.delays: list[float] = []
        self.then = then

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.then:
            self.then(seconds)


class PowerCut(BaseException):
    """Raised from inside the uploader to simulate the device losing power right there."""


# -- a scripted in-memory tus server ---------------------------------------------------------
class ScriptedServer:
    """Holds uploads like the real server; `fail` queues an exception for a method's next
    call(s) (about segment `seq` only, if given), so a test says exactly which request fails
    how. With `respond_async` it honours `Prefer: respond-async` as the real server does (the
    receipt, or the refusal, then comes from GET .../receipt); without, it answers the last
    PATCH with the receipt, as a server that ignores the preference may."""

    def __init__(self, centre: Signer, *, respond_async: bool = False) -> None:
        self.centre = centre
        self.respond_async = respond_async
        self.uploads: dict[str, dict[str, Any]] = {}
        self.failures: dict[tuple[str, int | None], list[Exception]] = {}
        self.calls: list[str] = []
        self.clients = 0
        self._lock = threading.Lock()  # the uploader calls from three threads

    def fail(self, method: str, *errors: Exception, seq: int | None = None) -> None:
        self.failures.setdefault((method, seq), []).extend(errors)

    def client(self) -> ScriptedClient:
        with self._lock:
            self.clients += 1
        return ScriptedClient(self)

    def check(self, method: str, seq: int | None) -> None:
        with self._lock:
            self.calls.append(method)
            for key in ((method, seq), (method, None)):
                queued = self.failures.get(key)
                if queued:
                    raise queued.pop(0)


class ScriptedClient:
    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.body_bytes_sent = 0

    def create(self, length: int, metadata: dict[str, bytes], *, source: BinaryIO | None = None,
               body_length: int = 0, respond_async: bool = False,
               on_sent: Callable[[int], None] | None = None) -> Created:
        manifest = json.loads(metadata["manifest"])
        self.server.check("create", manifest["seq"])
        for location, upload in self.server.uploads.items():
            if upload["manifest"] == metadata["manifest"]:  # the same segment: the same upload
                return Created(location, len(upload["data"]), upload["receipt"])
        location = f"/files/{len(self.server.uploads) + 1}"
        upload = self.server.uploads[location] = {
            "length": length, "data": bytearray(), "manifest": metadata["manifest"],
            "parsed": manifest, "receipt": None, "refused": None}
        if source is not None and body_length:
            self._append(upload, source, body_length, on_sent)
            if len(upload["data"]) == length:
                self._complete(upload)
                if not (respond_async and self.server.respond_async):
                    self._raise_refusal(upload)
        return Created(location, len(upload["data"]), upload["receipt"])

    def _upload(self, location: str) -> dict[str, Any]:
        if location not in self.server.uploads:
            raise UploadGone("no such upload", 404)
        return self.server.uploads[location]

    def _seq(self, location: str) -> int | None:
        upload = self.server.uploads.get(location)
        return upload["parsed"]["seq"] if upload else None

    def head(self, location: str) -> tuple[int, int | None]:
        self.server.check("head", self._seq(location))
        upload = self._upload(location)
        return len(upload["data"]), upload["length"]

    def patch(self, location: str, offset: int, source: BinaryIO, length: int, *,
              respond_async: bool = False,
              on_sent: Callable[[int], None] | None = None) -> PatchResult:
        self.server.check("patch", self._seq(location))
        upload = self._upload(location)
        if offset != len(upload["data"]):
            raise OffsetMismatch("offset", 409)
        self._append(upload, source, length, on_sent)
        if len(upload["data"]) < upload["length"]:
            return PatchResult(len(upload["data"]), None)
        self._complete(upload)
        if respond_async and self.server.respond_async:
            return PatchResult(len(upload["data"]), None)
        self._raise_refusal(upload)
        return PatchResult(len(upload["data"]), upload["receipt"])

    def receipt(self, location: str, wait_s: float = 0.0) -> dict[str, Any] | None:
        self.server.check("receipt", self._seq(location))
        upload = self._upload(location)
        if len(upload["data"]) < upload["length"]:
            raise OffsetMismatch(f"holds {len(upload['data'])} bytes", 409)
        self._raise_refusal(upload)
        return upload["receipt"]

    def close(self) -> None:
        pass

    def _append(self, upload: dict[str, Any], source: BinaryIO, length: int,
                on_sent: Callable[[int], None] | None) -> None:
        data = source.read(length)
        self.body_bytes_sent += len(data)
        if on_sent is not None:
            on_sent(len(data))
        upload["data"] += data

    def _complete(self, upload: dict[str, Any]) -> None:
        manifest = upload["parsed"]
        digest = hashlib.sha256(upload["data"]).hexdigest()
        if digest != manifest["ciphertext_sha256"]:
            upload["refused"] = "the segment was altered or damaged before it was sent"
            return
        upload["receipt"] = make_receipt(
            self.server.centre, device_id=manifest["device_id"], seq=manifest["seq"],
            ciphertext_sha256=digest,
            manifest_sha256=hashlib.sha256(upload["manifest"]).hexdigest(),
            ciphertext_bytes=len(upload["data"]), store="directory")

    @staticmethod
    def _raise_refusal(upload: dict[str, Any]) -> None:
        if upload["refused"]:
            raise SegmentRefused(upload["refused"], 422)


@pytest.fixture(scope="module")
def recipient() -> str:
    return age_x25519_keypair()[1]


@pytest.fixture
def centre() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


@pytest.fixture
def card(tmp_path: Path, recipient: str):
    store = SegmentStore(tmp_path / "data" / "recordings")
    yield store, Camera(store, Ed25519PrivateKey.generate(), recipient)
    store.close()


def scripted_uploader(store: SegmentStore, server: ScriptedServer, centre: Signer, **kw: Any):
    kw.setdefault("sleep", Sleeps())
    return Uploader(store, store.directory.parent / "upload.sqlite", server.client,
                    [centre.public_key_b64], DEVICE, chunk_bytes=CHUNK,
                    rand=lambda: 0.0, **kw)


# -- receipts (pure) -------------------------------------------------------------------------
@pytest.fixture
def receipt_case(centre: Signer):
    expected = {"device_id": DEVICE, "seq": 7, "ciphertext_sha256": "a" * 64,
                "manifest_sha256": "b" * 64, "ciphertext_bytes": 1234}
    receipt = make_receipt(centre, store="directory", **expected)
    return receipt, expected


def test_a_receipt_signed_by_the_centre_for_this_segment_is_valid(centre, receipt_case) -> None:
    receipt, expected = receipt_case
    assert receipt_problems(receipt, [centre._key.public_key()], **expected) == []


def test_a_receipt_signed_by_another_key_is_refused(receipt_case) -> None:
    receipt, expected = receipt_case
    other = Ed25519PrivateKey.generate().public_key()
    assert "signature" in receipt_problems(receipt, [other], **expected)[0]


def test_an_edited_receipt_fails_its_signature(centre, receipt_case) -> None:
    receipt, expected = receipt_case
    edited = {**receipt, "seq": 8}
    assert "signature" in receipt_problems(edited, [centre._key.public_key()],
                                           **{**expected, "seq": 8})[0]


@pytest.mark.parametrize("field", ["device_id", "seq", "ciphertext_sha256", "manifest_sha256",
                                   "ciphertext_bytes"])
def test_a_genuine_receipt_for_another_segment_is_refused(centre, receipt_case, field) -> None:
    receipt, expected = receipt_case
    other = {"device_id": "tok-002", "seq": 8, "ciphertext_sha256": "c" * 64,
             "manifest_sha256": "d" * 64, "ciphertext_bytes": 1}[field]
    problems = receipt_problems(receipt, [centre._key.public_key()],
                                **{**expected, field: other})
    assert problems and problems[0].startswith(field)


def test_a_receipt_missing_a_field_is_refused(centre, receipt_case) -> None:
    receipt, expected = receipt_case
    del receipt["stored_at"]
    assert receipt_problems(receipt, [centre._key.public_key()], **expected) == \
        ["missing stored_at"]


# -- decisions, against the scripted server --------------------------------------------------
def test_everything_uploads_and_each_segment_is_deleted_after_its_receipt(card, centre) -> None:
    store, camera = card
    seqs = [camera.record(150_000) for _ in range(3)]
    server = ScriptedServer(centre)
    uploader = scripted_uploader(store, server, centre)
    summary = uploader.run_once(threading.Event())
    assert summary.uploaded == seqs and summary.complete and not summary.refused
    assert [r["seq"] for r in summary.receipts] == seqs
    assert store.segments() == [] and all(files_of(store, s) == [] for s in seqs)
    kept = [json.loads(line) for line in uploader.receipts_path.read_text().splitlines()]
    assert kept == summary.receipts


def test_a_receipted_segment_that_cannot_be_finished_is_deferred_not_complete(
        card, centre, monkeypatch) -> None:
    store, camera = card
    seq = camera.record(10_000)

    def locked(_seq: int) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "mark_uploaded", locked)
    uploader = scripted_uploader(store, ScriptedServer(centre), centre)
    summary = uploader.run_once(threading.Event())
    assert not summary.complete and seq in summary.deferred
    assert len(files_of(store, seq)) == 3  # still on the card, receipt kept for the next pass
    monkeypatch.undo()
    assert uploader.run_once(threading.Event()).complete and files_of(store, seq) == []


def test_a_new_recorder_continues_the_chain_after_everything_was_uploaded(card,
                                                                         centre) -> None:
    store, camera = card
    first, last = camera.record(10_000), camera.record(10_000)
    uploader = scripted_uploader(store, ScriptedServer(centre), centre)
    assert uploader.run_once(threading.Event()).uploaded == [first, last]
    assert store.segments() == [] and files_of(store, last) == []
    assert store.last()[0] == last  # the index kept the chain head: no restart at seq 1


def test_evidence_and_sos_segments_are_uploaded_first(card, centre) -> None:
    store, camera = card
    camera.record(5_000)
    camera.record(5_000, flags=("evidence", "sos"))
    camera.record(5_000)
    camera.record(5_000, flags=("evidence",))
    summary = scripted_uploader(store, ScriptedServer(centre), centre).run_once(
        threading.Event())
    assert summary.uploaded == [2, 4, 1, 3]


def test_a_forged_receipt_leaves_the_segment_on_the_device(card, centre) -> None:
    store, camera = card
    seq = camera.record(20_000)
    forger = Signer(Ed25519PrivateKey.generate())
    server = ScriptedServer(forger)  # receipts signed by a key the device does not trust
    summary = scripted_uploader(store, server, centre).run_once(threading.Event())
    assert summary.uploaded == [] and "invalid receipt" in summary.deferred[seq]
    assert len(files_of(store, seq)) == 3 and not store.segments()[0].uploaded


def test_a_refused_segment_stays_and_is_not_offered_again(card, centre, caplog) -> None:
    store, camera = card
    bad, good = camera.record(30_000), camera.record(30_000)
    corrupt(store, bad)
    server = ScriptedServer(centre)
    uploader = scripted_uploader(store, server, centre)
    with caplog.at_level("ERROR", logger="sos.upload"):
        summary = uploader.run_once(threading.Event())
    assert summary.uploaded == [good]
    assert summary.refused == {bad: "the segment was altered or damaged before it was sent "
                                    "(HTTP 422)"}
    assert len(files_of(store, bad)) == 3
    assert [r.getMessage() for r in caplog.records
            if r.levelname == "ERROR"] == [f"segment {bad:06d} refused by the centre: "
                                           f"{summary.refused[bad]}; it stays on the device "
                                           f"and is not offered again (sos-device upload "
                                           f"--now --retry-refused)"]
    calls = len(server.calls)
    again = uploader.run_once(threading.Event())
    assert again.refused == summary.refused and again.uploaded == []
    assert len(server.calls) == calls  # no request at all for it
    assert uploader.retry_refused() == [bad]
    assert bad in {c.seq for c in uploader.pending()}


def test_with_a_server_that_answers_at_once_the_receipts_come_from_a_second_connection(
        card, centre) -> None:
    store, camera = card
    seqs = [camera.record(3 * CHUNK) for _ in range(3)]
    server = ScriptedServer(centre, respond_async=True)
    summary = scripted_uploader(store, server, centre).run_once(threading.Event())
    assert summary.uploaded == seqs and summary.complete
    assert server.calls.count("receipt") == 3 and files_of(store, seqs[-1]) == []


def test_the_next_segment_is_created_on_its_own_connection_not_the_byte_one(card,
                                                                           centre) -> None:
    store, camera = card
    first, second = camera.record(3 * CHUNK), camera.record(3 * CHUNK)
    server = ScriptedServer(centre, respond_async=True)
    requests: list[tuple[int, str, int | None]] = []  # (client, method, seq)

    class Watching(ScriptedClient):
        def create(self, length: int, metadata: dict[str, bytes], **kwargs: Any) -> Created:
            requests.append((id(self), "create", int(metadata["seq"])))
            return super().create(length, metadata, **kwargs)

        def patch(self, location: str, *args: Any, **kwargs: Any) -> PatchResult:
            requests.append((id(self), "patch", self._seq(location)))
            return super().patch(location, *args, **kwargs)

    uploader = Uploader(store, store.directory.parent / "upload.sqlite",
                        lambda: Watching(server), [centre.public_key_b64], DEVICE,
                        chunk_bytes=CHUNK, sleep=Sleeps())
    assert uploader.run_once(threading.Event()).uploaded == [first, second]
    byte_connection = next(c for c, method, _ in requests if method == "patch")
    assert (byte_connection, "create", first) in requests  # with its first chunk
    creators = {c for c, method, seq in requests if method == "create" and seq == second}
    assert creators and byte_connection not in creators
    assert {seq for c, method, seq in requests if method == "patch"} == {first, second}


def test_a_segment_refused_after_the_server_answered_at_once_stays(card, centre) -> None:
    store, camera = card
    bad, good = camera.record(3 * CHUNK), camera.record(3 * CHUNK)
    corrupt(store, bad)
    server = ScriptedServer(centre, respond_async=True)
    summary = scripted_uploader(store, server, centre).run_once(threading.Event())
    assert summary.uploaded == [good]
    assert summary.refused == {bad: "the segment was altered or damaged before it was sent "
                                    "(HTTP 422)"}
    assert len(files_of(store, bad)) == 3


def test_a_segment_the_server_lost_before_storing_is_sent_again_in_the_same_pass(
        card, centre) -> None:
    store, camera = card
    seq = camera.record(3 * CHUNK)
    server = ScriptedServer(centre, respond_async=True)

    def restarted() -> None:  # the server died before its completion: it kept 2 chunks
        upload = next(iter(server.uploads.values()))
        del upload["data"][2 * CHUNK:]
        upload["receipt"] = None

    class Restarting(ScriptedClient):
        def receipt(self, location: str, wait_s: float = 0.0) -> dict[str, Any] | None:
            if server.calls.count("receipt") == 0:
                restarted()
            return super().receipt(location, wait_s)

    uploader = Uploader(store, store.directory.parent / "upload.sqlite",
                        lambda: Restarting(server), [centre.public_key_b64], DEVICE,
                        chunk_bytes=CHUNK, sleep=Sleeps())
    size = store.path(seq, ".ts.age").stat().st_size
    summary = uploader.run_once(threading.Event())
    assert summary.uploaded == [seq] and summary.complete
    assert summary.bytes_resent == size - 2 * CHUNK  # only what the server lost


def test_an_upload_the_server_forgot_before_the_receipt_is_sent_again_in_the_same_pass(
        card, centre) -> None:
    store, camera = card
    seq = camera.record(3 * CHUNK)
    server = ScriptedServer(centre, respond_async=True)
    server.fail("receipt", UploadGone("no upload on this server", 404))
    summary = scripted_uploader(store, server, centre).run_once(threading.Event())
    assert summary.uploaded == [seq] and summary.complete
    assert server.calls.count("create") == 2 and files_of(store, seq) == []


def test_a_receipt_request_not_authorised_defers_the_segment_and_does_not_refuse_it(
        card, centre) -> None:
    store, camera = card
    seq = camera.record(3 * CHUNK)
    server = ScriptedServer(centre, respond_async=True)
    server.fail("receipt", Unauthorized("certificate revoked", 403))
    uploader = scripted_uploader(store, server, centre)
    summary = uploader.run_once(threading.Event())
    assert summary.deferred == {seq: "not authorised: certificate revoked"}
    assert not summary.refused and uploader.state.refusals() == {}
    assert uploader.run_once(threading.Event()).uploaded == [seq]  # the next pass settles it


def test_a_centre_without_creation_with_upload_gets_the_bytes_by_patch(card, centre) -> None:
    store, camera = card
    seq = camera.record(3 * CHUNK)
    server = ScriptedServer(centre)

    class OldCentre(ScriptedClient):
        def create(self, length: int, metadata: dict[str, bytes], **kwargs: Any) -> Created:
            if kwargs.get("body_length"):
                raise SegmentRefused("a creation request carries no body", 400)
            return super().create(length, metadata, **kwargs)

    uploader = Uploader(store, store.directory.parent / "upload.sqlite",
                        lambda: OldCentre(server), [centre.public_key_b64], DEVICE,
                        chunk_bytes=CHUNK, sleep=Sleeps())
    summary = uploader.run_once(threading.Event())
    assert summary.uploaded == [seq] and not summary.refused and summary.bytes_resent == 0


def test_retry_later_waits_at_least_retry_after_and_then_goes_on(card, centre) -> None:
    store, camera = card
    seq = camera.record(20_000)
    server = ScriptedServer(centre)
    server.fail("create", RetryLater(40.0, "busy", 503), RetryLater(None, "disk full", 507))
    sleeps = Sleeps()
    uploader = scripted_uploader(store, server, centre, sleep=sleeps,
                                 backoff=Backoff(base_s=1.0, max_s=30.0, jitter=0.5))
    summary = uploader.run_once(threading.Event())
    assert summary.uploaded == [seq]
    assert sleeps.delays == [40.0, 2.0]  # Retry-After beats the cap; then 1 s * 2 (rand 0)


def test_the_pass_ends_after_max_attempts_and_defers_the_rest(card, centre) -> None:
    store, camera = card
    first, second = camera.record(5_000), camera.record(5_000)
    server = ScriptedServer(centre)
    server.fail("create", *[ConnectionLost("refused")] * 3, seq=first)
    sleeps = Sleeps()
    uploader = scripted_uploader(store, server, centre, sleep=sleeps, max_attempts=3,
                                 backoff=Backoff(base_s=1.0, jitter=0.0))
    summary = uploader.run_once(threading.Event())
    assert sleeps.delays == [1.0, 2.0]
    assert set(summary.deferred) == {first, second} and not summary.uploaded
    assert len(files_of(store, first)) == 3


def test_not_authorised_ends_the_pass_without_blaming_any_segment(card, centre) -> None:
    store, camera = card
    first, second = camera.record(5_000), camera.record(5_000)
    server = ScriptedServer(centre)
    server.fail("create", Unauthorized("certificate revoked", 403), seq=first)
    summary = scripted_uploader(store, server, centre).run_once(threading.Event())
    assert not summary.refused and set(summary.deferred) == {first, second}
    assert summary.deferred[first] == "not authorised: certificate revoked"


def test_an_upload_the_server_forgot_is_created_again(card, centre) -> None:
    store, camera = card
    seq = camera.record(200_000)
    server = ScriptedServer(centre)
    server.fail("patch", ConnectionLost("cut"))
    sleeps = Sleeps(then=lambda s: server.uploads.clear())  # server restarted, state lost
    summary = scripted_uploader(store, server, centre, sleep=sleeps).run_once(
        threading.Event())
    assert summary.uploaded == [seq] and server.calls.count("create") == 2


def test_a_409_asks_the_server_for_its_offset_at_once(card, centre) -> None:
    store, camera = card
    seq = camera.record(100_000)
    server = ScriptedServer(centre)
    server.fail("patch", OffsetMismatch("offset", 409))
    sleeps = Sleeps()
    summary = scripted_uploader(store, server, centre, sleep=sleeps).run_once(
        threading.Event())
    assert summary.uploaded == [seq] and sleeps.delays == []
    assert server.calls[:4] == ["create", "patch", "head", "patch"]


def test_stopping_ends_the_pass_between_chunks_and_the_next_pass_resumes(card, centre) -> None:
    store, camera = card
    seq = camera.record(5 * CHUNK)
    server = ScriptedServer(centre)
    stop = threading.Event()
    uploader = scripted_uploader(
        store, server, centre,
        on_progress=lambda p: stop.set() if p.bytes_done >= 2 * CHUNK else None)
    summary = uploader.run_once(stop)
    assert summary.deferred == {seq: "stopped"} and summary.bytes_sent == 2 * CHUNK
    again = uploader.run_once(threading.Event())
    assert again.uploaded == [seq] and again.bytes_resent == 0
    assert summary.bytes_sent + again.bytes_sent == store_size(server)


def store_size(server: ScriptedServer) -> int:
    return sum(len(u["data"]) for u in server.uploads.values())


def test_a_restart_after_the_last_patch_fetches_the_receipt(card, centre, monkeypatch) -> None:
    store, camera = card
    seq = camera.record(3 * CHUNK)
    server = ScriptedServer(centre, respond_async=True)

    class LosesTheReceipt(ScriptedClient):
        def receipt(self, location: str, wait_s: float = 0.0) -> dict[str, Any] | None:
            raise PowerCut()  # the device died before it had the receipt

    died: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    crashing = Uploader(store, store.directory.parent / "upload.sqlite",
                        lambda: LosesTheReceipt(server), [centre.public_key_b64], DEVICE,
                        chunk_bytes=CHUNK, sleep=Sleeps())
    crashing.run_once(threading.Event())
    assert [type(e) for e in died] == [PowerCut] and len(files_of(store, seq)) == 3
    del crashing
    rebooted = scripted_uploader(SegmentStore(store.directory), server, centre)
    summary = rebooted.run_once(threading.Event())
    assert summary.uploaded == [seq] and summary.bytes_sent == 0
    assert server.calls[-2:] == ["head", "receipt"]


def test_a_second_uploader_finds_the_lock_taken_and_does_nothing(card, centre) -> None:
    store, camera = card
    seq = camera.record(3 * CHUNK)
    server = ScriptedServer(centre)
    second = scripted_uploader(store, server, centre)
    seen: list[Any] = []

    def during_first_pass(progress) -> None:
        if progress.bytes_done and not seen:
            seen.append(second.run_once(threading.Event()))

    first = scripted_uploader(store, server, centre, on_progress=during_first_pass)
    summary = first.run_once(threading.Event())
    assert summary.uploaded == [seq]
    assert seen[0].busy and seen[0].uploaded == [] and seen[0].bytes_sent == 0
    assert server.clients == 1  # the second never even connected
    assert second.run_once(threading.Event()).busy is False  # free again afterwards


# == end to end: the real ingest server over mutual TLS =====================================
class Ingest:
    """The real server (control_center.ingest) with a fleet, and this device's identity."""

    def __init__(self, root: Path) -> None:
        from control_center.audit import AuditLog
        from control_center.ingest import DirectoryStore, IngestServer
        from simulator.broker import PrivateBroker

        broker = PrivateBroker(root / "fleet-broker")  # for its fleet and identities only
        self.fleet = broker.fleet
        self.tls = broker.identity(DEVICE)  # the device's MQTT identity, reused for uploads
        self.key = load_or_make_key(broker.signing_key_file(DEVICE))
        self.recipient = self.fleet.evidence_recipients()[0]
        self.centre_keys = self.fleet.centre_public_keys()
        cert = self.fleet.issue_server("ingest", ["127.0.0.1", "localhost"])
        self.evidence = DirectoryStore(root / "evidence")
        self.server = IngestServer(self.fleet, self.evidence, AuditLog(root / "audit.jsonl"),
                                   workdir=root / "ingest", cert_file=cert.cert_file,
                                   key_file=cert.key_file, space_retry_after_s=400)
        self.server.start()

    def client_factory(self, port: int | None = None) -> Callable[[], TusClient]:
        context = mutual_tls_context(self.tls.ca_file, self.tls.cert_file, self.tls.key_file)
        url = f"https://127.0.0.1:{port or self.server.port}/files/"
        return lambda: TusClient(url, context)

    def stored(self, seq: int) -> bytes | None:
        path = self.evidence.device_dir(DEVICE) / f"{seq:06d}.ts.age"
        return path.read_bytes() if path.exists() else None

    def offset(self, location: str) -> int:
        with self.client_factory()() as client:
            return client.head(location)[0]


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 to the server that cuts every connection (both directions)
    once `cut_at` bytes went from client to server; counts those bytes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_bytes = 0
        self.cut_at: int | None = None
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream, True)
            self._spawn(self._pump, upstream, client, False)

    def _pump(self, source: socket.socket, target: socket.socket, counted: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    target.shutdown(socket.SHUT_WR)
                return
            if counted:
                with self._lock:
                    room = None if self.cut_at is None else self.cut_at - self.upstream_bytes
                    data = data if room is None else data[:max(0, room)]
                    self.upstream_bytes += len(data)
                    cutting = room is not None and room <= len(data)
            else:
                cutting = False
            with contextlib.suppress(OSError):
                target.sendall(data)
            if cutting:
                self.cut_now()
                return

    def cut_now(self) -> None:
        with self._lock:
            self.cut_at = None
            sockets = list(self._sockets)
        self.cut.set()  # before the client can notice
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.cut_now()  # ends every pump
        for thread in self._threads:
            thread.join(timeout=10)
        with self._lock:
            for sock in self._sockets:
                sock.close()


@pytest.fixture
def ingest(tmp_path: Path):
    running = Ingest(tmp_path / "centre")
    yield running
    running.server.stop()


@pytest.fixture
def device(tmp_path: Path, ingest: Ingest):
    store = SegmentStore(tmp_path / "device" / "recordings")
    yield store, Camera(store, ingest.key, ingest.recipient)
    store.close()


def real_uploader(store: SegmentStore, ingest: Ingest, *, port: int | None = None,
                  **kw: Any) -> Uploader:
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("chunk_bytes", CHUNK)
    return Uploader(store, store.directory.parent / "upload.sqlite",
                    kw.pop("client_factory", None) or ingest.client_factory(port),
                    ingest.centre_keys, DEVICE, rand=lambda: 0.0, **kw)


def test_e2e_segments_reach_the_centre_and_leave_the_device(device, ingest) -> None:
    store, camera = device
    ordinary = camera.record(300_000)
    evidence = camera.record(200_000, flags=("evidence", "sos"))
    local = {s: store.path(s, ".ts.age").read_bytes() for s in (ordinary, evidence)}
    uploader = real_uploader(store, ingest)
    summary = uploader.run_once(threading.Event())
    assert summary.uploaded == [evidence, ordinary] and summary.complete
    assert summary.bytes_sent == sum(len(b) for b in local.values())
    assert summary.bytes_resent == 0
    for seq, data in local.items():
        assert ingest.stored(seq) == data
        assert files_of(store, seq) == []
    lines = uploader.receipts_path.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [evidence, ordinary]


def test_e2e_cut_mid_patch_then_reboot_resends_at_most_one_chunk(device, ingest) -> None:
    store, camera = device
    seq = camera.record(12 * CHUNK)
    size = store.path(seq, ".ts.age").stat().st_size
    proxy = CuttableProxy(ingest.server.port)
    try:
        proxy.cut_at = int(4.5 * CHUNK)  # TLS handshake, POST, HEAD, then mid 5th PATCH

        def power_cut(seconds: float) -> None:
            raise PowerCut()  # the device dies right after the connection dropped

        doomed = real_uploader(store, ingest, port=proxy.port, sleep=power_cut)
        with pytest.raises(PowerCut):
            doomed.run_once(threading.Event())
        assert proxy.cut.is_set()
        location = doomed.state.location(seq, hashlib.sha256(
            store.path(seq, ".json").read_bytes()).hexdigest())
        del doomed  # thrown away, as by a reboot; only the disk remains
        assert location is not None
        kept = ingest.offset(location)
        assert 3 * CHUNK < kept < 5 * CHUNK  # the cut landed inside a PATCH body
        before = proxy.upstream_bytes

        rebooted_store = SegmentStore(store.directory)
        rebooted = real_uploader(rebooted_store, ingest, port=proxy.port)
        summary = rebooted.run_once(threading.Event())
        rebooted_store.close()
    finally:
        proxy.close()
    assert summary.uploaded == [seq]
    assert summary.bytes_sent == size - kept  # resumed from the server's offset
    assert 0 < summary.bytes_resent <= CHUNK
    assert ingest.stored(seq) is not None and files_of(store, seq) == []
    # On the wire, both lives together: the segment once, at most one chunk again, plus
    # TLS and HTTP overhead.
    assert proxy.upstream_bytes <= size + CHUNK + 64 * 1024
    assert proxy.upstream_bytes - before < size - kept + 64 * 1024


def test_e2e_a_device_that_lost_its_upload_state_posts_again_and_resumes(device,
                                                                        ingest) -> None:
    store, camera = device
    seq = camera.record(6 * CHUNK)
    size = store.path(seq, ".ts.age").stat().st_size
    stop = threading.Event()
    first = real_uploader(store, ingest, on_progress=lambda p: stop.set()
                          if p.bytes_done >= 3 * CHUNK else None)
    assert first.run_once(stop).deferred == {seq: "stopped"}
    first.close()
    state = store.directory.parent / "upload.sqlite"
    for path in state.parent.glob("upload.sqlite*"):
        path.unlink()  # the saved location is gone
    summary = real_uploader(store, ingest).run_once(threading.Event())
    assert summary.uploaded == [seq] and ingest.stored(seq) is not None
    # POST found the same upload; the PATCH from 0 got a 409 (its chunk dropped), then HEAD.
    assert summary.bytes_sent == (size - 3 * CHUNK) + CHUNK


def test_e2e_a_corrupted_segment_is_refused_and_stays_on_the_device(device, ingest) -> None:
    store, camera = device
    bad = camera.record(3 * CHUNK)
    good = camera.record(CHUNK)
    corrupt(store, bad)  # same size, so only the final hash check can tell
    uploader = real_uploader(store, ingest)
    summary = uploader.run_once(threading.Event())
    assert summary.uploaded == [good]
    assert list(summary.refused) == [bad] and "altered or damaged" in summary.refused[bad]
    assert "HTTP 422" in summary.refused[bad]
    assert len(files_of(store, bad)) == 3 and ingest.stored(bad) is None
    assert [s.seq for s in store.segments() if not s.uploaded] == [bad]
    again = uploader.run_once(threading.Event())
    assert again.bytes_sent == 0 and again.refused == summary.refused


def test_e2e_an_invalid_receipt_does_not_delete_and_a_later_pass_does(device, ingest) -> None:
    store, camera = device
    seq = camera.record(2 * CHUNK)
    real = ingest.client_factory()

    def tampering_factory() -> TusClient:
        client = real()
        receipt = client.receipt

        def tampered(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
            result = receipt(*args, **kwargs)
            return result and {**result, "ciphertext_sha256": "0" * 64}

        client.receipt = tampered  # type: ignore[method-assign]
        return client

    summary = real_uploader(store, ingest, client_factory=tampering_factory).run_once(
        threading.Event())
    assert summary.uploaded == [] and "invalid receipt" in summary.deferred[seq]
    assert len(files_of(store, seq)) == 3 and not store.segments()[0].uploaded
    assert ingest.stored(seq) is not None  # the centre has it; the device keeps its copy
    honest = real_uploader(store, ingest).run_once(threading.Event())
    assert honest.uploaded == [seq] and honest.bytes_sent == 0  # GET .../receipt
    assert files_of(store, seq) == []


def test_e2e_backoff_honours_retry_after_on_503(device, ingest) -> None:
    store, camera = device
    seq = camera.record(CHUNK)
    ingest.server.pause()
    sleeps = Sleeps(then=lambda s: ingest.server.resume())
    summary = real_uploader(store, ingest, sleep=sleeps,
                            backoff=Backoff(base_s=1.0, max_s=300.0)).run_once(
        threading.Event())
    assert summary.uploaded == [seq]
    assert sleeps.delays == [float(ingest.server.retry_after_s)]


def test_e2e_backoff_honours_retry_after_on_507_above_the_cap(device, ingest) -> None:
    store, camera = device
    seq = camera.record(CHUNK)
    ingest.server.min_free_bytes = 1 << 62  # the store is "full"

    def space_freed(seconds: float) -> None:
        ingest.server.min_free_bytes = 0

    sleeps = Sleeps(then=space_freed)
    summary = real_uploader(store, ingest, sleep=sleeps,
                            backoff=Backoff(base_s=1.0, max_s=300.0)).run_once(
        threading.Event())
    assert summary.uploaded == [seq] and sleeps.delays == [400.0]


def test_e2e_two_uploaders_on_one_device_do_not_race(device, ingest) -> None:
    store, camera = device
    seq = camera.record(3 * CHUNK)
    other_store = SegmentStore(store.directory)  # as `sos-device upload --now` opens it
    other = real_uploader(other_store, ingest)
    during: list[Any] = []

    def meanwhile(progress) -> None:
        if progress.bytes_done and not during:
            during.append(other.run_once(threading.Event()))

    summary = real_uploader(store, ingest, on_progress=meanwhile).run_once(threading.Event())
    other_store.close()
    assert summary.uploaded == [seq] and during[0].busy and during[0].bytes_sent == 0


def test_e2e_upload_now_prints_one_line_per_segment_and_a_summary(tmp_path, ingest) -> None:
    data_dir = tmp_path / "cli-device"
    store = SegmentStore(data_dir / "recordings")
    camera = Camera(store, ingest.key, ingest.recipient)
    first, second = camera.record(CHUNK), camera.record(CHUNK)
    store.close()
    config = SimpleNamespace(
        device_id=DEVICE, data_dir=data_dir, broker=ingest.tls, centre_keys=ingest.centre_keys,
        upload=UploadSettings.from_dict({"url": ingest.server.url, "chunk_bytes": CHUNK}))
    out = io.StringIO()
    status = upload_now("device.toml", load_config=lambda path: config, out=out)
    lines = out.getvalue().splitlines()
    assert status == 0
    assert lines[0].startswith("[") and "0/2 segments" in lines[0]
    assert "1/2 segments" in lines[1] and "2/2 segments" in lines[2]
    assert lines[3].startswith("uploaded 2 segment(s)")
    assert lines[-1] == "nothing left to upload"
    assert ingest.stored(first) is not None and ingest.stored(second) is not None


def test_e2e_upload_now_exits_non_zero_when_a_segment_is_refused(tmp_path, ingest) -> None:
    data_dir = tmp_path / "cli-device"
    store = SegmentStore(data_dir / "recordings")
    seq = Camera(store, ingest.key, ingest.recipient).record(CHUNK)
    corrupt(store, seq)
    store.close()
    config = SimpleNamespace(
        device_id=DEVICE, data_dir=data_dir, broker=ingest.tls, centre_keys=ingest.centre_keys,
        upload=UploadSettings.from_dict({"url": ingest.server.url}))
    out = io.StringIO()
    status = upload_now("device.toml", load_config=lambda path: config, out=out)
    assert status == 1
    assert f"REFUSED segment {seq:06d}" in out.getvalue()


def test_the_progress_bar_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=True)
    printer(Progress(2, 100))
    printer(Progress(2, 100, bytes_done=50, current_seq=1))
    printer.end()
    assert out.getvalue().count("\r") == 2 and out.getvalue().endswith("\n")
    assert "\n" not in out.getvalue()[:-1]
