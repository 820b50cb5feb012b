"""Shift-end upload goodput: our tus uploader beside a raw HTTPS PUT of the same bytes.

`python -m bench.upload_bench [--segments N] [--segment-mb MB] [--chunk-kib KIB] [--repeats R]`
prints MB/s (10**6 bytes of segment files per second of wall time) for:
  raw PUT   each segment's .ts.age sent as one `PUT /raw/<name>` to the same ingest server
            (`IngestServer(raw_put=True)`: it hashes and fsyncs like an upload), over one
            persistent mutual-TLS connection with the device's identity; the floor
  ours      `Uploader.run_once` on the same segments: POST + HEAD per segment, PATCHes of
            `chunk_bytes` (the server fsyncs at the end of each), the final hash and chain
            check on the server, the receipt checked, kept (fsync) and the files deleted
and ours / raw (target 0.9). Both run against one server on 127.0.0.1 in the same run,
interleaved `repeats` times on freshly recorded segments (real ones: the project's age writer,
chained and signed manifests, SegmentStore.commit); the best run of each counts.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_center.audit import AuditLog
from control_center.fleet import Fleet
from control_center.ingest import DirectoryStore, IngestServer
from firmware.camera.age_stream import CHUNK, AgeStreamWriter
from firmware.camera.manifest import build_manifest, manifest_sha256, sign_manifest
from firmware.camera.store import SegmentStore
from firmware.uplink.tus import TusClient, mutual_tls_context
from firmware.uplink.uploader import Uploader
from protocol.signing import load_or_make_key
from simulator.broker import PrivateBroker

DEVICE_ID = "bench-up-001"
TARGET_RATIO = 0.9


class _Recorder:
    """Writes segments as the recorder does (encrypt, hash, manifest chain, sign, commit)."""

    def __init__(self, store: SegmentStore, key_file: Path, recipient: str) -> None:
        self.store = store
        self.key = load_or_make_key(key_file)
        self.recipient = recipient
        last = store.last()
        self.seq = last[0] + 1 if last else 1
        self.prev = last[1] if last else None

    def record(self, size_mb: int) -> int:
        seq, self.seq = self.seq, self.seq + 1
        file = self.store.open_segment(seq)
        digest = hashlib.sha256()

        class Tee:
            def write(self, data: bytes) -> int:
                digest.update(data)
                return file.write(data)

        age = AgeStreamWriter(Tee(), [self.recipient])  # type: ignore[arg-type]
        for _ in range(size_mb):
            age.write(os.urandom(1_000_000))
        age.close()
        file.flush()
        size = file.tell()
        now = datetime.now(UTC)
        manifest = build_manifest(
            device_id=DEVICE_ID, seq=seq, start_utc=now, end_utc=now, start_mono=0.0,
            end_mono=10.0, frames=300, gps_track=[], call_id=None, flags=[],
            ciphertext_sha256=digest.hexdigest(), ciphertext_bytes=size,
            prev_manifest_sha256=self.prev)
        body, signature = sign_manifest(manifest, self.key)
        self.prev = manifest_sha256(manifest)
        self.store.commit(seq, file, manifest=body, signature=signature,
                          manifest_sha256=self.prev, evidence=False, call_id=None)
        return seq


class _Piece:
    """`length` bytes of an open file from its current position (a streamed request body)."""

    def __init__(self, f: Any, length: int) -> None:
        self.f, self.left = f, length

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data


def _raw_put(url_port: int, context: Any, paths: list[Path], blocksize: int,
             piece_bytes: int | None = None) -> float:
    """Seconds to PUT every file over one persistent connection, streamed from the file: each
    file as one PUT, or (`piece_bytes`) as one PUT per piece of that size, which costs the
    server a request and an fsync per piece, as a PATCH does."""
    conn = http.client.HTTPSConnection("127.0.0.1", url_port, context=context, timeout=60,
                                       blocksize=blocksize)
    started = time.perf_counter()
    try:
        for path in paths:
            size = path.stat().st_size
            step = piece_bytes or size
            with path.open("rb") as f:
                for index, offset in enumerate(range(0, size, step)):
                    length = min(step, size - offset)
                    conn.request("PUT", f"/raw/{path.name}.{index}", body=_Piece(f, length),
                                 headers={"Content-Length": str(length)})
                    response = conn.getresponse()
                    response.read()
                    if response.status != 201:
                        raise RuntimeError(f"raw PUT {path.name}: HTTP {response.status}")
    finally:
        conn.close()
    return time.perf_counter() - started


def _serve(fleet_dir: str, root: str, cert: str, key: str) -> int:
    """The server process: an IngestServer with the raw PUT endpoint; prints its port, runs
    until stdin closes."""
    logging.basicConfig(level=logging.ERROR)
    base = Path(root)
    server = IngestServer(Fleet(fleet_dir), DirectoryStore(base / "evidence"),
                          AuditLog(base / "audit.jsonl"), workdir=base / "ingest",
                          cert_file=cert, key_file=key, raw_put=True)
    server.start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop()
    return 0


class _ServerProcess:
    """The ingest server in its own process, as at the centre (no shared GIL with the device)."""

    def __init__(self, fleet_dir: Path, root: Path, cert: Path, key: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.upload_bench", "--serve", str(fleet_dir), str(root),
             str(cert), str(key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[1])
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the ingest server did not start (exit {self.proc.returncode})")
        self.port = int(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def upload_rows(tmpdir: str | Path, *, segments: int = 8, segment_mb: int = 8,
                chunk_bytes: int = 1 << 20, repeats: int = 3) -> list[dict[str, Any]]:
    """[{name, label, mb_s, ...}] for raw PUT and ours (best of `repeats`), then the ratio row
    {name: "ratio", value, target, met}. Raises if a part cannot run."""
    tmp = Path(tmpdir)
    tmp.mkdir(parents=True, exist_ok=True)
    fleet_broker = PrivateBroker(tmp / "fleet")  # its fleet and identities; never started
    fleet = fleet_broker.fleet
    tls = fleet_broker.identity(DEVICE_ID)
    cert = fleet.issue_server("ingest", ["127.0.0.1", "localhost"])
    centre = tmp / "centre"
    context = mutual_tls_context(tls.ca_file, tls.cert_file, tls.key_file)
    store = SegmentStore(tmp / "device" / "recordings")
    recorder = _Recorder(store, fleet_broker.signing_key_file(DEVICE_ID),
                         fleet.evidence_recipients()[0])
    blocksize = 64 * 1024
    times: dict[str, list[float]] = {"raw": [], "pieces": [], "ours": []}
    total = 0
    server = _ServerProcess(fleet.directory, centre, cert.cert_file, cert.key_file)
    try:
        files_url = f"https://127.0.0.1:{server.port}/files/"
        uploader = Uploader(store, tmp / "device" / "upload.sqlite",
                            lambda: TusClient(files_url, context, blocksize=blocksize),
                            fleet.centre_public_keys(), DEVICE_ID, chunk_bytes=chunk_bytes,
                            keep_chain_anchor=False)
        for _ in range(repeats):  # interleaved, so drift hits both lines alike
            seqs = [recorder.record(segment_mb) for _ in range(segments)]
            paths = [store.path(seq, ".ts.age") for seq in seqs]
            total = sum(p.stat().st_size for p in paths)
            times["raw"].append(_raw_put(server.port, context, paths, blocksize))
            shutil.rmtree(centre / "ingest" / "raw", ignore_errors=True)
            times["pieces"].append(_raw_put(server.port, context, paths, blocksize,
                                            piece_bytes=chunk_bytes))
            started = time.perf_counter()
            summary = uploader.run_once(threading.Event())
            times["ours"].append(time.perf_counter() - started)
            if summary.uploaded != seqs:
                raise RuntimeError(f"uploader left segments behind: refused "
                                   f"{summary.refused}, deferred {summary.deferred}")
            shutil.rmtree(centre / "evidence" / DEVICE_ID, ignore_errors=True)  # disk use
            shutil.rmtree(centre / "ingest" / "raw", ignore_errors=True)
        uploader.close()
    finally:
        server.close()
        store.close()
    raw, pieces, ours = (total / 1e6 / min(times[k]) for k in ("raw", "pieces", "ours"))
    common = {"segments": segments, "bytes": total, "repeats": repeats}
    kib = chunk_bytes // 1024
    return [
        {"name": "raw_put", "label": "raw HTTPS PUT, one per segment", "mb_s": raw, **common},
        {"name": "raw_put_pieces", "label": f"raw HTTPS PUT, one per {kib} KiB piece",
         "mb_s": pieces, "chunk_bytes": chunk_bytes, **common},
        {"name": "ours", "label": f"our tus uploader, {kib} KiB chunks", "mb_s": ours,
         "chunk_bytes": chunk_bytes, **common},
        {"name": "ratio", "label": "ours / raw PUT", "value": ours / raw,
         "target": TARGET_RATIO, "met": ours / raw >= TARGET_RATIO},
        {"name": "ratio_pieces", "label": f"ours / raw PUT per {kib} KiB (like for like)",
         "value": ours / pieces, "target": TARGET_RATIO, "met": ours / pieces >= TARGET_RATIO},
    ]


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--serve"]:
        return _serve(*args_in[1:5])
    parser = argparse.ArgumentParser(prog="python -m bench.upload_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--segment-mb", type=int, default=8)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args(args_in)
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="upload-bench-", dir=args.tmpdir) as tmp:
        rows = upload_rows(tmp, segments=args.segments, segment_mb=args.segment_mb,
                           chunk_bytes=args.chunk_kib * 1024, repeats=args.repeats)
    print(f"shift-end upload, {args.segments} x {args.segment_mb} MB segments, best of "
          f"{args.repeats} ({os.cpu_count()} CPUs, loopback, mutual TLS)")
    for row in rows:
        if row["name"].startswith("ratio"):
            verdict = "met" if row["met"] else "MISSED"
            print(f"  {row['label']:<44} {row['value']:8.2f}   (target {row['target']:.2f}: "
                  f"{verdict})")
        else:
            print(f"  {row['label']:<44} {row['mb_s']:8.1f} MB/s")
    return 0


_ = CHUNK  # the age chunk size, for readers comparing with chunk_bytes

if __name__ == "__main__":
    sys.exit(main())
