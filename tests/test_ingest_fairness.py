"""The ingest server under a slow, greedy or hostile client, over real TLS sockets: one device
cannot take the receive slots or the connections from the others, slow bodies, headers and
handshakes are cut, a flood is refused at accept, and a poisoned manifest is a 422, not a 500.
Limits are set small here so that each behaviour shows within a second or so."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control_center.ingest import server as ingest_server
from control_center.ingest.cli import main as sos_center_ingest
from control_center.ingest.server import IngestServer, connection_cap
from control_center.ingest.tus import Refusal
from tests.test_ingest_support import (
    Env,
    Receiving,
    Reply,
    Seg,
    SlowBody,
    Tus,
    client_context,
    client_hello,
    closed_by_peer,
    decode_receipt,
    dribble_until_closed,
    enrol,
    idle_connection,
    new_env,
    random_bytes,
    still_open,
    stop_all,
    tcp_from,
)

DEVICE = "tok-001"
FLOOD_ADDRESS = "127.0.0.2"  # the attacker's address; the devices connect from 127.0.0.1


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = new_env(tmp_path, device=DEVICE)
    yield environment
    stop_all(environment)


@pytest.fixture
def slow_bodies() -> Iterator[list[SlowBody]]:
    """Slow clients a test starts; stopped at its end."""
    started: list[SlowBody] = []
    yield started
    for body in started:
        body.stop()


def created(client: Tus, seg: Seg) -> str:
    reply = client.create(seg)
    assert reply.status == 201, reply.body
    return reply.header("location") or ""


def assert_receipted(reply: Reply, seg: Seg) -> None:
    assert reply.status == 204, reply.body
    receipt = decode_receipt(reply.header("upload-receipt") or "")
    assert (receipt["device_id"], receipt["seq"]) == (seg.device_id, seg.seq)


# -- one device cannot hold the receive slots ----------------------------------------------------
def test_a_device_dribbling_bodies_cannot_delay_another_devices_upload(
        env: Env, slow_bodies: list[SlowBody]) -> None:
    server = env.start(max_uploads=3, max_device_uploads=2, min_body_rate=0)
    slow = enrol(env.fleet, env.root, "tok-slow")
    slow_card, slow_client = env.card("slow-card", slow), env.client(server, slow.tls)
    receiving = Receiving(server)
    for _ in range(3):  # one byte every 20 ms on each of three connections
        seg = slow_card.record(random_bytes(20_000))
        slow_bodies.append(SlowBody(slow_client, created(slow_client, seg), 0, seg.data()))
    assert receiving.wait(2)
    seg = env.card().record(random_bytes(20_000))
    assert_receipted(env.client(server).upload(seg), seg)
    assert not any(body.closed_by_server.is_set() for body in slow_bodies[:2])
    assert "upload_interrupted" not in env.events.names()  # the slow ones still dribble


def test_a_device_over_its_upload_cap_gets_429_with_retry_after(
        env: Env, slow_bodies: list[SlowBody]) -> None:
    server = env.start(max_device_uploads=2, retry_after_s=3, min_body_rate=0)
    card, client = env.card(), env.client(server)
    segs = [card.record(random_bytes(20_000)) for _ in range(3)]
    locations = [created(client, seg) for seg in segs]
    receiving = Receiving(server)
    slow_bodies.extend(SlowBody(client, location, 0, seg.data())
                       for location, seg in zip(locations[:2], segs[:2], strict=True))
    assert receiving.wait(2)
    reply = client.patch(locations[2], 0, segs[2].data())
    assert (reply.status, reply.header("retry-after")) == (429, "3")
    assert reply.json() == {"error": f"device {DEVICE} is already sending 2 uploads, its "
                                     f"limit; finish one or try again later", "retry": True}


# -- slow clients are cut ------------------------------------------------------------------------
def test_a_body_slower_than_the_minimum_rate_is_cut_and_resumes_from_what_arrived(
        env: Env, slow_bodies: list[SlowBody]) -> None:
    server = env.start(min_body_rate=2000, body_rate_window_s=0.3)
    seg = env.card().record(random_bytes(20_000))
    data, client = seg.data(), env.client(server)
    location = created(client, seg)
    slow = SlowBody(client, location, 0, data, first=4096)  # then about 50 bytes/s
    slow_bodies.append(slow)
    interrupted = env.events.wait("upload_interrupted")
    assert "below the minimum of 2000 bytes/s" in interrupted["reason"]
    assert slow.closed_by_server.wait(10)
    offset = int(client.head(location).header("upload-offset") or "")
    assert offset == interrupted["offset"] >= 4096  # what arrived is kept
    assert_receipted(client.patch(location, offset, data[offset:]), seg)


def stall_before_the_lock(server: IngestServer, seconds: float) -> None:
    """The server takes `seconds` to get an upload's lock (behind a slow fsync or store),
    after the PATCH's headers are in and before it reads a byte of its body. The stall is
    the slowness under test, not synchronisation."""
    upload_lock = server.upload_lock

    def slow(*args: Any) -> Any:
        threading.Event().wait(seconds)
        return upload_lock(*args)

    server.upload_lock = slow  # type: ignore[method-assign]


def test_a_body_sent_at_full_speed_is_not_cut_while_the_server_is_slow_to_read_it(
        env: Env) -> None:
    window = 0.2
    server = env.start(min_body_rate=8192, body_rate_window_s=window)
    stall_before_the_lock(server, 3 * window)  # three rate windows without reading
    seg = env.card().record(random_bytes(20_000))
    assert_receipted(env.client(server).upload(seg), seg)
    assert "upload_interrupted" not in env.events.names()


def fail_after_taking_the_body(server: IngestServer) -> None:
    """The server reads a PATCH's whole body, then its disk fails (507)."""

    def failing(upload: Any, body: Any, size: int, *_: Any) -> int | None:
        body.read(size)
        raise Refusal(507, "the ingest server could not write the upload: disk failed",
                      retry=True, retry_after=300)

    server.receive = failing  # type: ignore[method-assign]


def test_a_body_the_server_failed_to_write_is_answered_at_once_and_the_connection_closed(
        env: Env) -> None:
    """Part of a body may be read when the write fails, so the server cannot find its end:
    it answers and closes, rather than wait for Content-Length more bytes (here they never
    come: the client waits 30 s for its answer, the server 60 s for a byte)."""
    server = env.start(timeout_s=60, body_rate_window_s=60)
    fail_after_taking_the_body(server)
    seg = env.card().record(random_bytes(20_000))
    client = env.client(server)
    reply = client.patch(created(client, seg), 0, seg.data())
    assert (reply.status, reply.header("connection")) == (507, "close")


def test_headers_trickling_in_are_cut_at_the_header_deadline(env: Env) -> None:
    server = env.start(header_timeout_s=0.3, timeout_s=30)
    ctx = client_context(env.fleet, env.device.tls)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port)),
                         server_hostname="127.0.0.1") as tls:
        tls.sendall(b"OPTIONS /files/ HTTP/1.1\r\nX-Slow: ")
        dribble_until_closed(tls, b"a" * 500)  # 10 s of it, far from 30 s without a byte


def test_a_tls_handshake_trickling_in_is_cut_at_the_handshake_deadline(env: Env) -> None:
    server = env.start(handshake_timeout_s=0.3, timeout_s=30)
    hello = client_hello(client_context(env.fleet, env.device.tls))
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        assert dribble_until_closed(raw, hello) < len(hello)  # cut before its hello was done


# -- connection floods ---------------------------------------------------------------------------
def test_a_flood_from_one_address_is_closed_at_accept_while_a_device_completes(
        env: Env) -> None:
    server = env.start(max_handshakes_per_address=4, handshake_timeout_s=30)
    flood = [tcp_from(FLOOD_ADDRESS, server.port) for _ in range(4)]  # silent: no TLS
    refused = [tcp_from(FLOOD_ADDRESS, server.port) for _ in range(3)]
    try:
        assert all(closed_by_peer(sock) for sock in refused)
        seg = env.card().record(random_bytes(20_000))
        assert_receipted(env.client(server).upload(seg), seg)
        assert all(still_open(sock) for sock in flood)
    finally:
        for sock in flood + refused:
            sock.close()


def test_connections_over_the_cap_are_closed_before_the_tls_handshake(env: Env) -> None:
    server = env.start(max_connections=3, handshake_timeout_s=30)
    flood = [tcp_from(FLOOD_ADDRESS, server.port) for _ in range(3)]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        env.client(server).options()
    for sock in flood:
        sock.close()
    assert server.wait_connections(0, timeout=10)
    seg = env.card().record(random_bytes(20_000))
    assert_receipted(env.client(server).upload(seg), seg)


def test_a_device_over_its_connection_cap_gets_429_while_another_device_completes(
        env: Env) -> None:
    server = env.start(max_device_connections=2, retry_after_s=4)
    greedy = env.client(server, enrol(env.fleet, env.root, "tok-greedy").tls)
    held = [greedy.connect() for _ in range(2)]
    try:
        for conn in held:  # answered, so the server counts them, and kept open
            conn.request("OPTIONS", "/files/")
            assert conn.getresponse().read() == b""
        reply = greedy.options()
        assert (reply.status, reply.header("retry-after")) == (429, "4")
        assert reply.json() == {"error": "device tok-greedy already has 2 connections open, "
                                         "its limit; close one or try again later",
                                "retry": True}
        seg = env.card().record(random_bytes(20_000))
        assert_receipted(env.client(server).upload(seg), seg)
    finally:
        for conn in held:
            conn.close()


def test_a_device_reconnecting_over_its_connection_cap_holds_no_more_than_its_cap(
        env: Env) -> None:
    """Connections over the device's cap are answered 429 right after the handshake and
    closed, without waiting for a request: however often a stolen certificate reconnects, it
    cannot take the connection slots the other devices need."""
    server = env.start(max_connections=4, max_device_connections=1, timeout_s=30,
                       retry_after_s=4)
    greedy = env.client(server, enrol(env.fleet, env.root, "tok-greedy").tls)
    held = greedy.connect()
    idle: list[tuple[ssl.SSLSocket | None, bytes]] = []
    try:
        held.request("OPTIONS", "/files/")  # answered, so the server counts it: its cap
        assert held.getresponse().read() == b""
        idle = [idle_connection(greedy) for _ in range(4)]  # max_connections attempts
        answers = [answer for tls, answer in idle if tls is not None]
        assert answers and all(a.startswith(b"HTTP/1.1 429 ") for a in answers), answers
        assert b"Retry-After: 4\r\n" in answers[0]
        assert server.wait_connections(1, timeout=10)  # only the one within its cap is left
        seg = env.card().record(random_bytes(20_000))
        assert_receipted(env.client(server).upload(seg), seg)
    finally:
        held.close()
        for tls, _ in idle:
            if tls is not None:
                tls.close()


# -- poisoned manifests --------------------------------------------------------------------------
def test_a_manifest_of_deeply_nested_json_is_refused_with_422_and_audited(env: Env) -> None:
    seg = env.card().record(random_bytes(2000))
    client = env.client(env.start())
    reply = client.create(seg, manifest=b"[" * 5000 + b"]" * 5000)
    assert reply.status == 422
    assert reply.json() == {"error": "the manifest of segment 1 is refused: nested 5000 deep, "
                                     "over the limit of 16", "retry": False}
    refused = env.events.wait("segment_refused")
    assert (refused["stage"], refused["status"]) == ("create", 422)
    assert "nested 5000 deep" in refused["reason"]
    assert_receipted(client.upload(seg), seg)  # and the server goes on serving


def test_a_manifest_with_a_100_digit_integer_is_refused_with_422_and_audited(env: Env) -> None:
    seg = env.card().record(random_bytes(2000))
    client = env.client(env.start())
    manifest = json.loads(seg.manifest)
    manifest["frames"] = 10 ** 99
    reply = client.create(seg, manifest=json.dumps(manifest).encode())
    assert reply.status == 422
    assert "integer of 100 digits is outside the 64-bit range" in reply.json()["error"]
    assert "integer of 100 digits" in env.events.wait("segment_refused")["reason"]
    assert_receipted(client.upload(seg), seg)


# -- the limits as settings ----------------------------------------------------------------------
def test_the_soft_file_limit_is_raised_toward_what_the_connection_cap_needs() -> None:
    assert connection_cap(512, 8, soft=1024, hard=4096) == (1024, 512)  # enough already
    assert connection_cap(2000, 8, soft=1024, hard=4096) == (2072, 2000)  # raised
    assert connection_cap(2000, 8, soft=1024, hard=1024) == (1024, 952)  # the cap goes down


def test_a_file_limit_too_low_for_the_cap_lowers_it_with_one_log_line(
        env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ingest_server.resource, "getrlimit", lambda _: (1024, 1024))
    with caplog.at_level(logging.WARNING, logger="control_center.ingest"):
        server = env.start(max_connections=2000)
    assert server.limits.max_connections == 952
    assert [r.getMessage() for r in caplog.records if "lowered" in r.getMessage()] == [
        "ingest: max_connections lowered from 2000 to 952: the file limit (RLIMIT_NOFILE) is "
        "1024, and each connection takes a descriptor (raise LimitNOFILE in the service unit)"]


def test_a_limit_out_of_range_on_the_command_line_is_named(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    status = sos_center_ingest(["--fleet", str(env.fleet.directory), "--listen", "127.0.0.1:0",
                                "--store", str(env.root / "store"), "--audit",
                                str(env.audit), "--workdir", str(env.workdir),
                                "--max-device-uploads", "0"])
    assert status == 2
    assert "limit max_device_uploads is 0; it must be at least 1" in capsys.readouterr().err
