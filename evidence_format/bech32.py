"""Bech32 (BIP 173, not bech32m), as age writes its keys: `age1...` and `AGE-SECRET-KEY-1...`.

No 90-character limit (age's secret keys are longer). Encoding is for the centre, which makes
its evidence key without the `age` binary; decoding is for the device, which reads recipients.
"""

from __future__ import annotations

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_VALUES = {c: i for i, c in enumerate(CHARSET)}
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: list[int]) -> int:
    chk = 1
    for value in values:
        top = chk >> 25
        chk = ((chk & 0x1FFFFFF) << 5) ^ value
        for i, gen in enumerate(_GEN):
            if (top >> i) & 1:
                chk ^= gen
    return chk


def _expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def words(data: bytes) -> list[int]:
    """`data` regrouped from 8-bit bytes into 5-bit words, the last one zero-padded."""
    acc = bits = 0
    out: list[int] = []
    for byte in data:
        acc, bits = (acc << 8) | byte, bits + 8
        while bits >= 5:
            bits -= 5
            out.append((acc >> bits) & 31)
    if bits:
        out.append((acc << (5 - bits)) & 31)
    return out


def encode(hrp: str, data_words: list[int]) -> str:
    """Bech32 of 5-bit `data_words` with the lower-case prefix `hrp`."""
    polymod = _polymod(_expand(hrp) + data_words + [0] * 6) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[w] for w in data_words + checksum)


def decode(text: str, want_hrp: str, what: str) -> bytes:
    """The 8-bit payload of Bech32 `text`, whose prefix must be `want_hrp` (any one case);
    ValueError naming `what` and the problem otherwise."""
    if text != text.lower() and text != text.upper():
        raise ValueError(f"{what}: mixed upper and lower case")
    text = text.lower()
    sep = text.rfind("1")
    if sep < 1 or len(text) - sep - 1 < 6:
        raise ValueError(f"{what}: not Bech32 (no '1' separator followed by data)")
    hrp, data = text[:sep], text[sep + 1:]
    if hrp != want_hrp:
        raise ValueError(f"{what}: prefix (HRP) is {hrp!r}, expected {want_hrp!r}")
    try:
        values = [_VALUES[c] for c in data]
    except KeyError as exc:
        raise ValueError(f"{what}: invalid Bech32 character {exc.args[0]!r}") from None
    if _polymod(_expand(hrp) + values) != 1:
        raise ValueError(f"{what}: bad Bech32 checksum (typo or truncated key?)")
    acc = bits = 0
    out = bytearray()
    for word in values[:-6]:
        acc, bits = (acc << 5) | word, bits + 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    if bits >= 5 or (acc << (8 - bits)) & 0xFF:
        raise ValueError(f"{what}: bad Bech32 padding")
    return bytes(out)
