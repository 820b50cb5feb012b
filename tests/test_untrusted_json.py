"""The one decoder for untrusted JSON: limits before work, one clear error, nothing else escapes."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import MessageKind, ProtocolError, decode
from protocol.untrusted import (
    INT64_MAX,
    INT64_MIN,
    MANIFEST_LIMITS,
    JsonLimits,
    UntrustedJsonError,
    loads_untrusted,
    nesting_depth,
)


def test_a_message_within_the_limits_parses_as_json_does() -> None:
    text = '{"a":[1,-2,3.5,"x[{",null,true],"b":{"c":"\\u00e9"}}'
    assert loads_untrusted(text.encode()) == json.loads(text)


@pytest.mark.parametrize("payload", [b"[" * 5000 + b"]" * 5000,
                                     b'{"a":' * 3000 + b"0" + b"}" * 3000,
                                     b"[" * 20000])
def test_deep_nesting_is_refused_before_parsing(payload: bytes) -> None:
    with pytest.raises(UntrustedJsonError, match=r"nested .* deep"):
        loads_untrusted(payload, JsonLimits(max_bytes=1 << 20))


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    payload = json.dumps({"note": "[" * 500 + '\\"{' * 100}).encode()
    assert nesting_depth(payload) == 1
    assert loads_untrusted(payload)["note"].startswith("[[[")


def test_a_megabyte_of_escaped_quotes_is_refused_in_linear_time() -> None:
    """A backtracking string pattern made this quadratic: 16 KiB took a second, 1 MiB hours,
    and one device's payload held up every other's on the centre's one network thread."""
    payload = b'"' + b'\\"' * (MANIFEST_LIMITS.max_bytes // 2 - 1)
    done = threading.Event()
    outcome: list[BaseException] = []

    def decode_it() -> None:
        try:
            loads_untrusted(payload, MANIFEST_LIMITS)
        except UntrustedJsonError as exc:
            outcome.append(exc)
        done.set()

    threading.Thread(target=decode_it, daemon=True).start()
    assert done.wait(60), "the decoder is still scanning"
    assert outcome and "not JSON" in str(outcome[0])


@pytest.mark.parametrize("number", [str(INT64_MAX + 1), str(INT64_MIN - 1), "9" * 30,
                                    "1" * 5000])
def test_integers_outside_64_bits_are_refused(number: str) -> None:
    with pytest.raises(UntrustedJsonError, match="64-bit"):
        loads_untrusted(f'{{"seq":{number}}}'.encode())


def test_the_64_bit_extremes_are_kept_exactly() -> None:
    assert loads_untrusted(f"[{INT64_MIN},{INT64_MAX}]".encode()) == [INT64_MIN, INT64_MAX]


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_numbers_that_are_not_finite_are_refused(text: str) -> None:
    with pytest.raises(UntrustedJsonError, match="not"):
        loads_untrusted(f'{{"lat":{text}}}'.encode())


def test_a_key_given_twice_is_refused_so_no_two_readers_disagree() -> None:
    with pytest.raises(UntrustedJsonError, match="appears twice"):
        loads_untrusted(b'{"type":"ack","type":"close"}')


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(UntrustedJsonError, match="not UTF-8"):
        loads_untrusted(b'{"a":"\xff"}')


def test_oversize_is_refused_before_any_scan() -> None:
    with pytest.raises(UntrustedJsonError, match="size limit"):
        loads_untrusted(b" " * 100, JsonLimits(max_bytes=99))


# -- fuzz: short here, long in `make soak` --------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(INT64_MIN, INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
hostile_bytes = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b"1", b"9" * 25,
                              b"-", b"e999", b"NaN", b'"a"', b"\xff", b"null", b" "]),
             max_size=300).map(b"".join),
)


def _round_trips(value) -> None:
    assert loads_untrusted(json.dumps(value).encode(), JsonLimits(max_bytes=1 << 20)) == value


def _refuses_cleanly(payload: bytes) -> None:
    with contextlib.suppress(UntrustedJsonError):
        loads_untrusted(payload)
    for kind in MessageKind:
        with contextlib.suppress(ProtocolError):
            decode(kind, payload)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_fuzz_what_json_writes_within_the_limits_reads_back_the_same(value) -> None:
    _round_trips(value)


@settings(max_examples=300, deadline=None)
@given(hostile_bytes)
def test_fuzz_hostile_bytes_give_the_decoders_error_and_nothing_else(payload: bytes) -> None:
    _refuses_cleanly(payload)


@pytest.mark.slow
@settings(max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_soak_round_trip(value) -> None:
    _round_trips(value)


@pytest.mark.slow
@settings(max_examples=50000, deadline=None)
@given(hostile_bytes)
def test_soak_hostile_bytes(payload: bytes) -> None:
    _refuses_cleanly(payload)
