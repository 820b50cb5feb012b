"""The upload's pure parts: order, backoff, Retry-After, progress bar, settings, tus answers."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from firmware.uplink.tus import (
    NotTus,
    OffsetMismatch,
    RetryLater,
    SegmentRefused,
    Unauthorized,
    UploadGone,
    decode_receipt,
    encode_metadata,
    error_from_response,
)
from firmware.uplink.upload_plan import (
    Backoff,
    Candidate,
    Progress,
    order,
    parse_retry_after,
    render_bar,
)
from firmware.uplink.upload_settings import UploadSettings
from protocol.configfile import ConfigError

NOW = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)


# -- order -----------------------------------------------------------------------------------
def test_evidence_and_sos_segments_go_first_then_the_rest_oldest_first() -> None:
    candidates = [Candidate(5, 10), Candidate(2, 10), Candidate(7, 10, evidence=True),
                  Candidate(3, 10, sos=True), Candidate(1, 10), Candidate(4, 10, evidence=True)]
    assert [c.seq for c in order(candidates)] == [3, 4, 7, 1, 2, 5]


def test_order_of_nothing_is_nothing() -> None:
    assert order([]) == []


# -- backoff ---------------------------------------------------------------------------------
def test_backoff_doubles_from_the_base_without_jitter() -> None:
    backoff = Backoff(base_s=1.0, factor=2.0, max_s=300.0, jitter=0.0)
    assert [backoff.delay(a, rand=0.9) for a in range(5)] == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_backoff_is_capped() -> None:
    backoff = Backoff(base_s=1.0, max_s=60.0, jitter=0.0)
    assert backoff.delay(10, rand=0.0) == 60.0
    assert backoff.delay(10_000, rand=0.0) == 60.0


def test_jitter_takes_off_at_most_its_share() -> None:
    backoff = Backoff(base_s=10.0, max_s=300.0, jitter=0.5)
    assert backoff.delay(0, rand=0.0) == 10.0
    assert backoff.delay(0, rand=0.5) == 7.5
    assert backoff.delay(0, rand=0.999999) == pytest.approx(5.0, abs=1e-4)


def test_retry_after_is_a_floor_even_above_the_cap() -> None:
    backoff = Backoff(base_s=1.0, max_s=30.0, jitter=0.5)
    assert backoff.delay(0, rand=0.0, retry_after_s=7.0) == 7.0
    assert backoff.delay(0, rand=0.0, retry_after_s=120.0) == 120.0


def test_retry_after_below_the_exponential_delay_does_not_shorten_it() -> None:
    backoff = Backoff(base_s=1.0, max_s=300.0, jitter=0.0)
    assert backoff.delay(4, rand=0.0, retry_after_s=2.0) == 16.0


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(base_s=0)
    with pytest.raises(ValueError):
        Backoff(jitter=1.5)


# -- Retry-After -----------------------------------------------------------------------------
def test_retry_after_in_seconds() -> None:
    assert parse_retry_after("17") == 17.0
    assert parse_retry_after(" 3 ") == 3.0


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    assert parse_retry_after("Wed, 01 May 2024 10:00:30 GMT", NOW) == 30.0


def test_retry_after_in_the_past_means_now() -> None:
    assert parse_retry_after("Wed, 01 May 2024 09:00:00 GMT", NOW) == 0.0


@pytest.mark.parametrize("value", ["-5", "1.5", "inf", "1e400", "nan", "\u00b2", "\u0663"])
def test_retry_after_that_is_not_ascii_delta_seconds_is_unreadable(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


def test_a_huge_retry_after_is_capped_at_a_day() -> None:
    assert parse_retry_after("999999999") == 86_400.0


def test_unreadable_or_missing_retry_after_is_none() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("Wed, 01 May 2024 10:00:30 GMT") is None  # a date needs a now


# -- progress --------------------------------------------------------------------------------
def test_progress_counts_segments_and_bytes() -> None:
    progress = Progress.start([Candidate(1, 600), Candidate(2, 400)])
    assert (progress.segments_total, progress.bytes_total) == (2, 1000)
    progress = progress.at(1, base=0, offset=300)
    assert (progress.bytes_done, progress.segments_done, progress.current_seq) == (300, 0, 1)
    progress = progress.finished(1, base=0, size=600)
    progress = progress.at(2, base=600, offset=100)
    assert (progress.bytes_done, progress.segments_done) == (700, 1)
    assert progress.fraction == 0.7


def test_progress_bar_text() -> None:
    progress = Progress(segments_total=4, bytes_total=8_000_000, segments_done=1,
                        bytes_done=2_000_000, current_seq=12)
    assert render_bar(progress, width=20) == (
        "[#####...............]  25%  1/4 segments  2.0/8.0 MB  (segment 000012)")


def test_progress_bar_of_an_empty_pass_is_full() -> None:
    assert render_bar(Progress(0, 0), width=4) == "[####] 100%  0/0 segments  0.0/0.0 MB"


# -- settings --------------------------------------------------------------------------------
def test_settings_defaults() -> None:
    settings = UploadSettings.from_dict({"url": "https://ingest.example:8443/"})
    assert settings.url == "https://ingest.example:8443"
    assert settings.files_url == "https://ingest.example:8443/files/"
    assert settings.chunk_bytes == 16 << 20  # one request for a 10 s 1080p segment
    assert settings.station is None and settings.dock_pin is None


def test_station_port_defaults_to_the_url_port() -> None:
    settings = UploadSettings.from_dict({"url": "https://ingest.example:8443",
                                         "station_host": "10.0.0.5"})
    assert settings.station == ("10.0.0.5", 8443)


@pytest.mark.parametrize(("section", "key"), [
    ({}, "upload.url"),
    ({"url": "http://ingest.example"}, "upload.url"),
    ({"url": "https://x", "chunk_bytes": 10}, "upload.chunk_bytes"),
    ({"url": "https://x", "chunk_bytes": "1M"}, "upload.chunk_bytes"),
    ({"url": "https://x", "dock_pin": True}, "upload.dock_pin"),
    ({"url": "https://x", "dock_active_high": "yes"}, "upload.dock_active_high"),
    ({"url": "https://x", "station_port": 8443}, "upload.station_port"),
    ({"url": "https://x", "station_host": "h", "station_port": 70000}, "upload.station_port"),
    ({"url": "https://x", "check_interval_s": 0}, "upload.check_interval_s"),
    ({"url": "https://x", "max_backoff_s": "long"}, "upload.max_backoff_s"),
    ({"url": "https://x", "chunk_size": 4096}, "upload.chunk_size"),
])
def test_a_bad_setting_names_its_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        UploadSettings.from_dict(section)


# -- tus answers -----------------------------------------------------------------------------
def _json(**body: object) -> bytes:
    return json.dumps(body).encode()


def test_a_503_with_retry_after_is_retry_later() -> None:
    error = error_from_response(503, {"Retry-After": "12"}, _json(error="busy", retry=True))
    assert isinstance(error, RetryLater)
    assert (error.after_s, error.reason, error.status) == (12.0, "busy", 503)


def test_a_507_is_retry_later_even_without_a_body() -> None:
    error = error_from_response(507, {"Retry-After": "60"}, b"")
    assert isinstance(error, RetryLater) and error.after_s == 60.0


def test_a_422_is_a_refusal_with_the_servers_reason() -> None:
    error = error_from_response(422, {}, _json(error="ciphertext hash mismatch", retry=False))
    assert type(error) is SegmentRefused and error.reason == "ciphertext hash mismatch"


def test_the_bodys_retry_flag_overrides_the_status() -> None:
    assert isinstance(error_from_response(400, {}, _json(error="later", retry=True)), RetryLater)
    assert type(error_from_response(500, {}, _json(error="never", retry=False))) is SegmentRefused


def test_special_statuses() -> None:
    assert isinstance(error_from_response(409, {}, b""), OffsetMismatch)
    assert isinstance(error_from_response(404, {}, b""), UploadGone)
    assert isinstance(error_from_response(410, {}, b""), UploadGone)
    assert isinstance(error_from_response(403, {}, _json(error="revoked", retry=False)),
                      Unauthorized)
    assert isinstance(error_from_response(302, {}, b""), NotTus)


def test_metadata_is_base64_pairs_in_order() -> None:
    assert encode_metadata({"device_id": b"tok-001", "seq": "12"}) == \
        f"device_id {base64.b64encode(b'tok-001').decode()},seq MTI="
    with pytest.raises(ValueError):
        encode_metadata({"bad key": b""})


def test_a_receipt_header_is_base64_json() -> None:
    receipt = {"v": 1, "seq": 3}
    assert decode_receipt(base64.b64encode(json.dumps(receipt).encode()).decode()) == receipt
    with pytest.raises(NotTus):
        decode_receipt("not base64!")
