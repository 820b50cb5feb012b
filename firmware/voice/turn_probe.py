"""Can this device get a TURN relay? One allocation per turn: URL, and one line if none works.

A pillar behind NAT can only be heard through the centre's TURN server. When no allocation
succeeds the call cannot work, and the operator should learn why from the fleet view (and the
caller hear the spoken fallback message) instead of watching ICE fail after its timeouts. The
line says what failed and what to fix: a host or port not reachable (firewall, wrong URL),
credentials refused (the centre's secret differs from coturn's, or their clocks disagree), or
another answer of the server.

The allocation is aioice's, the client aiortc itself uses, with the URL read by aiortc's own
parser, so a URL passes here exactly when aiortc can use it. aiortc uses only the FIRST TURN
URL it supports (aiortc/rtcicetransport.py, `connection_kwargs`); `TurnProbe.working_url` and
`preferring` let the caller put a URL that works first.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from aioice import stun
from aioice.turn import create_turn_endpoint
from aiortc.rtcicetransport import parse_stun_turn_uri

DELETE_TIMEOUT_S = 1.0  # giving the probe's allocation back is a courtesy, not a condition


@dataclass(frozen=True)
class TurnProbe:
    working_url: str | None  # the first URL (in time) that gave an allocation
    error: str | None  # one line when none did; None when one did


@dataclass(frozen=True)
class _Failure:
    url: str
    what: str  # "not reachable (...)", "refused the credentials (...)", ...
    kind: str  # "unreachable", "credentials", "tls", "other"
    transport: str  # "udp" or "tcp", for the firewall hint
    port: int | None


async def probe_turn(ice_servers: list[dict[str, Any]], timeout_s: float) -> str | None:
    """None if one turn:/turns: URL of `ice_servers` (the WebRTC iceServers shape, as in a
    voice_offer) gives an allocation within `timeout_s`, else one line saying what failed and
    what to fix. The URLs are tried at once, so this returns within about `timeout_s`."""
    return (await probe_turn_servers(ice_servers, timeout_s)).error


async def probe_turn_servers(ice_servers: list[dict[str, Any]], timeout_s: float) -> TurnProbe:
    """`probe_turn`, also naming the URL that worked (the first to give an allocation)."""
    attempts: list[tuple[str, dict[str, Any]]] = [
        (url, server) for server in ice_servers for url in _urls(server)
        if url.startswith(("turn:", "turns:"))]
    if not attempts:
        return TurnProbe(None, "voice: no TURN server in the ICE servers the centre sent: a "
                               "device behind NAT cannot be reached; set turn: URLs in the "
                               "centre's voice.ice_urls")
    tasks = {asyncio.create_task(_allocate(url, server, timeout_s)): url
             for url, server in attempts}
    failures: dict[str, _Failure] = {}
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                failure = task.result()
                if failure is None:
                    return TurnProbe(tasks[task], None)
                failures[tasks[task]] = failure
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return TurnProbe(None, _line([failures[url] for url, _ in attempts]))


def preferring(ice_servers: list[dict[str, Any]], url: str) -> list[dict[str, Any]]:
    """`ice_servers` with `url` moved to the front of the first entry that has it, and that
    entry first: aiortc then relays through it (it takes only the first TURN URL)."""
    head = [s for s in ice_servers if url in _urls(s)][:1]
    if not head:
        return list(ice_servers)
    first = dict(head[0], urls=[url, *[u for u in _urls(head[0]) if u != url]])
    return [first, *[s for s in ice_servers if s is not head[0]]]


def _urls(server: dict[str, Any]) -> list[str]:
    urls = server.get("urls", [])
    return [urls] if isinstance(urls, str) else list(urls)


async def _allocate(url: str, server: dict[str, Any], timeout_s: float) -> _Failure | None:
    """One TURN allocation through `url`, given back at once; None if it worked."""
    try:
        parsed = parse_stun_turn_uri(url)
    except ValueError as exc:
        return _Failure(url, f"is not a TURN URL aiortc can use ({exc})", "other", "udp", None)
    host, port, transport = parsed["host"], parsed["port"], parsed["transport"]
    if transport not in ("udp", "tcp") or (parsed["scheme"] == "turns" and transport != "tcp"):
        return _Failure(url, f"has a transport aiortc does not use ({transport})", "other",
                        "udp", port)

    def failed(what: str, kind: str) -> _Failure:
        return _Failure(url, what, kind, transport, port)

    closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        relay, _ = await asyncio.wait_for(create_turn_endpoint(
            lambda: _Closed(closed), (host, port), server.get("username"),
            server.get("credential"), ssl=parsed["scheme"] == "turns", transport=transport),
            timeout_s)
    except (TimeoutError, stun.TransactionTimeout):
        return failed(f"not reachable (timed out after {timeout_s:g} s)", "unreachable")
    except stun.TransactionFailed as exc:
        code, reason = exc.response.attributes.get("ERROR-CODE", (0, "no error code"))
        if code == 401:
            return failed(f"refused the credentials ({code} {reason})", "credentials")
        return failed(f"refused the allocation ({code} {reason})", "other")
    except socket.gaierror as exc:
        return failed(f"not reachable (host {host} not found: {exc.strerror})", "unreachable")
    except ssl.SSLCertVerificationError as exc:
        return failed(f"has a TLS certificate the device does not trust ({exc.verify_message})",
                      "tls")
    except ssl.SSLError as exc:
        return failed(f"failed the TLS handshake ({exc.reason or exc})", "tls")
    except ConnectionRefusedError:
        return failed("not reachable (connection refused)", "unreachable")
    except OSError as exc:
        if type(exc) is ConnectionError:  # aioice: an answer without the relayed address
            return failed(f"gave a broken allocation ({exc})", "other")
        return failed(f"not reachable ({exc.strerror or exc})", "unreachable")
    relay.close()  # deletes the allocation (a REFRESH with lifetime 0), then closes the socket
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(closed), DELETE_TIMEOUT_S)
    return None


class _Closed(asyncio.DatagramProtocol):
    """Receives nothing; tells when the relay's socket is closed."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self._closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


_FIXES = {
    "unreachable": "check the centre's voice.ice_urls and the device's firewall ({ports})",
    "credentials": "the centre's voice.turn_secret_file must hold coturn's static-auth-secret, "
                   "and the centre's and the TURN server's clocks must agree (a credential "
                   "carries its expiry)",
    "tls": "the TURN server's certificate must be valid for its host name and signed by a CA "
           "in the device's system store",
    "other": "see the TURN server's log",
}


def _line(failures: list[_Failure]) -> str:
    """One line: every URL and what happened to it, and what to fix for each kind."""
    what = "; ".join(f"{f.url} {f.what}" for f in failures)
    fixes = []
    for kind in dict.fromkeys(f.kind for f in failures):
        ports = ", ".join(dict.fromkeys(f"{f.transport.upper()} {f.port}" for f in failures
                                        if f.kind == kind and f.port is not None))
        fixes.append(_FIXES[kind].format(ports=ports or "the TURN port"))
    if len(failures) == 1:
        return f"voice: TURN server {what}: {'; '.join(fixes)}"
    # Several: what to fix first, so a line cut to the event's 200 characters keeps it.
    return f"voice: no TURN server usable: {'; '.join(fixes)}; tried {what}"
