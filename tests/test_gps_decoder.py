"""NmeaDecoder: bytes in, trusted fixes out; bad input is counted, never raised."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime

import pytest

from firmware.gps.nmea import GARBAGE_REASONS, NmeaDecoder


def nmea(body: str) -> bytes:
    """A sentence with a correct checksum and CRLF."""
    checksum = 0
    for ch in body.encode():
        checksum ^= ch
    return f"${body}*{checksum:02X}\r\n".encode()


RMC = nmea("GPRMC,144501.00,A,5222.19864,N,00453.40235,E,10.000,31.40,231126,,,A")
GGA = nmea("GPGGA,144501.00,5222.19864,N,00453.40235,E,1,09,0.9,50.9,M,47.0,M,,")
GSA = nmea("GPGSA,A,3,02,06,09,13,18,19,23,28,30,,,,1.50,0.90,1.20")
LAT, LON = 52 + 22.19864 / 60, 4 + 53.40235 / 60


def test_rmc_alone_gives_a_dated_2d_fix():
    [fix] = NmeaDecoder().feed(RMC, now=5.0)
    assert fix.time == datetime(2026, 11, 23, 14, 45, 1, tzinfo=UTC)
    assert fix.lat == pytest.approx(LAT, abs=1e-9)
    assert fix.lon == pytest.approx(LON, abs=1e-9)
    assert fix.speed_mps == pytest.approx(10.0 * 1852 / 3600)
    assert fix.course_deg == 31.4
    assert fix.mode == 2
    assert fix.alt_m is None
    assert fix.received_at == 5.0


def test_later_sentences_of_the_epoch_update_the_fix_without_making_it_younger():
    dec = NmeaDecoder()
    [first] = dec.feed(RMC, now=1.0)
    [updated] = dec.feed(GGA, now=1.2)
    assert updated.time == first.time
    assert (updated.alt_m, updated.quality, updated.satellites, updated.hdop) == (50.9, 1, 9, 0.9)
    assert updated.mode == 3
    assert updated.speed_mps == first.speed_mps  # carried within the epoch
    assert updated.received_at == 1.0
    assert updated.age(now=3.0) == pytest.approx(2.0)


def test_a_sentence_that_adds_nothing_emits_nothing():
    dec = NmeaDecoder()
    dec.feed(RMC + GGA, now=1.0)
    assert dec.feed(GSA, now=1.1) == []


def test_gga_before_any_date_gives_an_undated_fix_until_rmc_dates_it():
    dec = NmeaDecoder()
    [undated] = dec.feed(GGA, now=1.0)
    assert undated.time is None
    [dated] = dec.feed(RMC, now=1.1)
    assert dated.time == datetime(2026, 11, 23, 14, 45, 1, tzinfo=UTC)


def test_next_epoch_without_date_sentence_carries_the_date_across_midnight():
    dec = NmeaDecoder()
    dec.feed(nmea("GPRMC,235959.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A"), now=1.0)
    [fix] = dec.feed(nmea("GPGGA,000000.00,5222.19864,N,00453.40235,E,1,09,0.9,50.9,M,,M,,"),
                     now=2.0)
    assert fix.time == datetime(2026, 11, 24, 0, 0, 0, tzinfo=UTC)


def test_zda_supplies_the_date():
    dec = NmeaDecoder()
    dec.feed(GGA, now=1.0)
    [fix] = dec.feed(nmea("GPZDA,144501.00,23,11,2026,00,00"), now=1.1)
    assert fix.time == datetime(2026, 11, 23, 14, 45, 1, tzinfo=UTC)


@pytest.mark.parametrize("split", [1, 2, 7, 30, 63, 64, 65])
def test_a_line_split_at_any_byte_decodes_the_same(split: int):
    data = RMC + GGA
    dec = NmeaDecoder()
    fixes = dec.feed(data[:split], now=1.0) + dec.feed(data[split:], now=1.0)
    assert fixes == NmeaDecoder().feed(data, now=1.0)


def test_byte_by_byte_feeding_decodes_the_same():
    data = RMC + GGA + GSA
    dec = NmeaDecoder()
    fixes = [f for i in range(len(data)) for f in dec.feed(data[i : i + 1], now=1.0)]
    assert fixes == NmeaDecoder().feed(data, now=1.0)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r", b"\n\r", b"\r\r\n"])
def test_any_line_end_is_accepted(eol: bytes):
    fixes = NmeaDecoder().feed(RMC.rstrip() + eol, now=1.0)
    assert len(fixes) == 1


def test_a_line_is_held_back_until_its_end_arrives():
    dec = NmeaDecoder()
    assert dec.feed(RMC.rstrip(), now=1.0) == []
    assert len(dec.feed(b"\n", now=1.1)) == 1


def test_missing_checksum_is_rejected():
    dec = NmeaDecoder()
    no_checksum = RMC.rstrip()[: RMC.index(b"*")] + b"\r\n"
    assert dec.feed(no_checksum, now=1.0) == []
    assert dec.counters["no_checksum"] == 1


def test_truncated_line_is_rejected():
    dec = NmeaDecoder()
    assert dec.feed(b"$GPRMC,000346.03,A,4808\r\n", now=1.0) == []
    assert dec.counters["no_checksum"] == 1


def test_wrong_checksum_is_rejected():
    dec = NmeaDecoder()
    bad = RMC.replace(b"5222.19864", b"5222.19865")
    assert dec.feed(bad, now=1.0) == []
    assert dec.counters["checksum"] == 1


def test_one_digit_checksum_is_rejected():
    dec = NmeaDecoder()
    line = RMC.rstrip()[:-1] + b"\r\n"
    assert dec.feed(line, now=1.0) == []
    assert dec.counters["checksum"] == 1


def test_void_rmc_gives_no_position_even_with_coordinates():
    dec = NmeaDecoder()
    void = nmea("GPRMC,235948.00,V,8960.0000,N,36000.0000,E,,,161206,,,N")
    assert dec.feed(void, now=1.0) == []
    assert dec.counters["void_fix"] == 1


def test_void_rmc_does_not_set_the_date():
    dec = NmeaDecoder()
    dec.feed(nmea("GPRMC,144500.00,V,,,,,,,161206,,,N"), now=1.0)
    [fix] = dec.feed(GGA, now=2.0)
    assert fix.time is None


def test_quality_zero_gga_gives_no_fix():
    dec = NmeaDecoder()
    void = nmea("GPGGA,081434.590,5212.978993,N,00653.097906,E,0,3,,102.907,M,47.093,M,,")
    assert dec.feed(void, now=1.0) == []
    assert dec.counters["void_fix"] == 1


def test_gga_with_empty_quality_gives_no_fix():
    void = nmea("GPGGA,105025.80,5612.9999,N,00306.7096,W,,2,60.000,160.002,M,,M,,")
    assert NmeaDecoder().feed(void, now=1.0) == []


@pytest.mark.parametrize("quality", ["7", "8"])
def test_manual_or_simulated_gga_gives_no_fix(quality: str):
    line = nmea(f"GPGGA,125106,3854.5087,N,07726.4523,W,{quality},10,2.0,268.8,M,-33.9,M,,")
    assert NmeaDecoder().feed(line, now=1.0) == []


def test_gll_status_v_gives_no_fix_and_status_a_does():
    dec = NmeaDecoder()
    assert dec.feed(nmea("GPGLL,4808.9993,N,01135.0798,E,000343.03,V,N"), now=1.0) == []
    [fix] = dec.feed(nmea("GPGLL,4808.9993,N,01135.0798,E,000344.03,A,A"), now=2.0)
    assert fix.lat == pytest.approx(48 + 8.9993 / 60)


def test_gns_with_all_modes_n_gives_no_fix():
    dec = NmeaDecoder()
    assert dec.feed(nmea("GNGNS,074150.799,,,,,NNNN,00,,,0.0,,0000"), now=1.0) == []
    [fix] = dec.feed(
        nmea("GNGNS,074155.799,3114.8770,N,12135.2463,E,ANNA,05,1.3,156.9,8.3,,0000"), now=2.0
    )
    assert (fix.alt_m, fix.satellites, fix.hdop, fix.mode) == (156.9, 5, 1.3, 3)


def test_valid_status_with_empty_coordinates_is_not_a_fix_at_zero_zero():
    dec = NmeaDecoder()
    assert dec.feed(nmea("GPRMC,144501.00,A,,,,,0.0,,231126,,,A"), now=1.0) == []
    assert dec.counters["parse_error"] == 1


def test_garbage_is_counted_not_raised():
    dec = NmeaDecoder()
    junk = (
        b"# comment line\r\n"
        b"!AIVDM,1,1,,A,13aEOK?P00PD2wVMdLDRhgvL289?,0*26\r\n"
        b"$GPGGA,235952.00,0000.0000,N,00000.0000,E,0,00,0.0,,M,,M,,*00.0000,N,0,,*51\r\n"
        b"$PSRFEPE,074150.799,V,,,,,*23\r\n"
        b"$GPXYZ,1,2,3*4A\r\n"
        b"$GPGSV,3,3,12,2,40,16,00,090,*72\r\n"
        b"$GPRMC,1445,A,52XX.1,N,004,E,,,231126,,,A*00\r\n"
    )
    assert dec.feed(junk, now=1.0) == []
    assert sum(dec.counters.values()) == 7
    assert dec.counters["not_nmea"] == 1
    assert dec.counters["unsupported"] >= 2


def test_junk_before_dollar_and_spliced_sentences_are_separated():
    dec = NmeaDecoder()
    fixes = dec.feed(b"\x00\x17garbage" + RMC.rstrip() + GGA, now=1.0)
    assert [f.alt_m for f in fixes] == [None, 50.9]


def test_bytes_that_are_not_ascii_are_dropped_without_error():
    dec = NmeaDecoder()
    noisy = RMC[:20] + b"\xb5\xff\xc3\xa9" + RMC[20:]
    assert dec.feed(noisy + b"\xb5b\x01\x07\x5c\x00\xff\xfe\r\n", now=1.0) == []
    assert dec.counters["not_nmea"] >= 1
    assert len(dec.feed(GGA, now=2.0)) == 1  # still decoding afterwards


def test_an_endless_line_is_dropped_and_memory_stays_bounded():
    dec = NmeaDecoder()
    for _ in range(100):
        dec.feed(b"$GPGSV" + b"A" * 1000, now=1.0)
    assert dec.counters["overlong"] >= 1
    assert len(dec.feed(b"\r\n" + RMC, now=1.0)) == 1


def test_random_bytes_never_raise():
    rng = random.Random(42)
    dec = NmeaDecoder()
    alphabet = b"$!*,.\r\nGPRMCGGA0123456789ABCDEFNSEW\x00\xff"
    for _ in range(300):
        chunk = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        dec.feed(chunk, now=1.0)
    # and it still works afterwards
    assert len(dec.feed(b"\r\n" + RMC, now=2.0)) == 1


def test_week_rollover_date_is_moved_forward_by_1024_weeks():
    dec = NmeaDecoder()  # default floor 2025-01-01
    # 2026-11-23 reported by a receiver whose 10-bit week window has passed: 2007-04-09
    [fix] = dec.feed(nmea("GPRMC,144501.00,A,5222.19864,N,00453.40235,E,0.0,,090407,,,A"), now=1)
    assert fix.time == datetime(2026, 11, 23, 14, 45, 1, tzinfo=UTC)


def test_week_rollover_of_2019_with_a_floor_before_it():
    dec = NmeaDecoder(date_floor=date(2019, 1, 1))
    # gp-320fw log: after the April 2019 rollover the receiver said 1999-08-22
    [fix] = dec.feed(nmea("GPRMC,000425.00,A,4808.9993,N,01135.0798,E,0.0,,220899,,,A"), now=1)
    assert fix.time is not None and fix.time.date() == date(2019, 4, 7)


def test_no_floor_keeps_dates_as_sent():
    dec = NmeaDecoder(date_floor=None)
    [fix] = dec.feed(nmea("GPRMC,000425.00,A,4808.9993,N,01135.0798,E,0.0,,220899,,,A"), now=1)
    assert fix.time is not None and fix.time.date() == date(1999, 8, 22)


# ---- framing: a started sentence is never lost to what came before it (issue 12.4) ----------

#: Binary noise as a receiver's UBX/SiRF binary output puts on the line: any byte but a line end.
NOISE = bytes(b for b in range(256) if b not in (0x0A, 0x0D))


def binary_burst(rng: random.Random, size: int) -> bytes:
    return bytes(rng.choice(NOISE) for _ in range(size))


def sentences_after_bursts() -> tuple[bytes, list[bytes]]:
    """(stream, its sentences): each second's RMC and GGA after a 300..700 byte binary burst."""
    rng = random.Random(7)
    stream, clean = b"", []
    for second in range(10):
        rmc = nmea(f"GPRMC,1445{second:02d}.00,A,5222.19864,N,00453.40235,E,10.0,31.4,231126,,,A")
        gga = nmea(f"GPGGA,1445{second:02d}.00,5222.19864,N,00453.40235,E,1,09,0.9,50.9,M,,M,,")
        stream += binary_burst(rng, rng.randint(300, 700)) + rmc + gga
        clean += [rmc, gga]
    return stream, clean


def feed_in_pieces(data: bytes, size: int) -> list:
    dec = NmeaDecoder()
    return [f for i in range(0, len(data), size) for f in dec.feed(data[i : i + size], now=1.0)]


@pytest.mark.parametrize("size", [1, 16, 64, 10**6])
def test_binary_bursts_before_sentences_lose_no_fix_whatever_the_read_size(size: int):
    stream, clean = sentences_after_bursts()
    expected = NmeaDecoder().feed(b"".join(clean), now=1.0)
    assert len(expected) == 20
    assert feed_in_pieces(stream, size) == expected


def test_a_started_sentence_survives_garbage_that_overflows_the_held_back_buffer():
    dec = NmeaDecoder()
    assert dec.feed(b"\xb5b" * 240 + RMC[:40], now=1.0) == []  # 520 bytes without a line end
    assert len(dec.feed(RMC[40:], now=1.1)) == 1


def test_a_doubled_dollar_is_tolerated_not_counted_as_garbage():
    dec = NmeaDecoder()
    assert len(dec.feed(b"$" + RMC, now=1.0)) == 1
    assert not set(dec.counters) & GARBAGE_REASONS


def test_the_empty_zda_of_a_receiver_without_time_is_no_time_not_garbage():
    dec = NmeaDecoder()
    assert dec.feed(nmea("GPZDA,,,,,,"), now=1.0) == []
    assert dec.counters == {"no_time": 1}


# ---- a sentence without a time of day does not join or date an epoch (issue 12.4) -------------


def test_a_position_sentence_without_time_does_not_join_the_open_epoch():
    dec = NmeaDecoder()
    dec.feed(RMC, now=1.0)
    elsewhere = nmea("GPGGA,,4808.9993,N,01135.0798,E,1,09,0.9,50.9,M,,M,,")
    assert dec.feed(elsewhere, now=1.5) == []
    assert dec.counters["no_time"] == 1


def test_an_rmc_without_time_does_not_date_the_open_epoch():
    dec = NmeaDecoder()
    dec.feed(GGA, now=1.0)
    timeless = nmea("GPRMC,,A,5222.19864,N,00453.40235,E,10.000,31.40,231126,,,A")
    assert dec.feed(timeless, now=1.5) == []
    assert dec.counters["no_time"] == 1


def test_the_first_position_sentence_without_time_gives_no_undated_fix():
    dec = NmeaDecoder()
    assert dec.feed(nmea("GPGLL,4808.9993,N,01135.0798,E,,A,A"), now=1.0) == []
    assert dec.counters["no_time"] == 1


# ---- implausible values with a valid checksum are rejected (issue 12.4) ------------------------


def test_a_zda_for_year_9999_is_rejected_and_fixes_continue_past_midnight():
    dec = NmeaDecoder()
    dec.feed(nmea("GPZDA,235959.00,31,12,9999,00,00"), now=1.0)
    [fix] = dec.feed(nmea("GPGGA,000001.00,5222.19864,N,00453.40235,E,1,09,0.9,50.9,M,,M,,"),
                     now=2.0)
    assert fix.time is None  # the implausible date was not taken
    assert dec.counters["implausible"] == 1


IMPLAUSIBLE = {
    "course 1e299": "GPRMC,144501.00,A,5222.19864,N,00453.40235,E,10.0,1e299,231126,,,A",
    "course 361": "GPRMC,144501.00,A,5222.19864,N,00453.40235,E,10.0,361.0,231126,,,A",
    "negative speed": "GPRMC,144501.00,A,5222.19864,N,00453.40235,E,-0.1,31.4,231126,,,A",
    "speed 2000 knots": "GPRMC,144501.00,A,5222.19864,N,00453.40235,E,2000,31.4,231126,,,A",
    "year 1975": "GPRMC,144501.00,A,5222.19864,N,00453.40235,E,10.0,31.4,231175,,,A",
    "minutes 60": "GPRMC,144501.00,A,5260.00000,N,00453.40235,E,10.0,31.4,231126,,,A",
    "latitude 91": "GPRMC,144501.00,A,9100.00000,N,00453.40235,E,10.0,31.4,231126,,,A",
    "hour 24": "GPRMC,244501.00,A,5222.19864,N,00453.40235,E,10.0,31.4,231126,,,A",
    "quality 310299": "GPGGA,144501.00,5222.19864,N,00453.40235,E,310299,09,0.9,50.9,M,,M,,",
    "negative hdop": "GPGGA,144501.00,5222.19864,N,00453.40235,E,1,09,-1.0,50.9,M,,M,,",
    "hdop 1e6": "GPGGA,144501.00,5222.19864,N,00453.40235,E,1,09,1e6,50.9,M,,M,,",
    "10^40 satellites": "GPGGA,144501.00,5222.19864,N,00453.40235,E,1," + "1" + "0" * 40
                        + ",0.9,50.9,M,,M,,",
    "altitude 1e299": "GPGGA,144501.00,5222.19864,N,00453.40235,E,1,09,0.9,1e299,M,,M,,",
    "gns satellites 1000": "GNGNS,144501.00,5222.19864,N,00453.40235,E,AA,1000,0.9,50.9,,,",
}


@pytest.mark.parametrize("body", IMPLAUSIBLE.values(), ids=IMPLAUSIBLE.keys())
def test_an_implausible_value_rejects_the_sentence_and_decoding_goes_on(body: str):
    dec = NmeaDecoder()
    assert dec.feed(nmea(body), now=1.0) == []
    assert dec.counters["implausible"] == 1
    assert len(dec.feed(RMC, now=2.0)) == 1


@pytest.mark.parametrize("body", [
    "GPVTG,31.4,T,,M,-5.0,N,-9.3,K,A",  # negative speed
    "GPVTG,400.0,T,,M,5.0,N,9.3,K,A",  # course beyond 360
    "GPGSA,A,3,02,06,09,13,,,,,,,,,1.50,-0.90,1.20",  # negative HDOP
], ids=["vtg speed", "vtg course", "gsa hdop"])
def test_an_implausible_sentence_without_time_leaves_the_epoch_as_it_was(body: str):
    dec = NmeaDecoder()
    dec.feed(RMC, now=1.0)
    assert dec.feed(nmea(body), now=1.1) == []
    assert dec.counters["implausible"] == 1


def test_a_zda_with_an_impossible_day_is_implausible():
    dec = NmeaDecoder()
    assert dec.feed(nmea("GPZDA,144501.00,31,02,2026,00,00"), now=1.0) == []
    assert dec.counters["implausible"] == 1
