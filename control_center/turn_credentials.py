"""Short-lived TURN credentials, as coturn's `use-auth-secret` checks them.

The TURN REST API scheme (draft-uberti-behave-turn-rest-00, section 2.2): the centre and the
TURN server share one secret; the centre mints a username "<expiry unix time>:<name>" and the
password base64(HMAC-SHA1(secret, username)). coturn recomputes the password from the
username and refuses it once the expiry has passed, so nothing is stored per user and a
credential that leaks (it travels in a voice_offer and to a browser) is worthless within the
TTL. The name only labels the allocation in coturn's log (a device id, a console user).

Pure: the time is an argument.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Any, Protocol

SCHEMES = ("stun", "turn", "turns")
MAX_NAME = 64  # the username ("<10 digits>:<name>") must fit the protocol's 200 characters
_NAME = re.compile(rf"[A-Za-z0-9._@+-]{{1,{MAX_NAME}}}")


class TurnConfig(Protocol):
    """What minting needs; the centre's `VoiceSettings` ([voice], control_center/config.py)."""

    @property
    def ice_urls(self) -> Sequence[str]: ...  # stun:, turn: and turns: URLs

    @property
    def turn_secret(self) -> bytes | None: ...  # coturn's static-auth-secret; None: no TURN

    @property
    def credential_ttl_s(self) -> float: ...


def turn_username(name: str, expiry_unix: int) -> str:
    """The REST API username; ValueError for a name coturn would split or log oddly (':' is
    its separator between the expiry and the name)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"TURN user name {name!r} must be 1-{MAX_NAME} letters, digits or "
                         "'._@+-' (no ':', which separates the expiry from the name)")
    return f"{int(expiry_unix)}:{name}"


def turn_password(secret: bytes, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)), what coturn computes from its static-auth-secret."""
    digest = hmac.new(secret, username.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def scheme_of(url: str) -> str:
    return url.split(":", 1)[0]


def ice_servers_for(name: str, now_unix: float, config: TurnConfig) -> list[dict[str, Any]]:
    """The WebRTC `iceServers` for `name`, valid from `now_unix` for the configured TTL: one
    entry with the STUN URLs (no credentials: STUN asks for none) and one with the TURN URLs
    and a fresh credential; an entry without URLs is left out. The shape is both the browser's
    RTCConfiguration.iceServers and the voice_offer command's `ice_servers`."""
    stun = [u for u in config.ice_urls if scheme_of(u) == "stun"]
    turn = [u for u in config.ice_urls if scheme_of(u) in ("turn", "turns")]
    unknown = [u for u in config.ice_urls if scheme_of(u) not in SCHEMES]
    if unknown:
        raise ValueError(f"not a stun:, turn: or turns: URL: {unknown[0]!r}")
    servers: list[dict[str, Any]] = []
    if stun:
        servers.append({"urls": stun})
    if turn:
        if not config.turn_secret:
            raise ValueError("TURN URLs are configured but no TURN secret (voice.turn_secret_file)")
        username = turn_username(name, int(now_unix + config.credential_ttl_s))
        servers.append({"urls": turn, "username": username,
                        "credential": turn_password(config.turn_secret, username)})
    return servers

