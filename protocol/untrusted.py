"""The one decoder for JSON that came from outside: limits checked before any work is done.

Every payload a device, a broker, a client or a file on a card hands us goes through
`loads_untrusted` (messages, commands, manifests, receipts, live headers, audit lines). Python's
`json.loads` alone is not safe for that: a few KiB of nested brackets raise `RecursionError`
(not `JSONDecodeError`), an integer of thousands of digits costs quadratic time or raises
`ValueError`, `NaN` and `1e999` come back as floats no store can keep, and a repeated key
silently keeps the last value, so two readers of one signed message can disagree on it.

Limits (`JsonLimits`), all checked in C-speed passes before the parser runs, or by the parser's
hooks as it goes:

- `max_bytes`: the payload's size;
- `max_depth`: nesting of arrays and objects (brackets inside strings do not count);
- integers must lie in the signed 64-bit range, the range SQLite and every other JSON reader we
  care about keep exactly; floats must be finite;
- object keys must be unique.

Anything outside them raises `UntrustedJsonError`, a `ValueError` whose text says what, in one
line; nothing else escapes (not `RecursionError`, `UnicodeDecodeError` nor `MemoryError` from a
payload under the size limit).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_MAX_INT_DIGITS = 20  # len("-9223372036854775808"); longer text is refused before int() runs

# Strings (with their escapes) are skipped when counting brackets, so "[[[" inside a string is text.
# Possessive, and an unterminated string runs to the end: a backtracking pattern retried at every
# later quote made `"\"\"\"...` quadratic (16 KiB took a second, 1 MiB hours).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


class UntrustedJsonError(ValueError):
    """JSON refused by the untrusted decoder; the text says why in one line."""


@dataclass(frozen=True)
class JsonLimits:
    max_bytes: int = 16 * 1024
    max_depth: int = 16


MESSAGE_LIMITS = JsonLimits()  # MQTT messages: no legitimate one comes near 16 KiB
# A segment's manifest carries its GPS track: an hour of 1 Hz points is about 300 KiB.
MANIFEST_LIMITS = JsonLimits(max_bytes=1024 * 1024, max_depth=16)


def loads_untrusted(payload: bytes | str, limits: JsonLimits = MESSAGE_LIMITS) -> Any:
    """Parse `payload` within `limits`, or raise UntrustedJsonError."""
    data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if len(data) > limits.max_bytes:
        raise UntrustedJsonError(f"{len(data)} bytes is over the size limit of {limits.max_bytes}")
    depth = nesting_depth(data)
    if depth > limits.max_depth:
        raise UntrustedJsonError(f"nested {depth} deep, over the limit of {limits.max_depth}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedJsonError(f"not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_int=_int64, parse_float=_finite, parse_constant=_constant,
                          object_pairs_hook=_unique_keys)
    except UntrustedJsonError:
        raise
    except json.JSONDecodeError as exc:
        raise UntrustedJsonError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                                 ) from None
    except (ValueError, RecursionError, MemoryError) as exc:  # belt and braces: never escapes
        raise UntrustedJsonError(f"not usable JSON ({exc.__class__.__name__})") from None


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data`, brackets in strings not counted.

    An unterminated string runs to the end; the parser then refuses the payload anyway.
    Linear in the payload's size, whatever its shape.
    """
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _int64(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise UntrustedJsonError(f"integer of {len(text)} digits is outside the 64-bit range")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise UntrustedJsonError(f"integer {text} is outside the 64-bit range")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UntrustedJsonError(f"number {text[:24]} is not finite")
    return value


def _constant(name: str) -> float:
    raise UntrustedJsonError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise UntrustedJsonError(f"key {key[:40]!r} appears twice in one object")
        result[key] = value
    return result
