"""TURN against a real coturn on loopback: the centre's credentials open a relay, a call flows
through it, and the device's probe says in one line why it cannot get one."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import AudioStreamTrack

from control_center.turn_credentials import ice_servers_for
from firmware.voice.turn_probe import preferring, probe_turn, probe_turn_servers
from simulator.turn import TurnServer, free_port, stun_binding_answered

TIMEOUT_S = 5.0
DEPLOYMENT_CONF = Path(__file__).resolve().parents[1] / "hw" / "turn" / "turnserver.conf"


@dataclass(frozen=True)
class Voice:
    ice_urls: tuple[str, ...]
    turn_secret: bytes | None
    credential_ttl_s: float = 600


@pytest.fixture(scope="module")
def turn() -> Iterator[TurnServer]:
    with TurnServer() as running:
        yield running


@pytest.fixture(scope="module")
def deployment() -> Iterator[TurnServer]:
    """hw/turn/turnserver.conf itself, with only its addresses, ports and files on loopback."""
    with TurnServer(deployment_conf=DEPLOYMENT_CONF) as running:
        yield running


def servers(turn: TurnServer, name: str, *, secret: bytes | None = None,
            now: float | None = None) -> list[dict[str, Any]]:
    voice = Voice(tuple(turn.urls), secret or turn.secret.encode())
    return ice_servers_for(name, time.time() if now is None else now, voice)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


# -- a call through the relay ---------------------------------------------------------------------

def relay_only(ice_servers: list[dict[str, Any]]) -> RTCConfiguration:
    """aiortc 1.16 has the browser's iceTransportPolicy "relay": no host candidates at all."""
    return RTCConfiguration(iceServers=[RTCIceServer(**s) for s in ice_servers],
                            iceTransportPolicy=RTCIceTransportPolicy.RELAY)


def candidates(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if line.startswith("a=candidate:")]


async def relayed_call(turn: TurnServer) -> tuple[list[str], list[str], Any]:
    """An operator's peer (offering audio) and a pillar's, each with its own credentials:
    their candidates, and the first audio frame the pillar receives."""
    operator = RTCPeerConnection(relay_only(servers(turn, "alice")))
    pillar = RTCPeerConnection(relay_only(servers(turn, "pil-ams-cs-01")))
    frame: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    reading: list[asyncio.Task[None]] = []

    @pillar.on("track")
    def on_track(track: Any) -> None:
        async def first_frame() -> None:
            frame.set_result(await track.recv())
        reading.append(asyncio.ensure_future(first_frame()))

    try:
        operator.addTrack(AudioStreamTrack())
        await operator.setLocalDescription(await operator.createOffer())
        offer: RTCSessionDescription = operator.localDescription
        await pillar.setRemoteDescription(offer)
        await pillar.setLocalDescription(await pillar.createAnswer())
        answer: RTCSessionDescription = pillar.localDescription
        await operator.setRemoteDescription(answer)
        return candidates(offer.sdp), candidates(answer.sdp), await frame
    finally:
        await operator.close()
        await pillar.close()


def test_an_operator_and_a_pillar_talk_through_the_relay_with_the_centres_credentials(
        turn: TurnServer) -> None:
    offered, answered, frame = run(relayed_call(turn))
    assert frame.sample_rate == 48000
    for candidate in offered + answered:  # only coturn's relayed addresses: the audio went there
        parts = candidate.split()
        assert parts[7] == "relay" and int(parts[5]) in turn.relay_ports, candidate
    assert offered and answered


# -- the device's probe ---------------------------------------------------------------------------

def test_the_probe_says_nothing_when_the_centres_credentials_open_a_relay(
        turn: TurnServer) -> None:
    assert run(probe_turn(servers(turn, "pil-ams-cs-01"), 3.0)) is None


def test_the_probe_names_the_url_that_worked(turn: TurnServer) -> None:
    probe = run(probe_turn_servers(servers(turn, "pil-ams-cs-01"), 3.0))
    assert probe.working_url in turn.urls


def test_the_probe_names_refused_credentials_and_the_secret_to_check(turn: TurnServer) -> None:
    line = run(probe_turn(servers(turn, "pil-ams-cs-01", secret=b"not-the-secret"), 3.0))
    assert "refused the credentials (401 Unauthorized)" in line
    assert "voice.turn_secret_file" in line and "\n" not in line


def test_the_probe_names_an_expired_credential_as_refused(turn: TurnServer) -> None:
    line = run(probe_turn(servers(turn, "pil-ams-cs-01", now=time.time() - 700), 3.0))
    assert "refused the credentials" in line


def test_the_probe_of_a_silent_port_says_not_reachable_within_its_timeout() -> None:
    url = f"turn:127.0.0.1:{free_port()}?transport=udp"
    started = time.monotonic()
    line = run(probe_turn([{"urls": [url], "username": "1:a", "credential": "x"}], 1.0))
    assert time.monotonic() - started < 1.5
    assert line == (f"voice: TURN server {url} not reachable (timed out after 1 s): check the "
                    "centre's voice.ice_urls and the device's firewall (UDP "
                    f"{url.split(':')[2].split('?')[0]})")


def test_the_probe_of_a_closed_tcp_port_says_refused_at_once() -> None:
    url = f"turn:127.0.0.1:{free_port()}?transport=tcp"
    line = run(probe_turn([{"urls": [url], "username": "1:a", "credential": "x"}], 1.0))
    assert f"{url} not reachable (connection refused)" in line


def test_the_probe_succeeds_when_one_of_several_urls_works(turn: TurnServer) -> None:
    dead = f"turn:127.0.0.1:{free_port()}?transport=tcp"
    [good] = servers(turn, "pil-ams-cs-01")
    assert run(probe_turn([dict(good, urls=[dead, *good["urls"]])], 2.0)) is None


def test_the_probe_without_a_turn_url_says_a_device_behind_nat_cannot_be_reached() -> None:
    line = run(probe_turn([{"urls": ["stun:stun.example:3478"]}], 1.0))
    assert line is not None and "no TURN server" in line and "voice.ice_urls" in line


def test_preferring_puts_the_working_url_first_where_aiortc_looks() -> None:
    ice = [{"urls": ["stun:s.example"]},
           {"urls": ["turn:t.example?transport=udp", "turn:t.example?transport=tcp"],
            "username": "u", "credential": "c"}]
    assert preferring(ice, "turn:t.example?transport=tcp") == [
        {"urls": ["turn:t.example?transport=tcp", "turn:t.example?transport=udp"],
         "username": "u", "credential": "c"},
        {"urls": ["stun:s.example"]}]


# -- the private coturn ---------------------------------------------------------------------------

def test_the_private_coturn_is_gone_from_its_port_once_stopped() -> None:
    server = TurnServer()
    server.start()
    assert stun_binding_answered(server.port, 1.0)
    server.close()
    assert not server.running and not stun_binding_answered(server.port, 0.2)


# -- the deployment's turnserver.conf -------------------------------------------------------------

class Relayed(asyncio.DatagramProtocol):
    """What a relay reports back: the first error of a send (a refused peer)."""

    def __init__(self) -> None:
        self.error: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    def error_received(self, exc: Exception) -> None:
        if not self.error.done():
            self.error.set_result(exc)


async def allocate(turn: TurnServer, port: int, transport: str,
                   tls: ssl.SSLContext | None = None) -> tuple[Any, Relayed]:
    [server] = servers(turn, "pil-ams-cs-01")
    return await create_turn_endpoint(Relayed, ("127.0.0.1", port), server["username"],
                                      server["credential"], transport=transport, ssl=tls)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_the_deployment_config_gives_a_relay_over_each_transport_it_listens_on(
        deployment: TurnServer, transport: str) -> None:
    async def relay_port() -> int:
        if transport == "tls":
            assert deployment.tls_port and deployment.cert_file
            tls = ssl.create_default_context(cafile=str(deployment.cert_file))
            relay, _ = await allocate(deployment, deployment.tls_port, "tcp", tls)
        else:
            relay, _ = await allocate(deployment, deployment.port, transport)
        relay.close()
        return int(relay.get_extra_info("sockname")[1])

    assert run(relay_port()) in deployment.relay_ports


@pytest.mark.parametrize("peer", ["10.1.2.3", "192.168.1.10", "172.16.0.1", "169.254.169.254",
                                  "127.0.0.1"])
def test_the_deployment_config_refuses_to_relay_into_private_networks(
        deployment: TurnServer, peer: str) -> None:
    """A credential must not open the centre's own network (or a cloud's metadata service)."""
    async def refusal() -> Exception:
        relay, relayed = await allocate(deployment, deployment.port, "udp")
        relay.sendto(b"probe", (peer, 5000))
        try:
            return await relayed.error
        finally:
            relay.close()

    error = run(refusal())
    assert isinstance(error, stun.TransactionFailed)
    assert error.response.attributes["ERROR-CODE"][0] == 403
