"""Signed webhooks (control_center/webhook.py) against a real HTTPS receiver on 127.0.0.1: the
signature checked, retries after a 503, exactly one alert per id across instances and crashes,
refusals not retried, and the body valid against webhook.schema.json.

Most tests drive the sender with `run_once(now)` on an injected clock: no sleeps decide
anything. One runs the sender's threads and waits on an Event the receiver sets."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from control_center import pki
from control_center.config import WebhookConfig
from control_center.store import AlertRecord
from control_center.webhook import (
    FAILING_WARNING_S,
    LEASE_S,
    MAX_RETRY_S,
    Answer,
    Decision,
    Escalation,
    WebhookOutbox,
    WebhookSender,
    WebhookTarget,
    alert_fields,
    body_bytes,
    body_problems,
    classify,
    decide,
    event_id,
    make_body,
    retry_delay,
    signature,
    signed_headers,
    urllib_post,
    verify_signature,
    webhook_schema,
)

HOST = "127.0.0.1"
SECRET = b"a-receivers-shared-secret-32-byt"
T0 = 1_741_944_420.0  # the injected clock's start (2025-03-14T09:27:00Z)
ALERT_ID = "3f9c2a7e5b1d4c8e9a0f6b2d7c1e4a58"
OTHER_ALERT_ID = "9d04be61c7a34f2e8b5a0c3d6e7f1a29"


class Clock:
    """The injected clock: moved by the test, read by the sender and by the receiver."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def record(alert_id: str = ALERT_ID, **changes: Any) -> AlertRecord:
    """A stored alert as the store returns it. Fields the store adds without a default are
    None here."""
    values: dict[str, Any] = {f.name: None for f in dataclasses.fields(AlertRecord)
                              if f.default is dataclasses.MISSING
                              and f.default_factory is dataclasses.MISSING}
    values.update(
        alert_id=alert_id, device_id="token-0042", device_kind="token", seq=318,
        trigger="button_hold", created_at="2025-03-14T09:26:53.512Z",
        position={"source": "live", "lat": 52.520008, "lon": 13.404954, "alt_m": 41.2,
                  "accuracy_m": 4.5, "fix_time": "2025-03-14T09:26:53.000Z", "age_s": 0.5},
        battery={"percent": 76, "charging": False}, stored_at=T0 - 6.4, status="open",
        device_offline=False, duplicates=0)
    values.update(changes)
    return AlertRecord(**values)


def alert(alert_id: str = ALERT_ID, desks: tuple[str, ...] = ("police-pavlodar",),
          **changes: Any) -> dict[str, Any]:
    return alert_fields(record(alert_id, **changes), desks=desks, rule="pavlodar-pillars")


# -- a real HTTPS receiver ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[pki.CertPair, pki.CertPair]:
    """A test CA and the receiver's certificate for 127.0.0.1, from the project's own PKI."""
    directory = tmp_path_factory.mktemp("webhook-tls")
    ca = pki.make_ca(directory / "ca", "webhook test CA")
    return ca, pki.issue_server_cert(ca, directory / "server", "receiver", [HOST])


class Receiver:
    """What a dispatch system does with our webhooks: check the signature (verify_signature,
    the check docs/PROTOCOL.md shows) and answer 401 if it fails, then answer the scripted
    statuses first and 200 after, keeping each notification once by its Idempotency-Key."""

    def __init__(self, tls: tuple[pki.CertPair, pki.CertPair], clock: Callable[[], float],
                 secret: bytes = SECRET) -> None:
        self.ca_file = tls[0].cert_file
        self.secret = secret
        self.clock = clock
        self.script: list[int] = []  # statuses to answer before the 200s
        self.requests: list[dict[str, Any]] = []  # every POST: headers, body, our answer
        self.alerts: dict[str, dict[str, Any]] = {}  # notifications kept, by Idempotency-Key
        self.accepted = threading.Event()
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.answer({k.lower(): v for k, v in self.headers.items()}, body,
                                         self.headers)
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "https://elsewhere.example/sos")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                receiver.requests.append({"method": "GET"})
                self.send_response(405)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls[1].cert_file, tls[1].key_file)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.server.server_address[1]}/sos/webhook"

    def target(self, name: str = "dispatch", **changes: Any) -> WebhookTarget:
        values: dict[str, Any] = {"name": name, "url": self.url, "secret": self.secret,
                                  "ca_file": self.ca_file}
        return WebhookTarget(**(values | changes))

    def answer(self, headers: dict[str, str], body: bytes, message: Any = None) -> int:
        """`headers` by lower-case name (HTTP's names are case-insensitive: urllib sends
        "X-sos-signature")."""
        with self._lock:
            ok = verify_signature(self.secret, headers.get("x-sos-timestamp"),
                                  headers.get("x-sos-signature"), body, self.clock())
            if not ok:
                status = 401
            elif self.script:
                status = self.script.pop(0)
            else:
                status = 200
                key = headers["idempotency-key"]
                if key not in self.alerts:  # a duplicate is answered 200 and not kept again
                    self.alerts[key] = json.loads(body)
                    self.accepted.set()
                    self._lock.notify_all()
            self.requests.append({"method": "POST", "headers": headers, "body": body,
                                  "verified": ok, "status": status, "message": message})
            return status

    def wait_for_alerts(self, count: int, timeout: float = 20.0) -> bool:
        """Until `count` notifications are kept (woken by each one kept, not by polling)."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self.alerts) >= count, timeout)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def receiver(tls: tuple[pki.CertPair, pki.CertPair], clock: Clock) -> Iterator[Receiver]:
    running = Receiver(tls, clock)
    yield running
    running.close()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[WebhookOutbox]:
    with WebhookOutbox(tmp_path / "center.sqlite") as box:
        yield box


def sender(outbox: WebhookOutbox, targets: list[WebhookTarget], clock: Clock,
           jitter: float = 0.0) -> WebhookSender:
    return WebhookSender(outbox, targets, clock=clock, rand=lambda: jitter)


# -- the retry decision: pure, exact ------------------------------------------------------------
@pytest.mark.parametrize(("attempts", "jitter", "delay"), [
    (1, 0.0, 1.0), (2, 0.0, 2.0), (3, 0.0, 4.0), (4, 0.0, 8.0), (9, 0.0, 256.0),
    (10, 0.0, 300.0), (11, 0.0, 300.0), (10_000, 0.0, 300.0),
    (1, 0.5, 0.9), (3, 0.5, 3.6), (10, 0.5, 270.0), (10, 0.999999, 240.00006),
])
def test_retry_delay_doubles_from_one_second_to_five_minutes(attempts: int, jitter: float,
                                                             delay: float) -> None:
    assert retry_delay(attempts, jitter) == pytest.approx(delay, abs=1e-9)
    assert retry_delay(attempts, jitter) <= MAX_RETRY_S


@pytest.mark.parametrize(("status", "action"), [
    (200, "delivered"), (201, "delivered"), (202, "delivered"), (204, "delivered"),
    (400, "refused"), (401, "refused"), (403, "refused"), (404, "refused"), (410, "refused"),
    (413, "refused"), (422, "refused"),
    (408, "retry"), (429, "retry"), (500, "retry"), (502, "retry"), (503, "retry"),
    (504, "retry"), (301, "retry"), (302, "retry"), (307, "retry"), (None, "retry"),
])
def test_classify(status: int | None, action: str) -> None:
    assert classify(status) == action


def test_decide_gives_the_next_time_or_settles() -> None:
    assert decide(1, 503, 1000.0, 0.0) == Decision("retry", 1001.0)
    assert decide(3, None, 1000.0, 0.5) == Decision("retry", pytest.approx(1003.6))
    assert decide(50, 429, 1000.0, 0.0) == Decision("retry", 1300.0)
    assert decide(2, 200, 1000.0, 0.3) == Decision("delivered")
    assert decide(1, 400, 1000.0, 0.3) == Decision("refused")


# -- signatures ---------------------------------------------------------------------------------
def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"v":1}'
    expected = hmac.new(SECRET, b"1741944420." + body, hashlib.sha256).hexdigest()
    assert signature(SECRET, 1741944420, body) == "v1=" + expected
    headers = signed_headers(SECRET, f"{ALERT_ID}:alert", body, 1741944420.9)
    assert headers == {"Content-Type": "application/json", "User-Agent": "sos-centre-webhook/1",
                       "Idempotency-Key": f"{ALERT_ID}:alert",
                       "X-SOS-Timestamp": "1741944420", "X-SOS-Signature": "v1=" + expected}


def test_verify_signature_refuses_what_it_must() -> None:
    body = b'{"v":1}'
    good = signature(SECRET, 1000, body)
    assert verify_signature(SECRET, "1000", good, body, now=1000.0)
    assert verify_signature(SECRET, "1000", good, body, now=1300.0)  # the edge of the window
    assert not verify_signature(SECRET, "1000", good, body, now=1301.0)  # too old: a replay
    assert not verify_signature(SECRET, "1000", good, body, now=699.0)  # from the future
    assert not verify_signature(b"another-secret-of-32-bytes-long!", "1000", good, body, 1000.0)
    assert not verify_signature(SECRET, "1000", good, b'{"v":2}', now=1000.0)
    assert not verify_signature(SECRET, "1001", good, body, now=1000.0)  # timestamp is signed
    assert not verify_signature(SECRET, None, good, body, now=1000.0)
    assert not verify_signature(SECRET, "-1000", good, body, now=1000.0)
    assert not verify_signature(SECRET, "1000²", good, body, now=1000.0)
    assert not verify_signature(SECRET, "1000", None, body, now=1000.0)
    assert not verify_signature(SECRET, "1000", good[3:], body, now=1000.0)  # no "v1="
    assert not verify_signature(SECRET, "1000", "v1=é", body, now=1000.0)
    # a change of secret: any one value may match
    assert verify_signature(SECRET, "1000", "v1=" + "0" * 64 + ", " + good, body, now=1000.0)


# -- targets, ids, the body ---------------------------------------------------------------------
@pytest.mark.parametrize(("changes", "words"), [
    ({"url": "http://dispatch.example/sos"}, "must be https"),
    ({"url": "https:///sos"}, "must be https"),
    ({"secret": b"x" * 31}, "at least 32 bytes"),
    ({"events": frozenset({"alert", "acked"})}, "not acked"),
    ({"events": frozenset()}, "events must be"),
    ({"desks": frozenset()}, "empty desks"),
    ({"name": "bad name"}, "webhook name"),
])
def test_a_bad_target_is_refused_saying_what_to_fix(changes: dict[str, Any],
                                                     words: str) -> None:
    values: dict[str, Any] = {"name": "dispatch", "url": "https://dispatch.example/sos",
                              "secret": SECRET}
    with pytest.raises(ValueError, match=words):
        WebhookTarget(**(values | changes))


def test_two_targets_of_one_name_are_refused(outbox: WebhookOutbox) -> None:
    target = WebhookTarget("dispatch", "https://dispatch.example/sos", SECRET)
    with pytest.raises(ValueError, match="two webhooks are named 'dispatch'"):
        WebhookSender(outbox, [target, target])


def test_a_target_is_made_from_the_configs_webhook() -> None:
    hook = WebhookConfig(name="police-cad", url="https://cad.police.example/sos",
                         secret_file=Path("/etc/sos-center/police-cad.key"), secret=SECRET,
                         events=("alert", "closed"), desks=("police-almaty",))
    assert WebhookTarget.from_config(hook) == WebhookTarget(
        "police-cad", "https://cad.police.example/sos", SECRET,
        events=frozenset({"alert", "closed"}), desks=frozenset({"police-almaty"}))
    every = dataclasses.replace(hook, events=("alert", "escalated", "closed"), desks=None)
    assert WebhookTarget.from_config(every).desks is None


def test_event_ids() -> None:
    assert event_id(ALERT_ID, "alert") == f"{ALERT_ID}:alert"
    assert event_id(ALERT_ID, "closed") == f"{ALERT_ID}:closed"
    assert (event_id(ALERT_ID, "escalated", Escalation(2, "police-astana", T0))
            == f"{ALERT_ID}:escalated:2")
    with pytest.raises(ValueError, match="needs its escalation step"):
        event_id(ALERT_ID, "escalated")
    with pytest.raises(ValueError, match="unknown webhook event"):
        event_id(ALERT_ID, "acked")


def test_targets_are_picked_by_events_and_desks(outbox: WebhookOutbox) -> None:
    url = "https://dispatch.example/sos"
    everything = WebhookTarget("everything", url, SECRET)
    police = WebhookTarget("police", url, SECRET, desks=frozenset({"police-pavlodar"}))
    astana = WebhookTarget("astana", url, SECRET, desks=frozenset({"police-astana"}))
    closes = WebhookTarget("closes", url, SECRET, events=frozenset({"closed"}))
    targets = [everything, police, astana, closes]
    assert outbox.enqueue_for(targets, "alert", alert(), now=T0) == ["everything", "police"]
    escalation = Escalation(1, "police-astana", T0 + 60)
    assert (outbox.enqueue_for(targets, "escalated", alert(), now=T0 + 60, escalation=escalation)
            == ["everything", "police", "astana"])  # astana: the desk it escalated to
    closed = alert(status="closed", closed_by="anna")
    assert (outbox.enqueue_for(targets, "closed", closed, now=T0 + 90)
            == ["everything", "police", "closes"])
    # re-sent, or seen by another instance: queued once
    assert outbox.enqueue_for(targets, "alert", alert(), now=T0 + 5) == []
    # past the end of the chain: to the supervisors only, no desk added
    last = Escalation(2, None, T0 + 120)
    assert (outbox.enqueue_for(targets, "escalated", alert(), now=T0 + 120, escalation=last)
            == ["everything", "police"])
    assert [(d.target, d.event_id.split(":", 1)[1]) for d in outbox.deliveries(ALERT_ID)] == [
        ("everything", "alert"), ("police", "alert"), ("astana", "escalated:1"),
        ("everything", "escalated:1"), ("police", "escalated:1"), ("closes", "closed"),
        ("everything", "closed"), ("police", "closed"), ("everything", "escalated:2"),
        ("police", "escalated:2")]
    assert outbox.deliveries(OTHER_ALERT_ID) == []


def test_the_body_is_the_documented_subset_and_meets_the_schema() -> None:
    Draft202012Validator.check_schema(webhook_schema())
    escalation = Escalation(1, "police-astana", T0 + 60)
    body = make_body("escalated", alert(), sent_at=T0 + 60, escalation=escalation)
    assert body == {
        "v": 1, "event_id": f"{ALERT_ID}:escalated:1", "event": "escalated",
        "sent_at": "2025-03-14T09:28:00.000Z",
        "alert": {"alert_id": ALERT_ID, "device_id": "token-0042", "device_kind": "token",
                  "trigger": "button_hold", "created_at": "2025-03-14T09:26:53.512Z",
                  "stored_at": "2025-03-14T09:26:53.600Z",
                  "position": {"lat": 52.520008, "lon": 13.404954, "accuracy_m": 4.5,
                               "source": "live"},
                  "battery": {"percent": 76, "charging": False},
                  "desks": ["police-pavlodar"], "rule": "pavlodar-pillars", "status": "open"},
        "escalation": {"step": 1, "desk": "police-astana", "at": "2025-03-14T09:28:00.000Z"}}
    validator = Draft202012Validator(webhook_schema(), format_checker=FormatChecker())
    validator.validate(body)
    pillar = alert_fields(record(device_id="pillar-hbf-01", device_kind="pillar",
                                 trigger="button_press", battery=None, status="closed",
                                 closed_by="dispatch-anna",
                                 position={"source": "none", "lat": None, "lon": None,
                                           "accuracy_m": None}),
                          desks=[], rule=None, close_reason="false alarm, checked on site")
    closed = make_body("closed", pillar, sent_at=T0)
    to_supervisors = make_body("escalated", pillar, sent_at=T0,
                               escalation=Escalation(3, None, T0))
    assert to_supervisors["escalation"] == {"step": 3, "desk": None,
                                            "at": "2025-03-14T09:27:00.000Z"}
    validator.validate(to_supervisors)
    validator.validate(closed)
    assert closed["alert"]["closed_by"] == "dispatch-anna"
    assert closed["alert"]["close_reason"] == "false alarm, checked on site"
    assert json.loads(body_bytes(closed)) == closed


def test_the_routing_decision_comes_from_the_stored_alert_unless_given() -> None:
    routed = record(desks=("police-almaty", "ambulance-almaty"), route_rule="almaty-tokens")
    fields = alert_fields(routed)
    assert (fields["desks"], fields["rule"]) == (["police-almaty", "ambulance-almaty"],
                                                 "almaty-tokens")
    assert alert_fields(routed, desks=["x"], rule="y")["desks"] == ["x"]
    assert (alert_fields(record())["desks"], alert_fields(record())["rule"]) == ([], None)
    moved = alert_fields(record(), position={"source": "last_known", "lat": 1.0, "lon": 2.0,
                                             "accuracy_m": None, "age_s": 40})
    assert moved["position"] == {"lat": 1.0, "lon": 2.0, "accuracy_m": None,
                                 "source": "last_known"}


def test_a_body_the_schema_refuses_is_never_queued(outbox: WebhookOutbox) -> None:
    target = WebhookTarget("dispatch", "https://dispatch.example/sos", SECRET)
    broken = alert() | {"device_kind": "drone"}
    with pytest.raises(ValueError, match="alert/device_kind"):
        outbox.enqueue_for([target], "alert", broken, now=T0)
    assert outbox.deliveries() == []
    no_step = {"v": 1, "event_id": f"{ALERT_ID}:escalated:1", "event": "escalated",
               "sent_at": "2025-03-14T09:28:00.000Z", "alert": alert()}
    assert body_problems(no_step) == ["(top level): 'escalation' is a required property"]


def test_the_schema_knows_every_kind_trigger_and_source_the_protocol_has() -> None:
    """A device value the webhook schema lacked would make the centre refuse to notify."""
    root = Path(__file__).parent.parent / "protocol" / "schemas"
    protocol_alert = json.loads((root / "alert.schema.json").read_text())["properties"]
    position = json.loads((root / "position.schema.json").read_text())["properties"]
    ours = webhook_schema()["$defs"]["alert"]["properties"]
    assert ours["device_kind"]["enum"] == protocol_alert["device_kind"]["enum"]
    assert ours["trigger"]["enum"] == protocol_alert["trigger"]["enum"]
    assert ours["position"]["properties"]["source"]["enum"] == position["source"]["enum"]


# -- against the real receiver ------------------------------------------------------------------
def test_a_notification_arrives_signed_and_checked(receiver: Receiver, outbox: WebhookOutbox,
                                                   clock: Clock) -> None:
    webhooks = sender(outbox, [receiver.target()], clock)
    assert webhooks.notify("alert", alert()) == ["dispatch"]
    assert webhooks.run_once(clock()) == 1
    [request] = receiver.requests
    assert request["verified"] and request["status"] == 200
    headers = request["headers"]
    assert headers["content-type"] == "application/json"
    assert headers["idempotency-key"] == f"{ALERT_ID}:alert"
    assert headers["x-sos-timestamp"] == str(int(T0))
    assert headers["x-sos-signature"] == signature(SECRET, int(T0), request["body"])
    kept = receiver.alerts[f"{ALERT_ID}:alert"]
    Draft202012Validator(webhook_schema(), format_checker=FormatChecker()).validate(kept)
    assert kept == make_body("alert", alert(), sent_at=T0)
    delivery = outbox.delivery("dispatch", f"{ALERT_ID}:alert")
    assert delivery is not None and delivery.state == "delivered"
    assert (delivery.attempts, delivery.delivered_at, delivery.last_error) == (1, T0, None)
    clock.t += 3600
    assert webhooks.run_once(clock()) == 0  # delivered is done
    assert len(receiver.requests) == 1


def test_a_wrong_secret_is_rejected_by_the_receiver_and_not_retried(
        receiver: Receiver, outbox: WebhookOutbox, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sos.center.webhook")
    wrong = receiver.target(secret=b"not-the-receivers-secret-at-all!")
    webhooks = sender(outbox, [wrong], clock)
    webhooks.notify("alert", alert())
    assert webhooks.run_once(clock()) == 1
    assert [r["verified"] for r in receiver.requests] == [False]
    assert receiver.alerts == {}
    delivery = outbox.delivery("dispatch", f"{ALERT_ID}:alert")
    assert delivery is not None and delivery.state == "refused"
    assert "refused with 401" in (delivery.last_error or "")
    assert "secret_file" in (delivery.last_error or "")
    clock.t += 3600
    assert webhooks.run_once(clock()) == 0
    assert len(receiver.requests) == 1
    refusals = [r for r in caplog.records if "REFUSED" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR


def test_retried_after_503_twice_then_delivered_once(receiver: Receiver, outbox: WebhookOutbox,
                                                     clock: Clock) -> None:
    receiver.script = [503, 503]
    webhooks = sender(outbox, [receiver.target()], clock)
    webhooks.notify("alert", alert())
    key = f"{ALERT_ID}:alert"

    assert webhooks.run_once(T0) == 1  # 503
    delivery = outbox.delivery("dispatch", key)
    assert delivery is not None
    assert (delivery.state, delivery.attempts, delivery.next_at) == ("pending", 1, T0 + 1)
    assert "503" in (delivery.last_error or "")
    assert webhooks.run_once(T0 + 0.9) == 0  # not due yet
    clock.t = T0 + 1
    assert webhooks.run_once(clock()) == 1  # 503 again: 2 s now
    assert outbox.delivery("dispatch", key).next_at == T0 + 3  # type: ignore[union-attr]
    clock.t = T0 + 3
    assert webhooks.run_once(clock()) == 1  # 200

    assert [r["status"] for r in receiver.requests] == [503, 503, 200]
    assert all(r["verified"] for r in receiver.requests)
    # every attempt signed at its own time, over the same bytes
    assert [r["headers"]["x-sos-timestamp"] for r in receiver.requests] == [
        str(int(T0)), str(int(T0 + 1)), str(int(T0 + 3))]
    assert len({r["body"] for r in receiver.requests}) == 1
    assert list(receiver.alerts) == [key]
    delivery = outbox.delivery("dispatch", key)
    assert delivery is not None
    assert (delivery.state, delivery.attempts, delivery.delivered_at) == ("delivered", 3, T0 + 3)
    clock.t += 3600
    assert webhooks.run_once(clock()) == 0
    assert len(receiver.requests) == 3


def test_two_instances_queue_and_send_an_alert_once(receiver: Receiver, tmp_path: Path,
                                                    clock: Clock) -> None:
    """Two centre instances on one store file, both seeing the same alert."""
    path = tmp_path / "center.sqlite"
    with WebhookOutbox(path) as one, WebhookOutbox(path) as two:
        first = sender(one, [receiver.target()], clock)
        second = sender(two, [receiver.target()], clock)
        assert first.notify("alert", alert()) == ["dispatch"]
        assert second.notify("alert", alert(), now=T0 + 0.5) == []
        # instance one has claimed it and is sending: instance two leaves it alone
        claimed = one.claim("dispatch", T0)
        assert claimed is not None and claimed.attempts == 1
        assert second.run_once(T0) == 0
        assert second.run_once(T0 + LEASE_S - 1) == 0
        one.mark_delivered("dispatch", claimed.event_id, T0)
        assert first.run_once(T0 + LEASE_S) + second.run_once(T0 + LEASE_S) == 0
        # another alert: whichever pass runs first sends it, the other finds nothing
        first.notify("alert", alert(OTHER_ALERT_ID))
        second.notify("alert", alert(OTHER_ALERT_ID))
        assert second.run_once(T0) + first.run_once(T0) == 1
    assert len(receiver.requests) == 1
    assert list(receiver.alerts) == [f"{OTHER_ALERT_ID}:alert"]


def test_after_a_crash_mid_send_the_receiver_dedupes_the_copy(receiver: Receiver, tmp_path: Path,
                                                              clock: Clock) -> None:
    """Instance one sends and dies before recording it: after the lease instance two sends it
    again, with the same Idempotency-Key, and the receiver keeps one alert."""
    path = tmp_path / "center.sqlite"
    target = receiver.target()
    with WebhookOutbox(path) as one, WebhookOutbox(path) as two:
        sender(one, [target], clock).notify("alert", alert())
        claimed = one.claim("dispatch", T0)
        assert claimed is not None
        body = claimed.body.encode()
        answer = urllib_post(target, body, signed_headers(SECRET, claimed.event_id, body, T0))
        assert answer.status == 200  # ... and the instance crashes here
        survivor = sender(two, [target], clock)
        assert survivor.run_once(T0 + LEASE_S - 1) == 0
        clock.t = T0 + LEASE_S
        assert survivor.run_once(clock()) == 1
        delivery = two.delivery("dispatch", f"{ALERT_ID}:alert")
        assert delivery is not None and delivery.state == "delivered" and delivery.attempts == 2
    assert [r["headers"]["idempotency-key"] for r in receiver.requests] == [
        f"{ALERT_ID}:alert"] * 2
    assert list(receiver.alerts) == [f"{ALERT_ID}:alert"]


def test_a_400_is_refused_for_good(receiver: Receiver, outbox: WebhookOutbox,
                                   clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sos.center.webhook")
    receiver.script = [400]
    webhooks = sender(outbox, [receiver.target()], clock)
    webhooks.notify("alert", alert())
    webhooks.notify("alert", alert(OTHER_ALERT_ID))  # due with it, sent after it
    # the refusal does not hold up the next one: the receiver is up
    assert webhooks.run_once(T0) == 2
    refused = outbox.delivery("dispatch", f"{ALERT_ID}:alert")
    assert refused is not None and refused.state == "refused" and refused.refused_at == T0
    assert "refused with 400" in (refused.last_error or "")
    for later in (T0 + 1, T0 + 60, T0 + 3600):
        assert webhooks.run_once(later) == 0
    assert [r["status"] for r in receiver.requests] == [400, 200]
    assert list(receiver.alerts) == [f"{OTHER_ALERT_ID}:alert"]
    assert len([r for r in caplog.records if "REFUSED" in r.getMessage()]) == 1


def test_a_receiver_that_is_down_does_not_hold_up_another(receiver: Receiver,
                                                          outbox: WebhookOutbox,
                                                          clock: Clock) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind((HOST, 0))
        closed_port = probe.getsockname()[1]
    down = receiver.target("down", url=f"https://{HOST}:{closed_port}/sos")
    up = receiver.target("up")
    webhooks = sender(outbox, [down, up], clock)
    webhooks.notify("alert", alert())
    webhooks.notify("alert", alert(OTHER_ALERT_ID))  # due with it, sent after it
    assert webhooks.run_once(T0) == 3  # down: one try, then it waits; up: both
    assert sorted(receiver.alerts) == [f"{ALERT_ID}:alert", f"{OTHER_ALERT_ID}:alert"]
    failing = outbox.delivery("down", f"{ALERT_ID}:alert")
    assert failing is not None and failing.state == "pending"
    assert "connection refused" in (failing.last_error or "")
    untried = outbox.delivery("down", f"{OTHER_ALERT_ID}:alert")
    assert untried is not None and untried.attempts == 0  # still due: goes on the next pass


def test_an_untrusted_certificate_is_retried_and_says_to_set_ca_file(
        receiver: Receiver, outbox: WebhookOutbox, clock: Clock) -> None:
    webhooks = sender(outbox, [receiver.target(ca_file=None)], clock)  # the system's CAs
    webhooks.notify("alert", alert())
    assert webhooks.run_once(T0) == 1
    delivery = outbox.delivery("dispatch", f"{ALERT_ID}:alert")
    assert delivery is not None and delivery.state == "pending"
    assert "not trusted" in (delivery.last_error or "")
    assert "ca_file" in (delivery.last_error or "")
    assert receiver.requests == []


def test_a_redirect_is_not_followed_and_is_retried(receiver: Receiver, outbox: WebhookOutbox,
                                                   clock: Clock) -> None:
    receiver.script = [302]
    webhooks = sender(outbox, [receiver.target()], clock)
    webhooks.notify("alert", alert())
    assert webhooks.run_once(T0) == 1
    delivery = outbox.delivery("dispatch", f"{ALERT_ID}:alert")
    assert delivery is not None and delivery.state == "pending"
    assert "https://elsewhere.example/sos" in (delivery.last_error or "")
    assert [r["method"] for r in receiver.requests] == ["POST"]  # no GET to the new place
    assert webhooks.run_once(T0 + 1) == 1
    assert list(receiver.alerts) == [f"{ALERT_ID}:alert"]


def test_failing_for_five_minutes_warns_once_and_keeps_trying(
        outbox: WebhookOutbox, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sos.center.webhook")
    posts: list[float] = []

    def unavailable(target: WebhookTarget, body: bytes, headers: Any) -> Answer:
        posts.append(clock())
        return Answer(503, "maintenance")

    target = WebhookTarget("dispatch", "https://dispatch.example/sos", SECRET)
    webhooks = WebhookSender(outbox, [target], clock=clock, http_post=unavailable,
                             rand=lambda: 0.0)
    webhooks.notify("alert", alert())
    while clock.t < T0 + 1000:
        webhooks.run_once(clock())
        clock.t += 0.5
    # 1, 2, 4 ... 256 s, then every 300 s: never given up
    gaps = [b - a for a, b in itertools.pairwise(posts)]
    assert gaps[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert gaps[9:] == [300] * len(gaps[9:]) and len(gaps) == 10
    failures = [r for r in caplog.records if "not delivered" in r.getMessage()]
    assert len(failures) == len(posts)
    assert all("it said: maintenance" in r.getMessage() for r in failures)
    warnings = [r for r in caplog.records if "has been failing" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.ERROR
    first_late = next(t for t in posts if t - T0 > FAILING_WARNING_S)
    delivery = outbox.delivery("dispatch", f"{ALERT_ID}:alert")
    assert delivery is not None and delivery.warned_at == first_late


def test_the_sender_thread_delivers_as_alerts_arrive(receiver: Receiver,
                                                     outbox: WebhookOutbox) -> None:
    receiver.clock = time.time  # the real clock: the sender signs with it
    webhooks = WebhookSender(outbox, [receiver.target()], poll_s=30.0)  # notify must wake it
    webhooks.start()
    try:
        webhooks.notify("alert", alert())
        assert receiver.accepted.wait(10), "the receiver got no valid notification"
    finally:
        webhooks.stop()
    assert list(receiver.alerts) == [f"{ALERT_ID}:alert"]
    delivery = outbox.delivery("dispatch", f"{ALERT_ID}:alert")
    assert delivery is not None and delivery.state == "delivered"


def test_two_instances_sending_at_once_send_each_alert_once(receiver: Receiver,
                                                            tmp_path: Path) -> None:
    """Both instances' threads race for the same queue: the claims keep them apart."""
    receiver.clock = time.time
    path = tmp_path / "center.sqlite"
    ids = [f"{n:032x}" for n in range(1, 21)]
    with WebhookOutbox(path) as one, WebhookOutbox(path) as two:
        instances = [WebhookSender(box, [receiver.target()], poll_s=0.01) for box in (one, two)]
        for instance in instances:
            instance.start()
        try:
            for n, alert_id in enumerate(ids):
                instances[n % 2].notify("alert", alert(alert_id))
                instances[(n + 1) % 2].notify("alert", alert(alert_id))  # seen twice
            assert receiver.wait_for_alerts(len(ids)), f"kept {len(receiver.alerts)}"
        finally:
            for instance in instances:
                instance.stop()
        assert {d.state for d in one.deliveries()} == {"delivered"}
    assert sorted(receiver.alerts) == [f"{alert_id}:alert" for alert_id in ids]
    assert len(receiver.requests) == len(ids)  # not one sent twice


def documented_verify() -> Callable[[bytes, Any, bytes], bool]:
    """The receiver's check as docs/PROTOCOL.md prints it, run as it is."""
    text = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    section = text.split("### Checking a request (the receiver)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "PROTOCOL.md", "exec"), namespace)
    return namespace["verify"]


def test_the_documented_receiver_check_passes_our_requests_and_no_forgery(
        receiver: Receiver, outbox: WebhookOutbox) -> None:
    receiver.clock = time.time  # the snippet reads the real clock
    webhooks = WebhookSender(outbox, [receiver.target()])
    webhooks.notify("alert", alert())
    assert webhooks.run_once(time.time()) == 1
    [request] = receiver.requests
    verify = documented_verify()
    headers, body = request["message"], request["body"]  # as http.server hands them over
    assert verify(SECRET, headers, body)
    assert not verify(b"not-the-receivers-secret-at-all!", headers, body)
    assert not verify(SECRET, headers, body.replace(b"token-0042", b"token-0043"))
    old = int(time.time()) - 301  # rightly signed, outside the replay window
    stale = {"X-SOS-Timestamp": str(old), "X-SOS-Signature": signature(SECRET, old, body)}
    assert not verify(SECRET, stale, body)
    fresh = {"X-SOS-Timestamp": str(old + 60), "X-SOS-Signature": signature(SECRET, old + 60, body)}
    assert verify(SECRET, fresh, body)


def test_the_documented_example_body_meets_the_schema() -> None:
    """The example in docs/PROTOCOL.md (fenced "json webhook", which the protocol messages'
    example test leaves alone)."""
    text = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    [example] = re.findall(r"```json webhook\n(.*?)```", text, re.S)
    body = json.loads(example)
    assert body_problems(body) == []
    assert body == make_body("alert", alert(), sent_at=T0 + 0.412)


def test_deliveries_for_a_webhook_no_longer_configured_are_named_at_start(
        outbox: WebhookOutbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sos.center.webhook")
    gone = WebhookTarget("old-cad", "https://cad.example/sos", SECRET)
    outbox.enqueue_for([gone], "alert", alert(), now=T0)
    kept = WebhookTarget("dispatch", "https://dispatch.example/sos", SECRET)
    webhooks = WebhookSender(outbox, [kept], poll_s=30.0)
    webhooks.start()
    webhooks.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "webhook 'old-cad' is not configured, and 1 notification(s) for it are undelivered; "
        "they are sent if a webhook of that name is configured again"]
    assert outbox.pending_counts() == {"old-cad": 1}
