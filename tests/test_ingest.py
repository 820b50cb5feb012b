"""The evidence ingest server over real TLS sockets: tus uploads of real signed, age-encrypted
segments, resumption, refusals, back-pressure, receipts and the audit trail."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from control_center import pki
from control_center.audit import verify_log
from control_center.evidence import decrypt_segment, keys_from_fleet, verify_directory
from control_center.evidence_cli import main as sos_evidence
from control_center.fleet import Fleet
from control_center.ingest import IngestServer, receipt_problems
from control_center.ingest.uploads import Upload, Uploads
from control_center.pki import CertPair
from protocol.signing import SignatureError, public_key_from_b64, verify
from tests.test_evidence_verify import tiny_ts
from tests.test_ingest_support import (
    Card,
    Env,
    Tus,
    decode_receipt,
    enrol,
    new_env,
    random_bytes,
    stop_all,
)

DEVICE = "tok-001"
BIG = 3 * 1024 * 1024  # plaintext of the segments that are cut mid-upload


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = new_env(tmp_path, device=DEVICE)
    yield environment
    stop_all(environment)


@pytest.fixture(scope="module")
def video() -> Callable[[int], bytes]:
    """Real MPEG-TS plaintexts (H.264), one per seq, timestamps continuing."""
    made: dict[int, bytes] = {}

    def plaintext(seq: int) -> bytes:
        if seq not in made:
            made[seq] = tiny_ts((seq - 1) * 5)
        return made[seq]

    return plaintext


def centre_keys(fleet: Fleet) -> list:
    return [public_key_from_b64(k) for k in fleet.centre_public_keys()]


def stored_files(env: Env, device_id: str = DEVICE) -> list[str]:
    directory = env.store.root / device_id
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# -- the normal path -----------------------------------------------------------------------------
def test_options_advertises_tus_core_creation_and_creation_with_upload(env: Env) -> None:
    reply = env.client(env.start(max_size=50 << 20)).options()
    assert reply.status == 204
    assert reply.header("tus-resumable") == "1.0.0"
    assert reply.header("tus-version") == "1.0.0"
    assert reply.header("tus-extension") == "creation,creation-with-upload"
    assert reply.header("tus-max-size") == str(50 << 20)


def test_a_full_upload_is_stored_and_its_receipt_verifies(env: Env, video) -> None:
    seg = env.card().record(video(1), flags=("evidence",))
    client = env.client(env.start())
    created = client.create(seg)
    assert created.status == 201
    location = created.header("location")
    assert re.fullmatch(r"/files/[0-9a-f]{32}", location or "")
    done = client.patch(location, 0, seg.data())
    assert done.status == 204, done.body
    assert done.header("upload-offset") == str(seg.size)
    receipt = decode_receipt(done.header("upload-receipt") or "")
    verify(receipt, centre_keys(env.fleet))
    assert receipt_problems(receipt) == []
    assert {k: receipt[k] for k in ("device_id", "seq", "ciphertext_sha256", "manifest_sha256",
                                    "ciphertext_bytes", "store")} == {
        "device_id": DEVICE, "seq": 1, "ciphertext_sha256": seg.ciphertext_sha256,
        "manifest_sha256": seg.manifest_sha256, "ciphertext_bytes": seg.size,
        "store": "directory"}
    directory = env.store.root / DEVICE
    assert (directory / "000001.ts.age").read_bytes() == seg.data()
    assert (directory / "000001.json").read_bytes() == seg.manifest
    assert (directory / "000001.json.minisig").read_bytes() == seg.signature
    assert client.receipt(location).json() == receipt
    head = client.head(location)
    assert (head.status, head.header("upload-offset"), head.header("upload-length"),
            head.header("cache-control")) == (200, str(seg.size), str(seg.size), "no-store")


def test_the_stored_segment_decrypts_to_the_recorded_video(env: Env, video) -> None:
    seg = env.card().record(video(1))
    assert env.client(env.start()).upload(seg).status == 204
    out = env.root / "out.ts"
    decrypt_segment(env.store.root / DEVICE / "000001.ts.age", env.fleet.evidence_identity_file,
                    out)
    assert out.read_bytes() == video(1)


def test_a_chain_uploaded_evidence_first_passes_sos_evidence_verify(env: Env, video) -> None:
    card = env.card()
    segs = [card.record(video(seq), flags=("evidence",) if seq == 3 else ()) for seq in (1, 2, 3)]
    client = env.client(env.start())
    for seg in (segs[2], segs[0], segs[1]):  # priority order, not seq order
        assert client.upload(seg).status == 204
    report = verify_directory(env.store.root / DEVICE, keys_from_fleet(env.fleet.directory))
    assert report.ok, [str(f) for f in report.findings]
    assert [s.seq for s in report.segments] == [1, 2, 3]
    assert sos_evidence(["verify", str(env.store.root / DEVICE), "--fleet",
                         str(env.fleet.directory)]) == 0
    assert env.store.segments(DEVICE) == {s.seq: s.manifest_sha256 for s in segs}


def test_receipts_follow_the_schema_and_a_changed_one_fails_its_signature(env: Env,
                                                                          video) -> None:
    seg = env.card().record(video(1))
    receipt = decode_receipt(env.client(env.start()).upload(seg).header("upload-receipt") or "")
    assert receipt_problems(receipt) == []
    assert receipt_problems({k: v for k, v in receipt.items() if k != "manifest_sha256"})
    with pytest.raises(SignatureError):
        verify({**receipt, "seq": 2}, centre_keys(env.fleet))


# -- idempotent creation -------------------------------------------------------------------------
def test_posting_again_during_an_upload_returns_the_same_upload(env: Env, video) -> None:
    seg = env.card().record(video(1))
    client = env.client(env.start())
    first = client.create(seg)
    assert client.patch(first.header("location") or "", 0, seg.data()[:100]).status == 204
    again = client.create(seg)
    assert (again.status, again.header("location")) == (201, first.header("location"))
    assert client.head(again.header("location") or "").header("upload-offset") == "100"
    assert env.events.names().count("upload_resumed") == 1


def test_posting_a_stored_segment_again_returns_its_location_and_receipt(env: Env,
                                                                          video) -> None:
    seg = env.card().record(video(1))
    client = env.client(env.start())
    first = client.create(seg)
    location = first.header("location") or ""
    stored = client.patch(location, 0, seg.data())
    again = client.create(seg)
    assert (again.status, again.header("location")) == (201, location)
    assert client.head(location).header("upload-offset") == str(seg.size)
    assert client.receipt(location).json() == decode_receipt(stored.header("upload-receipt")
                                                             or "")


def test_a_stored_segment_forgotten_by_the_work_directory_is_receipted_again(
        env: Env, video) -> None:
    seg = env.card().record(video(1))
    assert env.client(env.start()).upload(seg).status == 204
    env.servers.pop().stop()
    env.root.joinpath("work").rename(env.root / "old-work")  # e.g. a new ingest host
    client = env.client(env.start())
    again = client.create(seg)
    assert again.status == 201
    receipt = client.receipt(again.header("location") or "").json()
    verify(receipt, centre_keys(env.fleet))
    assert receipt["manifest_sha256"] == seg.manifest_sha256


# -- resuming ------------------------------------------------------------------------------------
def test_after_a_dropped_connection_head_gives_the_durable_offset_and_it_resumes(
        env: Env) -> None:
    seg = env.card().record(random_bytes(BIG))
    data = seg.data()
    client = env.client(env.start())
    location = client.create(seg).header("location") or ""
    half = len(data) // 2
    client.send_and_drop(location, 0, data[:half], announced=len(data))
    assert env.events.wait("upload_interrupted")["offset"] == half
    client.close_dropped()
    head = client.head(location)
    assert head.header("upload-offset") == str(half)
    done = client.patch(location, half, data[half:])
    assert done.status == 204
    assert (env.store.root / DEVICE / "000001.ts.age").read_bytes() == data


def test_a_server_restart_mid_upload_resumes_from_the_durable_offset(env: Env) -> None:
    seg = env.card().record(random_bytes(BIG))
    data = seg.data()
    client = env.client(env.start())
    location = client.create(seg).header("location") or ""
    cut = 1_000_003
    client.send_and_drop(location, 0, data[:cut], announced=len(data))
    env.events.wait("upload_interrupted")
    client.close_dropped()
    env.servers.pop().stop()
    client = env.client(env.start())  # a new process would see exactly these files
    assert client.head(location).header("upload-offset") == str(cut)
    done = client.patch(location, cut, data[cut:])
    assert done.status == 204
    verify(decode_receipt(done.header("upload-receipt") or ""), centre_keys(env.fleet))


def test_bytes_past_the_durable_offset_are_cut_off_at_restart(env: Env) -> None:
    seg = env.card().record(random_bytes(BIG))
    data = seg.data()
    client = env.client(env.start())
    location = client.create(seg).header("location") or ""
    client.send_and_drop(location, 0, data[:5000], announced=len(data))
    env.events.wait("upload_interrupted")
    client.close_dropped()
    env.servers.pop().stop()
    (part,) = env.workdir.glob("uploads/*/000001.ts.age.part")
    with open(part, "ab") as f:  # written but never committed: a crash between the two
        f.write(b"\0" * 777)
    client = env.client(env.start())
    assert client.head(location).header("upload-offset") == "5000"
    assert client.patch(location, 5000, data[5000:]).status == 204


def test_a_last_patch_preferring_respond_async_is_answered_before_the_receipt(
        env: Env, video) -> None:
    seg = env.card().record(video(1))
    server = env.start()
    gate = hold_completions(server)
    client = env.client(server)
    location = client.create(seg).header("location") or ""
    done = client.patch(location, 0, seg.data(), prefer="respond-async")
    assert (done.status, done.header("upload-offset"), done.header("preference-applied"),
            done.header("upload-receipt")) == (204, str(seg.size), "respond-async", None)
    assert client.head(location).header("upload-offset") == str(seg.size)
    assert client.receipt(location).status == 404  # no wait: not stored yet, ask again
    gate.set()
    reply = client.receipt(location, wait=10)
    assert reply.status == 200
    verify(reply.json(), centre_keys(env.fleet))
    assert (env.store.root / DEVICE / "000001.ts.age").read_bytes() == seg.data()


def test_the_row_keeps_the_durable_offset_until_the_last_body_is_completed(
        env: Env) -> None:
    seg = env.card().record(random_bytes(BIG))
    data = seg.data()
    server = env.start()
    gate = hold_completions(server)
    client = env.client(server)
    location = client.create(seg).header("location") or ""
    half = len(data) // 2
    assert client.patch(location, 0, data[:half]).status == 204  # durable before its answer
    assert client.patch(location, half, data[half:], prefer="respond-async").status == 204
    rows = Uploads(env.workdir)  # what a server killed now would find in its database
    (upload,) = rows.unfinished()
    assert upload.offset == half
    rows.close()
    gate.set()
    reply = client.receipt(location, wait=10)
    assert reply.status == 200 and reply.json()["ciphertext_bytes"] == len(data)


def test_a_part_file_already_linked_into_the_store_is_never_cut_back(tmp_path: Path) -> None:
    uploads = Uploads(tmp_path)
    upload = Upload("a" * 32, DEVICE, 1, "m" * 64, "c" * 64, 1000, 400, "uploading", "now")
    uploads.directory(upload.id).mkdir(parents=True)
    manifest, signature = b'{"seq": 1}', b"sig"
    upload.manifest_sha256 = hashlib.sha256(manifest).hexdigest()
    uploads.manifest_path(upload).write_bytes(manifest)
    uploads.signature_path(upload).write_bytes(signature)
    uploads.create(upload)
    part = uploads.part_file(upload)
    part.write_bytes(b"x" * 1000)
    os.link(part, tmp_path / "stored.ts.age")  # the store took it; a power cut undid the row
    (again,) = uploads.recover()
    assert part.stat().st_size == 1000 and again.offset == 1000
    uploads.close()


def test_creation_with_upload_takes_the_bytes_in_the_post(env: Env, video) -> None:
    seg = env.card().record(video(1))
    client = env.client(env.start())
    created = client.create(seg, body=seg.data())
    assert (created.status, created.header("upload-offset")) == (201, str(seg.size))
    receipt = decode_receipt(created.header("upload-receipt") or "")
    assert receipt["seq"] == 1 and receipt["ciphertext_sha256"] == seg.ciphertext_sha256
    assert (env.store.root / DEVICE / "000001.ts.age").read_bytes() == seg.data()


def test_a_second_post_with_a_body_does_not_append_it_again(env: Env) -> None:
    seg = env.card().record(random_bytes(BIG))
    data = seg.data()
    client = env.client(env.start())
    first = client.create(seg, body=data[:1000])
    assert (first.status, first.header("upload-offset")) == (201, "1000")
    again = client.create(seg, body=data[:5000])  # a device that did not learn the answer
    assert again.header("location") == first.header("location")
    assert again.header("upload-offset") == "1000"  # the body was read and dropped
    done = client.patch(again.header("location") or "", 1000, data[1000:])
    assert done.status == 204 and done.header("upload-receipt")


def test_a_receipt_request_for_a_refused_segment_gets_422_and_the_reason(env: Env,
                                                                         video) -> None:
    seg = env.card().record(video(1))
    data = bytearray(seg.data())
    data[len(data) // 2] ^= 0x01
    client = env.client(env.start())
    location = client.create(seg).header("location") or ""
    assert client.patch(location, 0, bytes(data), prefer="respond-async").status == 204
    reply = client.receipt(location, wait=10)
    assert reply.status == 422 and reply.json()["retry"] is False
    assert "altered or damaged" in reply.json()["error"]
    assert stored_files(env) == []


def test_a_receipt_request_for_an_upload_missing_bytes_gets_409_with_its_offset(
        env: Env, video) -> None:
    seg = env.card().record(video(1))
    client = env.client(env.start())
    location = client.create(seg).header("location") or ""
    assert client.patch(location, 0, seg.data()[:10]).status == 204
    reply = client.receipt(location, wait=5)
    assert (reply.status, reply.header("upload-offset")) == (409, "10")


def test_a_patch_at_the_wrong_offset_is_409_with_the_real_offset(env: Env, video) -> None:
    seg = env.card().record(video(1))
    client = env.client(env.start())
    location = client.create(seg).header("location") or ""
    assert client.patch(location, 0, seg.data()[:10]).status == 204
    reply = client.patch(location, 0, seg.data()[:10])
    assert (reply.status, reply.header("upload-offset")) == (409, "10")
    assert reply.json()["retry"] is False


def test_a_new_patch_takes_over_from_a_stalled_one(env: Env) -> None:
    seg = env.card().record(random_bytes(BIG))
    data = seg.data()
    server = env.start()
    client = env.client(server)
    location = client.create(seg).header("location") or ""
    receiving = signal_receiving(server)
    stalled = client.connect()  # sends a little, then nothing: a link that hangs
    stalled.putrequest("PATCH", location)
    for name, value in (("Tus-Resumable", "1.0.0"), ("Upload-Offset", "0"),
                        ("Content-Type", "application/offset+octet-stream"),
                        ("Content-Length", str(len(data)))):
        stalled.putheader(name, value)
    stalled.endheaders()
    stalled.send(data[:4096])
    assert receiving.wait(10)
    reply = client.patch(location, 0, data)  # the rebooted device starts again
    assert reply.status == 409  # the stalled PATCH was cut and kept its 4096 bytes
    assert reply.header("upload-offset") == "4096"
    stalled.close()
    assert client.patch(location, 4096, data[4096:]).status == 204


# -- who may upload ------------------------------------------------------------------------------
def test_an_upload_for_another_device_is_403(env: Env, video) -> None:
    other = enrol(env.fleet, env.root, "tok-002")
    seg = env.card("other-card", other).record(video(1))
    reply = env.client(env.start()).create(seg)  # tok-001's certificate, tok-002's segment
    assert reply.status == 403
    assert reply.json() == {"error": "this connection's certificate is tok-001's, so it cannot "
                                     "upload for device 'tok-002'", "retry": False}


def test_a_centre_certificate_is_refused(env: Env) -> None:
    centre = env.fleet.enrol_local("centre.ops", "centre", env.root / "centre")
    reply = env.client(env.start(), centre).options()
    assert reply.status == 403
    assert "control-centre identity" in reply.json()["error"]


def test_a_certificate_from_the_ca_that_is_not_in_the_registry_is_refused(env: Env) -> None:
    home = env.root / "ghost"
    key = pki.load_or_make_key(home / "identity.key")
    cert = pki.sign_client_csr(env.fleet.ca, pki.make_csr(key, "tok-ghost"))
    (home / "identity.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ghost = CertPair(home / "identity.pem", home / "identity.key")
    reply = env.client(env.start(), ghost).options()
    assert reply.status == 403
    assert "not in the fleet registry" in reply.json()["error"]


def test_a_revoked_device_is_refused_at_the_tls_handshake(env: Env) -> None:
    client = env.client(env.start())
    assert client.options().status == 204
    env.fleet.revoke(DEVICE)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        client.options()


def test_another_devices_upload_cannot_be_read_or_continued(env: Env, video) -> None:
    seg = env.card().record(video(1))
    server = env.start()
    location = env.client(server).create(seg).header("location") or ""
    other = env.client(server, enrol(env.fleet, env.root, "tok-002").tls)
    assert other.head(location).status == 403
    assert other.patch(location, 0, seg.data()).status == 403


# -- what is checked at creation -----------------------------------------------------------------
def test_a_manifest_changed_after_signing_is_refused_at_post(env: Env, video) -> None:
    seg = env.card().record(video(1))
    forged = seg.manifest.replace(b'"frames":100', b'"frames":101')
    reply = env.client(env.start()).create(seg, manifest=forged)
    assert reply.status == 422
    assert reply.json()["error"].startswith("the signature of segment 1 is refused "
                                            "(bad-signature)")
    assert stored_files(env) == [] and not list(env.workdir.glob("uploads/*"))


def test_a_manifest_signed_with_another_key_is_refused_at_post(env: Env, video) -> None:
    impostor = enrol(env.fleet, env.root, "tok-009")  # a real key, but not tok-001's
    seg = Card(env.fleet, impostor, env.root / "forged", device_id=DEVICE).record(video(1))
    reply = env.client(env.start()).create(seg)
    assert reply.status == 422
    assert "(foreign-key)" in reply.json()["error"]


def test_upload_length_must_be_the_manifests_ciphertext_bytes(env: Env, video) -> None:
    seg = env.card().record(video(1))
    reply = env.client(env.start()).create(seg, length=seg.size + 1)
    assert reply.status == 422
    assert "ciphertext_bytes" in reply.json()["error"]


def test_metadata_seq_must_be_the_signed_seq(env: Env, video) -> None:
    seg = env.card().record(video(1))
    reply = env.client(env.start()).create(seg, seq="2")
    assert reply.status == 422
    assert reply.json()["error"] == ("Upload-Metadata says seq 2, but the manifest is signed as "
                                     "segment 1")


def test_a_request_without_tus_resumable_is_412(env: Env, video) -> None:
    seg = env.card().record(video(1))
    client = env.client(env.start())
    location = client.create(seg).header("location") or ""
    reply = client.request("HEAD", location)
    assert (reply.status, reply.header("tus-version")) == (412, "1.0.0")


def test_a_patch_with_another_content_type_is_415(env: Env, video) -> None:
    seg = env.card().record(video(1))
    client = env.client(env.start())
    location = client.create(seg).header("location") or ""
    reply = client.request("PATCH", location, {"Tus-Resumable": "1.0.0", "Upload-Offset": "0",
                                               "Content-Type": "application/octet-stream"},
                           seg.data())
    assert reply.status == 415


def signal_receiving(server: IngestServer) -> threading.Event:
    """An event set when the server starts receiving a body."""
    receiving = threading.Event()
    original = server.receive

    def spy(*args: Any) -> int | None:
        receiving.set()
        return original(*args)

    server.receive = spy  # type: ignore[method-assign]
    return receiving


def hold_completions(server: IngestServer) -> threading.Event:
    """Completions wait (up to 15 s) until the returned event is set."""
    gate = threading.Event()
    complete = server.complete

    def held(upload: Any) -> Any:
        gate.wait(15)
        return complete(upload)

    server.complete = held  # type: ignore[method-assign]
    return gate


# -- what is checked at completion ---------------------------------------------------------------
def test_corrupted_bytes_are_refused_at_completion_and_not_stored(env: Env, video) -> None:
    seg = env.card().record(video(1))
    data = bytearray(seg.data())
    data[len(data) // 2] ^= 0x01
    client = env.client(env.start())
    location = client.create(seg).header("location") or ""
    reply = client.patch(location, 0, bytes(data))
    assert reply.status == 422
    assert reply.json()["retry"] is False
    assert "altered or damaged" in reply.json()["error"]
    assert stored_files(env) == []
    assert not list(env.workdir.glob("uploads/*"))  # the partial upload is discarded
    assert client.head(location).status == 410
    assert env.events.wait("segment_refused")["stage"] == "complete"


def test_a_substitute_for_a_stored_segment_is_refused(env: Env, video) -> None:
    card = env.card()
    segs = [card.record(video(seq)) for seq in (1, 2, 3)]
    client = env.client(env.start())
    for seg in segs:
        assert client.upload(seg).status == 204
    fork = env.card("fork")  # the same device key, another recording for seq 2
    substitute = fork.record(video(4), seq=2, prev=segs[0].manifest_sha256)
    reply = client.create(substitute)
    assert reply.status == 422
    assert "already stored with another manifest" in reply.json()["error"]
    assert (env.store.root / DEVICE / "000002.json").read_bytes() == segs[1].manifest


def test_a_segment_that_does_not_follow_its_stored_predecessor_is_refused(env: Env,
                                                                          video) -> None:
    card, other = env.card(), env.card("other-chain")
    client = env.client(env.start())
    for seq in (1, 2):
        assert client.upload(card.record(video(seq))).status == 204
    foreign = [other.record(video(seq)) for seq in (1, 2, 3)][-1]
    reply = client.create(foreign)
    assert reply.status == 422
    assert "does not follow the stored 000002.json" in reply.json()["error"]


def test_a_successor_stored_during_the_upload_refuses_it_at_completion(env: Env,
                                                                        video) -> None:
    card, other = env.card(), env.card("other-chain")
    segs = [card.record(video(seq)) for seq in (1, 2)]
    foreign3 = [other.record(video(seq)) for seq in (1, 2, 3)][-1]
    client = env.client(env.start())
    location = client.create(segs[1]).header("location") or ""  # nothing stored: accepted
    assert client.upload(foreign3).status == 204  # meanwhile, a seq 3 of another chain
    reply = client.patch(location, 0, segs[1].data())
    assert reply.status == 422
    assert "the stored 000003.json of tok-001 names a predecessor" in reply.json()["error"]
    assert stored_files(env) == ["000003.json", "000003.json.minisig", "000003.ts.age"]


# -- back-pressure -------------------------------------------------------------------------------
def test_a_paused_server_answers_503_with_retry_after_until_resumed(env: Env, video) -> None:
    seg = env.card().record(video(1))
    server = env.start(retry_after_s=7)
    client = env.client(server)
    server.pause()
    reply = client.create(seg)
    assert (reply.status, reply.header("retry-after")) == (503, "7")
    assert reply.json()["retry"] is True
    server.resume()
    assert client.create(seg).status == 201


def test_a_server_at_its_upload_limit_answers_503(env: Env) -> None:
    card = env.card()
    first, second = card.record(random_bytes(BIG)), card.record(random_bytes(1000))
    server = env.start(max_uploads=1)
    client = env.client(server)
    location = client.create(first).header("location") or ""
    receiving = signal_receiving(server)
    data = first.data()
    busy = client.connect()
    busy.putrequest("PATCH", location)
    for name, value in (("Tus-Resumable", "1.0.0"), ("Upload-Offset", "0"),
                        ("Content-Type", "application/offset+octet-stream"),
                        ("Content-Length", str(len(data)))):
        busy.putheader(name, value)
    busy.endheaders()
    busy.send(data[:65536])
    assert receiving.wait(10)
    reply = client.create(second)
    assert reply.status == 503 and reply.header("retry-after") is not None
    assert reply.json()["retry"] is True
    busy.send(data[65536:])
    assert busy.getresponse().status == 204
    busy.close()
    assert client.create(second).status == 201


def test_a_store_below_its_reserve_answers_507(env: Env, video) -> None:
    seg = env.card().record(video(1))
    reply = env.client(env.start(min_free_bytes=1 << 62, space_retry_after_s=120)).create(seg)
    assert (reply.status, reply.header("retry-after")) == (507, "120")
    assert reply.json()["retry"] is True


# -- the audit log -------------------------------------------------------------------------------
def test_the_audit_log_records_every_step_in_a_verifiable_chain(env: Env, video) -> None:
    card = env.card()
    good, bad = card.record(video(1)), card.record(video(2))
    client = env.client(env.start())
    assert client.upload(good).status == 204
    altered = bad.data()[:-1] + bytes([bad.data()[-1] ^ 0xFF])  # always a different byte
    assert client.upload(bad, data=altered).status == 422
    lines = [json.loads(line) for line in env.audit.read_text().splitlines()]
    assert [(e["event"], e.get("seq")) for e in lines] == [
        ("upload_created", 1), ("segment_stored", 1), ("receipt_issued", 1),
        ("upload_created", 2), ("segment_refused", 2)]
    assert all(e["actor"] == DEVICE and e["device_id"] == DEVICE for e in lines)
    assert lines[1]["sha256"] == good.ciphertext_sha256
    assert lines[4]["reason"].startswith("the ")
    assert verify_log(env.audit) == []


def test_verify_log_finds_an_edited_line_in_the_servers_log(env: Env, video) -> None:
    seg = env.card().record(video(1))
    assert env.client(env.start()).upload(seg).status == 204
    lines = env.audit.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"seq":1', '"seq":7')
    env.audit.write_text("".join(lines))
    assert verify_log(env.audit) == [
        "line 3: prev does not match the SHA-256 of line 2: line 2 was edited, or lines were "
        "deleted, inserted or moved here"]


# -- the benchmark sink and the command line -----------------------------------------------------
def test_the_raw_put_sink_exists_only_when_enabled(env: Env) -> None:
    body = random_bytes(100_000)
    closed = env.client(env.start())
    assert closed.request("PUT", "/raw/x.bin", body=body).status == 404
    client = env.client(env.start(raw_put=True))
    assert client.request("PUT", "/raw/x.bin", body=body).status == 201
    assert (env.workdir / "raw" / "x.bin").read_bytes() == body


def test_the_command_line_serves_and_prints_one_line_per_segment(env: Env, video) -> None:
    card = env.card()
    good, bad = card.record(video(1)), card.record(video(2))
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from control_center.ingest.cli import main; "
                               "sys.exit(main(sys.argv[1:]))",
         "--fleet", str(env.fleet.directory), "--listen", "127.0.0.1:0",
         "--store", str(env.root / "cli-store"), "--audit", str(env.root / "cli-audit.jsonl"),
         "--workdir", str(env.root / "cli-work"), "--reserve-mb", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        url = re.search(r"serving (https://127\.0\.0\.1:\d+)/files/", banner)
        assert url, banner + (proc.stderr.read() if proc.poll() is not None else "")
        client = Tus(url.group(1), env.fleet, env.device.tls)
        assert client.upload(good).status == 204
        assert proc.stdout.readline().startswith(f"STORED  {DEVICE} seq 1: {good.size} bytes")
        altered = bad.data()[:-1] + bytes([bad.data()[-1] ^ 0xFF])  # always a different byte
        assert client.upload(bad, data=altered).status == 422
        assert proc.stdout.readline().startswith(f"REFUSED {DEVICE} seq 2 (complete, 422): ")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert verify_log(env.root / "cli-audit.jsonl") == []


def test_the_command_line_help_names_every_option() -> None:
    done = subprocess.run([sys.executable, "-c", "import sys; from control_center.ingest.cli "
                           "import main; sys.exit(main(['--help']))"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0
    for option in ("--fleet", "--listen", "--store", "--s3-endpoint", "--s3-bucket", "--audit",
                   "--workdir", "--reserve-mb"):
        assert option in done.stdout
