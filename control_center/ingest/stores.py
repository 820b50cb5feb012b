"""Where accepted evidence is kept: a directory tree (default) or an S3-compatible bucket.

Both keep the device's own three files per segment, unchanged, under the device id:

    <device_id>/000123.ts.age        the encrypted segment
    <device_id>/000123.json          its manifest (written last: a manifest means all three)
    <device_id>/000123.json.minisig  the device's signature of the manifest

so `sos-evidence verify <root>/<device_id>` checks a DirectoryStore as it checks a device card.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from evidence_format.files import fsync_dir
from evidence_format.manifest import manifest_file, segment_file, signature_file

DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")  # as the manifest schema says
MANIFEST_NAME = re.compile(r"^([0-9]{6,})\.json$")


class StoreError(RuntimeError):
    """The store could not take or give a segment (I/O, network, credentials)."""


def _device_dir(device_id: str) -> str:
    if not DEVICE_ID.match(device_id):
        raise ValueError(f"{device_id!r} is not a device id")
    return device_id


class EvidenceStore(ABC):
    kind: str  # "directory" | "s3": what receipts name in `store`

    @abstractmethod
    def put(self, device_id: str, seq: int, ciphertext: Path, manifest: bytes,
            signature: bytes) -> str:
        """Keep one verified segment; returns where it is. The manifest goes last, so a
        segment whose manifest can be read is complete. Raises StoreError."""

    @abstractmethod
    def manifest(self, device_id: str, seq: int) -> bytes | None:
        """The stored manifest file of segment `seq`, byte for byte, or None."""

    @abstractmethod
    def segments(self, device_id: str) -> dict[int, str]:
        """Every stored segment of the device: seq -> SHA-256 of its manifest file."""

    @abstractmethod
    def free_bytes(self) -> int | None:
        """Bytes that can still be stored; None when there is no limit."""

    @abstractmethod
    def location(self, device_id: str, seq: int) -> str:
        """Where segment `seq` of the device is (or would be) kept."""


class DirectoryStore(EvidenceStore):
    kind = "directory"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def device_dir(self, device_id: str) -> Path:
        return self.root / _device_dir(device_id)

    def location(self, device_id: str, seq: int) -> str:
        return str(self.device_dir(device_id) / segment_file(seq))

    def put(self, device_id: str, seq: int, ciphertext: Path, manifest: bytes,
            signature: bytes) -> str:
        """The ciphertext is hard-linked when it is on the same file system (else copied),
        each file is fsynced under a temporary name, then the three are renamed into place,
        manifest last, and the directory fsynced once: a crash leaves either no manifest (the
        segment is not there) or all three files."""
        directory = self.device_dir(device_id)
        final = directory / segment_file(seq)
        temps: list[Path] = []
        try:
            if not directory.is_dir():
                directory.mkdir()
                fsync_dir(self.root)
            steps = [(final, None), (directory / signature_file(seq), signature),
                     (directory / manifest_file(seq), manifest)]
            for path, data in steps:
                tmp = path.with_name(path.name + ".tmp")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                temps.append(tmp)
                if data is None:
                    try:
                        os.link(ciphertext, tmp)  # same file system: no copy
                    except OSError:
                        shutil.copyfile(ciphertext, tmp)
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())  # at once when linked: the ingest synced it
                else:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
            for (path, _), tmp in zip(steps, temps, strict=True):
                os.replace(tmp, path)
            fsync_dir(directory)
        except OSError as exc:
            for tmp in temps:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise StoreError(f"cannot store segment {seq} of {device_id} in {directory}: "
                             f"{exc}") from exc
        return str(final)

    def manifest(self, device_id: str, seq: int) -> bytes | None:
        try:
            return (self.device_dir(device_id) / manifest_file(seq)).read_bytes()
        except FileNotFoundError:
            return None

    def segments(self, device_id: str) -> dict[int, str]:
        directory = self.device_dir(device_id)
        if not directory.is_dir():
            return {}
        found = {}
        for path in directory.iterdir():
            match = MANIFEST_NAME.match(path.name)
            if match:
                found[int(match.group(1))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return dict(sorted(found.items()))

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.root).free


class S3Store(EvidenceStore):
    """An S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Garage, ...) at `endpoint_url`.

    Credentials come from the arguments or boto3's usual chain (AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an instance role). `quota_bytes` makes
    `free_bytes` report what is left of it (what is under `prefix`, counted once at the first
    call, plus what this store puts); without it the bucket counts as unlimited.
    Needs boto3 (`pip install 'sos-devices[s3]'`), imported only when an S3Store is made.
    """

    kind = "s3"

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, prefix: str = "",
                 region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, quota_bytes: int | None = None,
                 client: Any = None) -> None:
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise StoreError("S3Store needs boto3: pip install 'sos-devices[s3]' "
                                 "(or pip install boto3)") from None
            client = boto3.client(
                "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1",
                aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                config=Config(retries={"max_attempts": 3, "mode": "standard"}))
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.quota_bytes = quota_bytes
        self._used: int | None = None
        self._lock = threading.Lock()

    def key(self, device_id: str, name: str) -> str:
        return f"{self.prefix}{_device_dir(device_id)}/{name}"

    def location(self, device_id: str, seq: int) -> str:
        return f"s3://{self.bucket}/{self.key(device_id, segment_file(seq))}"

    def put(self, device_id: str, seq: int, ciphertext: Path, manifest: bytes,
            signature: bytes) -> str:
        digest = hashlib.sha256(manifest).hexdigest()
        try:
            self.client.upload_file(str(ciphertext), self.bucket,
                                    self.key(device_id, segment_file(seq)),
                                    ExtraArgs={"ContentType": "application/octet-stream"})
            self.client.put_object(Bucket=self.bucket, Key=self.key(device_id,
                                                                    signature_file(seq)),
                                   Body=signature, ContentType="text/plain")
            self.client.put_object(Bucket=self.bucket, Key=self.key(device_id, manifest_file(seq)),
                                   Body=manifest, ContentType="application/json",
                                   Metadata={"sha256": digest})
        except Exception as exc:  # boto3 raises botocore's ClientError, BotoCoreError, OSError
            raise StoreError(f"cannot store segment {seq} of {device_id} in "
                             f"s3://{self.bucket}/{self.prefix}: {exc}") from exc
        with self._lock:
            if self._used is not None:
                self._used += ciphertext.stat().st_size + len(manifest) + len(signature)
        return self.location(device_id, seq)

    def manifest(self, device_id: str, seq: int) -> bytes | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket,
                                            Key=self.key(device_id, manifest_file(seq)))
        except Exception as exc:
            if _s3_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise StoreError(f"cannot read manifest {seq} of {device_id} from "
                             f"s3://{self.bucket}: {exc}") from exc
        return answer["Body"].read()

    def segments(self, device_id: str) -> dict[int, str]:
        found = {}
        for key, _size in self._objects(self.key(device_id, "")):
            match = MANIFEST_NAME.match(key.rsplit("/", 1)[-1])
            if match:
                data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                found[int(match.group(1))] = hashlib.sha256(data).hexdigest()
        return dict(sorted(found.items()))

    def free_bytes(self) -> int | None:
        if self.quota_bytes is None:
            return None
        with self._lock:
            if self._used is None:
                self._used = sum(size for _key, size in self._objects(self.prefix))
            return self.quota_bytes - self._used

    def _objects(self, prefix: str) -> list[tuple[str, int]]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix)
            return [(o["Key"], o["Size"]) for page in pages for o in page.get("Contents", [])]
        except Exception as exc:
            raise StoreError(f"cannot list s3://{self.bucket}/{prefix}: {exc}") from exc


def _s3_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    return None
