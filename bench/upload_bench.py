"""Shift-end upload goodput: our tus uploader beside a raw HTTPS PUT of the same bytes.

`python -m bench.upload_bench [--segments N] [--segment-mb MB] [--chunk-kib KIB]
[--small-chunk-kib KIB] [--repeats R] [--tmpdir DIR] [--json]` prints MB/s (10**6 bytes of
segment files per second of wall time) and ms per segment for:
  raw PUT          each segment's .ts.age sent as one `PUT /raw/<name>` to the same ingest
                   server (`IngestServer(raw_put=True)`), over one persistent mutual-TLS
                   connection with the device's identity; the server writes it, fdatasyncs it,
                   renames it and fsyncs the directory before its 201: stored as durably as an
                   upload, with none of the protocol. The baseline.
  raw PUT+SHA-256  the same, hashing the body as it arrives (`?sha256`): the one per-byte job an
                   upload also does, so the gap splits into per-byte and per-segment parts
  ours             `Uploader.run_once` on the same segments with the device's default
                   `chunk_bytes` (16 MiB: one request per segment here): on the byte connection
                   one PATCH (or POST with the body) per segment, the last answered at once
                   (`Prefer: respond-async`); on a second connection the next segment's POST
                   (checked manifest) while this one sends; on the server's worker threads the
                   completion (fdatasync, SHA-256, chain check, store, audit, signed receipt);
                   on a third connection the receipt fetched, checked, kept (fsync) and the
                   files deleted on the device. Timed until the last segment is deleted.
  ours, small      the same with `--small-chunk-kib` chunks (1 MiB: a PATCH per MiB, each
                   fsynced and committed by the server before its answer)
  ... over a link  raw PUT and ours again through a TCP relay on 127.0.0.1 that paces the
                   device's direction to `--link-mbit` (default 400, a dock's Wi-Fi or a shared
                   gigabit port; 0 leaves these out): what the fixed costs come to when the
                   link, not loopback, sets the pace
and ours / raw PUT against the target 0.9. All run against one server process on 127.0.0.1 in
the same run, interleaved `repeats` times on freshly recorded segments (real ones: the project's
age writer, chained and signed manifests, SegmentStore.commit); the best run of each counts.
`run_upload(tmpdir)` returns a `bench.report.UploadReport`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_center.audit import AuditLog
from control_center.fleet import Fleet
from control_center.ingest import DirectoryStore, IngestServer
from evidence_format.age_stream import AgeStreamWriter
from evidence_format.manifest import build_manifest, manifest_sha256, sign_manifest
from firmware.camera.store import SegmentStore
from firmware.uplink.tus import TusClient, mutual_tls_context
from firmware.uplink.upload_settings import DEFAULT_CHUNK_BYTES
from firmware.uplink.uploader import Uploader
from protocol.signing import load_or_make_key
from simulator.broker import PrivateBroker

from .report import UploadReport

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
        self.plaintext = os.urandom(1_000_000)  # encrypted with a fresh key per segment

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
            age.write(self.plaintext)
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


def _raw_put(url_port: int, context: Any, paths: list[Path], blocksize: int, *,
             sha256: bool = False) -> float:
    """Seconds to PUT every file, one PUT each, over one persistent connection, streamed from
    the file in `blocksize` reads as the uploader streams its PATCH bodies."""
    conn = http.client.HTTPSConnection("127.0.0.1", url_port, context=context, timeout=60,
                                       blocksize=blocksize)
    query = "?sha256" if sha256 else ""
    started = time.perf_counter()
    try:
        for path in paths:
            size = path.stat().st_size
            with path.open("rb") as f:
                conn.request("PUT", f"/raw/{path.name}{query}", body=_Piece(f, size),
                             headers={"Content-Length": str(size)})
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


class _PacedRelay:
    """A TCP relay on 127.0.0.1 to `target_port` that lets the client's bytes through at
    `rate` bytes/s at most (no credit saved up while idle, as on a real link) and the server's
    answers through at once. One thread per direction per connection."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port, self.rate = target_port, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="paced-relay", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            self._start(self._pump, client, server, self.rate)
            self._start(self._pump, server, client, None)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, rate: float | None) -> None:
        began, sent = time.monotonic(), 0
        try:
            while data := source.recv(64 * 1024):
                if rate:
                    sent += len(data)
                    due, now = began + sent / rate, time.monotonic()
                    if due > now:
                        time.sleep(due - now)
                    elif now - due > 0.005:  # the link was idle: it saved no credit
                        began, sent = now, 0
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() would not
        self.listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=10)
        for sock in sockets:
            sock.close()


def run_upload(tmpdir: str | Path, *, segments: int = 16, segment_mb: int = 8,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, small_chunk_bytes: int = 1 << 20,
               link_mbit: float = 400.0, repeats: int = 3,
               progress: Callable[[str], None] = lambda text: None,
               context: dict[str, Any] | None = None) -> UploadReport:
    """Measure every line; a part that cannot run is an entry in `errors`."""
    report = UploadReport(segments=segments, segment_bytes=0, repeats=repeats,
                          chunk_bytes=chunk_bytes, small_chunk_bytes=small_chunk_bytes,
                          link_mbit=link_mbit, target_ratio=TARGET_RATIO,
                          context=dict(context or {}))
    link = f", then raw PUT and ours through a {link_mbit:g} Mbit/s relay" if link_mbit else ""
    progress(f"upload: {repeats} x {segments} segments of {segment_mb} MB: raw PUT, raw PUT + "
             f"SHA-256, ours at {chunk_bytes // 1024} KiB and {small_chunk_bytes // 1024} KiB "
             f"chunks{link}, interleaved")
    try:
        _measure(Path(tmpdir), segments, segment_mb, chunk_bytes, small_chunk_bytes, link_mbit,
                 repeats, report)
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as exc:
        report.errors.append(f"upload: {type(exc).__name__}: {exc}")
    return report


def _measure(tmp: Path, segments: int, segment_mb: int, chunk_bytes: int, small_chunk_bytes: int,
             link_mbit: float, repeats: int, report: UploadReport) -> None:
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
    blocksize = 64 * 1024  # TusClient's default; the raw PUT streams in the same reads
    lines = ["raw", "raw_sha", "raw_link", "ours", "ours_small", "ours_link"]  # raw ones first:
    if not link_mbit:  # an upload deletes the segments it sent
        lines = [key for key in lines if not key.endswith("_link")]
    times: dict[str, list[float]] = {key: [] for key in lines}
    total = 0
    server = _ServerProcess(fleet.directory, centre, cert.cert_file, cert.key_file)
    relay = _PacedRelay(server.port, link_mbit * 1e6 / 8) if link_mbit else None
    port = {"now": server.port}  # where the uploader connects: the server, or the relay
    uploader: Uploader | None = None
    try:
        uploader = Uploader(store, tmp / "device" / "upload.sqlite",
                            lambda: TusClient(f"https://127.0.0.1:{port['now']}/files/",
                                              context, blocksize=blocksize),
                            fleet.centre_public_keys(), DEVICE_ID, chunk_bytes=chunk_bytes)
        for _ in range(repeats):  # interleaved, so drift hits every line alike
            seqs = [recorder.record(segment_mb) for _ in range(segments)]
            paths = [store.path(seq, ".ts.age") for seq in seqs]
            total = sum(p.stat().st_size for p in paths)
            for key in lines:
                if key.startswith("raw"):
                    via = relay.port if relay is not None and key == "raw_link" else server.port
                    times[key].append(_raw_put(via, context, paths, blocksize,
                                               sha256=key == "raw_sha"))
                    shutil.rmtree(centre / "ingest" / "raw", ignore_errors=True)  # disk use
                    continue
                if key != "ours":  # an upload deleted them: record the same amount again
                    seqs = [recorder.record(segment_mb) for _ in range(segments)]
                    paths = [store.path(seq, ".ts.age") for seq in seqs]
                uploader.chunk_bytes = small_chunk_bytes if key == "ours_small" else chunk_bytes
                port["now"] = relay.port if relay is not None and key == "ours_link" else \
                    server.port
                started = time.perf_counter()
                summary = uploader.run_once(threading.Event())
                times[key].append(time.perf_counter() - started)
                if summary.uploaded != seqs:
                    raise RuntimeError(f"the uploader left segments behind: refused "
                                       f"{summary.refused}, deferred {summary.deferred}")
                report.resent_bytes += summary.bytes_resent
                shutil.rmtree(centre / "evidence" / DEVICE_ID, ignore_errors=True)  # disk use
    finally:
        if uploader is not None:
            uploader.close()
        if relay is not None:
            relay.close()
        server.close()
        store.close()
    mb = total / 1e6
    report.segment_bytes = total // segments
    report.raw_mb_s, report.raw_sha_mb_s, report.ours_mb_s, report.ours_small_mb_s = (
        mb / min(times[k]) for k in ("raw", "raw_sha", "ours", "ours_small"))
    if link_mbit:
        report.raw_link_mb_s = mb / min(times["raw_link"])
        report.ours_link_mb_s = mb / min(times["ours_link"])


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--serve"]:
        return _serve(*args_in[1:5])
    parser = argparse.ArgumentParser(prog="python -m bench.upload_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=16,
                        help="segments per run (16: the last one's completion, which nothing "
                             "overlaps, weighs 1/16)")
    parser.add_argument("--segment-mb", type=int, default=8,
                        help="plaintext per segment, 10**6 bytes (8: about 6 s of 1080p30)")
    parser.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK_BYTES // 1024,
                        help=f"our PATCH size (default {DEFAULT_CHUNK_BYTES // 1024}, the "
                             "device's upload.chunk_bytes default)")
    parser.add_argument("--small-chunk-kib", type=int, default=1024,
                        help="PATCH size of the second 'ours' line (1024)")
    parser.add_argument("--link-mbit", type=float, default=400.0,
                        help="pace of the relay for the '... over a link' lines, Mbit/s "
                             "(400; 0 leaves them out)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; best counts")
    parser.add_argument("--tmpdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(args_in)
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="upload-bench-", dir=args.tmpdir) as tmp:
        report = run_upload(tmp, segments=args.segments, segment_mb=args.segment_mb,
                            chunk_bytes=args.chunk_kib * 1024,
                            small_chunk_bytes=args.small_chunk_kib * 1024,
                            link_mbit=args.link_mbit, repeats=args.repeats,
                            context={"tmpdir": str(Path(tmp).parent), "cpus": os.cpu_count(),
                                     "filesystem": _filesystem(Path(tmp))})
    if args.json:
        print(report.as_json())
    else:
        print(report.as_table())
    return 1 if report.errors else 0


def _filesystem(path: Path) -> str:
    from .__main__ import filesystem_of
    return filesystem_of(path)


if __name__ == "__main__":
    sys.exit(main())
