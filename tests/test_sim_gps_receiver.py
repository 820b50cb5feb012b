"""Simulated GPS receiver: valid NMEA along a route, dropouts, paced output on a pty."""

from __future__ import annotations

import itertools
import math
import threading
import time
from datetime import UTC, datetime, timedelta

import pynmea2
import pytest

from firmware.gps.fix import Fix
from firmware.gps.nmea import NmeaDecoder
from firmware.gps.position import PositionProvider
from firmware.gps.reader import GpsReader
from simulator.gps_receiver import PtyGps, RouteReceiver

ROUTE = [(52.3700, 4.8900), (52.3750, 4.9000), (52.3800, 4.9000)]
START = datetime(2026, 11, 23, 14, 45, 0, tzinfo=UTC)


def make(**kw) -> RouteReceiver:
    args = dict(speed_mps=12.0, start_utc=START, seed=7, noise_m=3.0)
    args.update(kw)
    return RouteReceiver(ROUTE, **args)


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    dy = (lat2 - lat1) * 111_320.0
    dx = (lon2 - lon1) * 111_320.0 * math.cos(math.radians(lat1))
    return math.hypot(dx, dy)


def decode(rx: RouteReceiver, seconds: range) -> dict[int, Fix]:
    """Last fix per epoch, fed with the epoch number as the clock."""
    dec = NmeaDecoder()
    out: dict[int, Fix] = {}
    for t in seconds:
        for fix in dec.feed("".join(rx.sentences_at(t)).encode(), now=float(t)):
            out[t] = fix
    assert sum(dec.counters.values()) == dec.counters["void_fix"]
    return out


def test_every_sentence_passes_pynmea2_checksum_check():
    rx = make(dropouts=[(10, 12)])
    for t in range(0, 30):
        sentences = rx.sentences_at(t)
        assert [s[3:6] for s in sentences] == ["RMC", "GGA", "GSA"]
        for s in sentences:
            assert s.startswith("$GP") and s.endswith("\r\n")
            pynmea2.parse(s.strip(), check=True)


def test_decoded_positions_follow_the_route_within_the_noise():
    rx = make()
    fixes = decode(rx, range(0, 120))
    assert len(fixes) == 120
    for t, fix in fixes.items():
        lat, lon, _, _ = rx.true_position(t)
        assert distance_m(lat, lon, fix.lat, fix.lon) < 5 * 3.0  # 5 sigma
        assert fix.time == START + timedelta(seconds=t)
        assert fix.quality == 1 and fix.mode == 3


def test_speed_and_course_match_the_leg():
    rx = make(noise_m=0.0)
    fix = decode(rx, range(0, 5))[4]
    assert fix.speed_mps == pytest.approx(12.0, abs=0.5)
    assert fix.course_deg == pytest.approx(50.7, abs=1.0)  # first leg, to the north-east


def test_the_receiver_stops_at_the_end_of_the_route():
    rx = make(noise_m=0.0)
    end = math.ceil(rx.length_m / rx.speed_mps) + 5
    lat, lon, speed, _ = rx.true_position(end)
    assert (lat, lon, speed) == (52.38, 4.90, 0.0)
    fix = decode(rx, range(end, end + 1))[end]
    assert distance_m(52.38, 4.90, fix.lat, fix.lon) < 1.0
    assert fix.speed_mps is not None and fix.speed_mps < 0.2


def test_noise_is_seeded_and_repeatable():
    assert make(seed=1).sentences_at(5) == make(seed=1).sentences_at(5)
    assert make(seed=1).sentences_at(5) != make(seed=2).sentences_at(5)


def test_satellites_and_hdop_are_realistic_and_vary():
    fixes = decode(make(), range(0, 200))
    sats = {f.satellites for f in fixes.values()}
    hdops = {f.hdop for f in fixes.values()}
    assert min(sats) >= 4 and max(sats) <= 12 and len(sats) >= 3
    assert min(hdops) >= 0.5 and max(hdops) <= 2.5 and len(hdops) >= 3


def test_a_dropout_sends_no_fix_sentences():
    rmc, gga, gsa = make(dropouts=[(10, 20)]).sentences_at(15)
    assert pynmea2.parse(rmc.strip(), check=True).status == "V"
    parsed_gga = pynmea2.parse(gga.strip(), check=True)
    assert parsed_gga.gps_qual == 0 and parsed_gga.lat == "" and parsed_gga.lon == ""
    assert pynmea2.parse(gsa.strip(), check=True).mode_fix_type == "1"


def test_a_dropout_gives_no_live_fix():
    rx = make(dropouts=[(10, 20)])
    dec = NmeaDecoder()
    clock = [0.0]
    latest: list[Fix | None] = [None]
    position = PositionProvider(lambda: latest[0], clock=lambda: clock[0], live_max_age_s=3.0)
    sources = {}
    for t in range(0, 25):
        clock[0] = float(t)
        for fix in dec.feed("".join(rx.sentences_at(t)).encode(), now=float(t)):
            latest[0] = fix
        sources[t] = position.current()["source"]
    assert sources[9] == "live"
    assert [sources[t] for t in (10, 11)] == ["live"] * 2  # the t=9 fix is still < 3 s old
    assert all(sources[t] == "last_known" for t in range(12, 20))
    assert sources[20] == "live"
    assert dec.counters["void_fix"] == 20  # RMC and GGA of 10 epochs


def test_drift_stretches_the_wall_interval():
    gps = PtyGps(make(), speed=4.0, drift_ppm=50.0)
    try:
        assert gps.interval_s == pytest.approx(0.25 * (1 + 50e-6))
    finally:
        gps.stop()


def test_pty_output_is_one_epoch_per_gps_second_paced_by_speed():
    fixes: list[Fix] = []
    done = threading.Event()

    def on_fix(fix: Fix) -> None:
        fixes.append(fix)
        if len({f.time for f in fixes if f.time is not None}) >= 6:
            done.set()

    epochs_at: list[float] = []  # writer side: a starved reader may read epochs in a batch
    gps = PtyGps(make(), speed=10.0, on_epoch=lambda n: epochs_at.append(time.monotonic()))
    reader = GpsReader(gps.port, on_fix=on_fix)
    reader.start()
    try:
        assert reader.connected.wait(5.0)
        gps.start()
        assert done.wait(5.0)
    finally:
        reader.stop()
        gps.stop()
    firsts: dict[datetime, Fix] = {}
    for f in fixes:
        if f.time is not None:
            firsts.setdefault(f.time, f)
    times = sorted(firsts)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(times))
    written = epochs_at[-1] - epochs_at[0]
    assert written >= 0.09 * (len(epochs_at) - 1)  # paced, not dumped at once
