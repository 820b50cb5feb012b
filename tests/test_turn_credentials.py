"""The centre mints TURN credentials as coturn's `use-auth-secret` checks them (the TURN REST
API): username "<expiry>:<name>", password base64(HMAC-SHA1(secret, username))."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

import pytest

from control_center.turn_credentials import ice_servers_for, turn_password, turn_username

SECRET = b"4080218913"  # coturn's own example secret (turnserver.conf, static-auth-secret)
NOW = 1_800_000_000


@dataclass(frozen=True)
class Voice:
    ice_urls: tuple[str, ...]
    turn_secret: bytes | None = SECRET
    credential_ttl_s: float = 3600


def expected_password(secret: bytes, username: str) -> str:
    """Computed here independently, as the draft and coturn's docs state it."""
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()


def test_the_password_is_the_base64_hmac_sha1_of_the_username_under_the_secret() -> None:
    assert turn_password(SECRET, "1800003600:pil-ams-cs-01") == expected_password(
        SECRET, "1800003600:pil-ams-cs-01")


def test_a_known_vector() -> None:
    """Computed with openssl, outside Python:
    printf 1600000000:alice | openssl dgst -sha1 -hmac secret -binary | base64"""
    assert turn_password(b"secret", "1600000000:alice") == "UQpbzqLy8wUgAxlVOh3KKXno2lk="


def test_the_username_is_the_expiry_then_the_name() -> None:
    assert turn_username("pil-ams-cs-01", 1_800_003_600) == "1800003600:pil-ams-cs-01"


@pytest.mark.parametrize("name", ["pil:01", "", "a b", "x" * 65, "naïve"])
def test_a_name_coturn_would_split_or_mangle_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="TURN user name"):
        turn_username(name, NOW)


def test_turn_urls_get_one_entry_with_a_credential_that_expires_after_the_ttl() -> None:
    urls = ("turn:turn.example:3478?transport=udp", "turns:turn.example:5349?transport=tcp")
    [server] = ice_servers_for("pil-ams-cs-01", NOW, Voice(urls, credential_ttl_s=600))
    assert server == {"urls": list(urls), "username": f"{NOW + 600}:pil-ams-cs-01",
                      "credential": expected_password(SECRET, f"{NOW + 600}:pil-ams-cs-01")}


def test_stun_urls_get_an_entry_without_credentials() -> None:
    servers = ice_servers_for("alice", NOW, Voice(("stun:stun.example:3478",
                                                   "turn:turn.example:3478")))
    assert servers[0] == {"urls": ["stun:stun.example:3478"]}
    assert servers[1]["urls"] == ["turn:turn.example:3478"]


def test_no_urls_give_no_ice_servers() -> None:
    assert ice_servers_for("alice", NOW, Voice((), turn_secret=None)) == []


def test_a_fractional_now_is_rounded_down_to_whole_seconds() -> None:
    [server] = ice_servers_for("alice", NOW + 0.9, Voice(("turn:t.example",), credential_ttl_s=60))
    assert server["username"] == f"{NOW + 60}:alice"


def test_a_name_with_a_colon_is_refused_when_minting() -> None:
    with pytest.raises(ValueError, match="no ':'"):
        ice_servers_for("desk:alice", NOW, Voice(("turn:turn.example:3478",)))


def test_turn_urls_without_a_secret_are_refused() -> None:
    with pytest.raises(ValueError, match=r"voice\.turn_secret_file"):
        ice_servers_for("alice", NOW, Voice(("turn:turn.example:3478",), turn_secret=None))


def test_a_url_of_another_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="not a stun:, turn: or turns: URL"):
        ice_servers_for("alice", NOW, Voice(("http://turn.example",)))


def test_the_secret_is_not_in_the_repr_of_the_settings() -> None:
    """The config's VoiceSettings holds the secret out of its repr (logs, tracebacks)."""
    from control_center.config import VoiceSettings
    settings = VoiceSettings(ice_urls=(), credential_ttl_s=60, answer_timeout_s=10,
                             relay_only=False, turn_secret=b"hunter2-hunter2")
    assert "hunter2" not in repr(settings)
