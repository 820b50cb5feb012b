"""Evidence stores: the directory tree and an S3-compatible bucket (moto's server), on their
own and behind the ingest server."""

from __future__ import annotations

import hashlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control_center.evidence import keys_from_fleet, verify_directory
from control_center.ingest import DirectoryStore, S3Store, StoreError
from tests.test_ingest_support import Card, Seg, decode_receipt, new_env, stop_all

DEVICE = "tok-001"


def chain(tmp_path: Path, n: int = 3) -> tuple[Any, list[Seg]]:
    env = new_env(tmp_path / "env", device=DEVICE)
    card = Card(env.fleet, env.device, tmp_path / "card")
    return env, [card.record(f"segment {seq}".encode() * 1000) for seq in range(1, n + 1)]


def put(store: Any, seg: Seg) -> str:
    return store.put(seg.device_id, seg.seq, seg.ciphertext, seg.manifest, seg.signature)


# -- DirectoryStore ------------------------------------------------------------------------------
def test_a_directory_store_keeps_the_devices_three_files_and_no_temp_file(tmp_path: Path) -> None:
    _, segs = chain(tmp_path, 1)
    store = DirectoryStore(tmp_path / "evidence")
    location = put(store, segs[0])
    directory = tmp_path / "evidence" / DEVICE
    assert location == str(directory / "000001.ts.age")
    assert sorted(p.name for p in directory.iterdir()) == [
        "000001.json", "000001.json.minisig", "000001.ts.age"]
    assert (directory / "000001.ts.age").read_bytes() == segs[0].data()
    assert (directory / "000001.json").read_bytes() == segs[0].manifest
    assert (directory / "000001.json.minisig").read_bytes() == segs[0].signature


def test_a_directory_store_keeps_its_copy_when_the_upload_file_goes(tmp_path: Path) -> None:
    _, segs = chain(tmp_path, 1)
    data = segs[0].data()
    store = DirectoryStore(tmp_path / "evidence")
    put(store, segs[0])
    segs[0].ciphertext.unlink()  # the ingest server deletes its part file after storing
    assert (tmp_path / "evidence" / DEVICE / "000001.ts.age").read_bytes() == data


def test_a_directory_store_says_which_segments_a_device_has(tmp_path: Path) -> None:
    _, segs = chain(tmp_path)
    store = DirectoryStore(tmp_path / "evidence")
    for seg in (segs[2], segs[0]):
        put(store, seg)
    assert store.segments(DEVICE) == {1: segs[0].manifest_sha256, 3: segs[2].manifest_sha256}
    assert store.manifest(DEVICE, 3) == segs[2].manifest
    assert store.manifest(DEVICE, 2) is None
    assert store.segments("tok-999") == {}


def test_a_directory_store_passes_sos_evidence_verify(tmp_path: Path) -> None:
    env, segs = chain(tmp_path)
    store = DirectoryStore(tmp_path / "evidence")
    for seg in segs:
        put(store, seg)
    report = verify_directory(store.device_dir(DEVICE), keys_from_fleet(env.fleet.directory))
    assert report.ok, [str(f) for f in report.findings]


def test_a_directory_store_refuses_a_device_id_that_is_a_path(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "evidence")
    with pytest.raises(ValueError, match="not a device id"):
        store.manifest("../etc", 1)


def test_a_directory_store_reports_its_free_space(tmp_path: Path) -> None:
    free = DirectoryStore(tmp_path / "evidence").free_bytes()
    assert isinstance(free, int) and free > 0


class FailingOnce(DirectoryStore):
    """A store whose first put fails, as a full or unmounted disk would."""

    failed = False

    def put(self, *args: Any) -> str:
        if not self.failed:
            self.failed = True
            raise StoreError("disk unavailable")
        return super().put(*args)


def test_a_store_failure_answers_503_and_an_empty_patch_finishes_later(tmp_path: Path) -> None:
    env = new_env(tmp_path, FailingOnce(tmp_path / "evidence"), device=DEVICE)
    try:
        seg = Card(env.fleet, env.device, tmp_path / "card").record(b"x" * 5000)
        client = env.client(env.start())
        location = client.create(seg).header("location") or ""
        reply = client.patch(location, 0, seg.data())
        assert (reply.status, reply.json()["retry"]) == (503, True)
        assert client.head(location).header("upload-offset") == str(seg.size)
        done = client.patch(location, seg.size, b"")
        assert done.status == 204
        assert decode_receipt(done.header("upload-receipt") or "")["seq"] == 1
    finally:
        stop_all(env)


# -- S3Store -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    threaded = pytest.importorskip("moto.moto_server.threaded_moto_server",
                                   reason="moto[server] is not installed")
    pytest.importorskip("boto3", reason="boto3 is not installed")
    server = threaded.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str) -> S3Store:
    bucket = f"evidence-{uuid.uuid4().hex[:12]}"
    store = S3Store(bucket, endpoint_url=s3_endpoint, prefix="fleet-a/", access_key="testing",
                    secret_key="testing")
    store.client.create_bucket(Bucket=bucket)
    return store


def test_an_s3_store_keeps_the_devices_three_objects(tmp_path: Path, s3: S3Store) -> None:
    _, segs = chain(tmp_path, 1)
    location = put(s3, segs[0])
    assert location == f"s3://{s3.bucket}/fleet-a/{DEVICE}/000001.ts.age"

    def body(name: str) -> bytes:
        return s3.client.get_object(Bucket=s3.bucket, Key=f"fleet-a/{DEVICE}/{name}")[
            "Body"].read()

    assert body("000001.ts.age") == segs[0].data()
    assert body("000001.json") == segs[0].manifest
    assert body("000001.json.minisig") == segs[0].signature


def test_an_s3_store_says_which_segments_a_device_has(tmp_path: Path, s3: S3Store) -> None:
    _, segs = chain(tmp_path)
    for seg in (segs[1], segs[2]):
        put(s3, seg)
    assert s3.segments(DEVICE) == {2: segs[1].manifest_sha256, 3: segs[2].manifest_sha256}
    assert s3.manifest(DEVICE, 2) == segs[1].manifest
    assert s3.manifest(DEVICE, 1) is None


def test_an_s3_store_is_unlimited_unless_given_a_quota(tmp_path: Path, s3: S3Store) -> None:
    _, segs = chain(tmp_path, 2)
    put(s3, segs[0])
    assert s3.free_bytes() is None
    quota = S3Store(s3.bucket, prefix="fleet-a/", quota_bytes=10_000_000, client=s3.client)
    used = segs[0].size + len(segs[0].manifest) + len(segs[0].signature)
    assert quota.free_bytes() == 10_000_000 - used
    put(quota, segs[1])
    assert quota.free_bytes() == (10_000_000 - used - segs[1].size - len(segs[1].manifest)
                                  - len(segs[1].signature))


def test_the_ingest_server_stores_an_upload_in_s3(tmp_path: Path, s3: S3Store) -> None:
    env = new_env(tmp_path, s3, device=DEVICE)
    try:
        card = Card(env.fleet, env.device, tmp_path / "card")
        first, second = card.record(b"a" * 200_000), card.record(b"b" * 200_000)
        client = env.client(env.start())
        for seg in (second, first):
            done = client.upload(seg)
            assert done.status == 204
            assert decode_receipt(done.header("upload-receipt") or "")["store"] == "s3"
        stored = s3.client.get_object(Bucket=s3.bucket, Key=f"fleet-a/{DEVICE}/000002.ts.age")
        assert hashlib.sha256(stored["Body"].read()).hexdigest() == second.ciphertext_sha256
        assert s3.segments(DEVICE) == {1: first.manifest_sha256, 2: second.manifest_sha256}
    finally:
        stop_all(env)


def test_an_s3_store_without_boto3_says_which_extra_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(StoreError, match=r"sos-devices\[s3\]"):
        S3Store("evidence", endpoint_url="http://127.0.0.1:9")
