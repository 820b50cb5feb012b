"""Signatures over RFC 8785 (JCS), and the legacy form accepted during the migration."""

from __future__ import annotations

import base64

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center.store import Store
from protocol.signing import SignatureError, Signer, canonical, legacy_canonical, verify

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def test_the_signed_bytes_are_rfc_8785_so_other_languages_recompute_them() -> None:
    message = {"v": 1, "alt_m": 76.0, "operator": "Zoë", "lat": 52.3781, "sig": "x"}
    assert canonical(message) == b'{"alt_m":76,"lat":52.3781,"operator":"Zo\xc3\xab","v":1}'
    assert canonical(message) == rfc8785.dumps({k: v for k, v in message.items() if k != "sig"})


def test_verify_names_the_key_that_signed() -> None:
    signed = Signer(KEY).sign({"v": 1, "alt_m": 76.0})
    assert verify(signed, [OTHER.public_key(), KEY.public_key()]) == KEY.public_key()


def test_a_message_signed_before_the_migration_still_verifies() -> None:
    """Receivers are upgraded first: they must accept what an old sender signed."""
    message = {"v": 1, "alt_m": 76.0, "operator": "Zoë"}
    legacy = {**message, "sig": base64.b64encode(KEY.sign(legacy_canonical(message))).decode()}
    assert canonical(message) != legacy_canonical(message)
    assert verify(legacy, [KEY.public_key()]) == KEY.public_key()


def test_a_changed_message_fails_in_both_forms() -> None:
    signed = Signer(KEY).sign({"v": 1, "alt_m": 76.0})
    with pytest.raises(SignatureError, match="bad signature"):
        verify({**signed, "alt_m": 77.0}, [KEY.public_key()])


def test_an_integer_jcs_cannot_carry_is_refused_in_either_form() -> None:
    message = {"v": 1, "seq": 2**60}
    legacy = {**message, "sig": base64.b64encode(KEY.sign(legacy_canonical(message))).decode()}
    with pytest.raises(SignatureError, match="no canonical form"):
        verify(legacy, [KEY.public_key()])


def test_a_centres_command_numbers_are_its_own_and_stay_ahead_after_a_lost_store(
        tmp_path) -> None:
    store = Store(tmp_path / "a.sqlite")
    first = store.next_command_seq("key-a", now_ms=1_000)
    assert store.next_command_seq("key-a", now_ms=1_000) == first + 1  # same millisecond
    assert store.next_command_seq("key-b", now_ms=1_000) == 1_000  # another centre's count
    store.close()
    fresh = Store(tmp_path / "b.sqlite")  # the store was lost: the clock keeps it ahead
    assert fresh.next_command_seq("key-a", now_ms=2_000) > first + 1
