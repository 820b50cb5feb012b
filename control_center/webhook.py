"""Signed webhooks: alerts pushed to another system (a dispatch or police system) as they arrive
(docs/PROTOCOL.md, "Webhooks to other systems"; the body's schema: webhook.schema.json).

Why each piece is the way it is:

- **An outbox in the centre's SQLite file** (`webhook_deliveries`, beside the store's tables):
  a notification is written before anything is sent, so a centre that crashes or restarts sends
  it afterwards, and every centre instance sharing the file sees the same queue. Its key is
  (target, event_id) and `enqueue` is INSERT OR IGNORE, so two instances, or one alert seen twice,
  queue it once.
- **Claimed with a lease**: an instance takes a due delivery by moving its `next_at` past the
  time a send can take (`LEASE_S`), in one write transaction, so two instances never send the
  same one at the same time. A crash after sending and before recording it means one more copy
  later; the receiver de-duplicates on `Idempotency-Key` (the event id), as it must for any
  at-least-once sender.
- **Retried until delivered**: an alarm must not be dropped because a receiver was down. The
  decision (`decide`) is a pure function of the attempts made and the answer, tested exactly.
  A 4xx other than 408/429 is the receiver saying "never like this": it is stored as refused
  with the reason and logged once; retrying it would only repeat the refusal.
- **HMAC-SHA256 over timestamp + "." + body** (Stripe's and Standard Webhooks' shape): what
  dispatch and police systems already know how to configure and check, with a secret per
  receiver. The timestamp is that of each attempt, so a retry after an hour still passes the
  receiver's replay window.
- **One thread per target**: a receiver that hangs for the whole timeout holds up only its
  own deliveries.

Time comes in as `now` (epoch seconds) or from the injected `clock`; randomness (the jitter)
from the injected `rand`; HTTP from the injected `http_post`. Nothing here reads the wall clock
inside a decision, so tests drive it step by step with `run_once(now)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import http.client
import json
import logging
import random
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker

from control_center.shared_sqlite import SharedTables
from control_center.store import AlertRecord
from protocol.messages import utc_iso

log = logging.getLogger("sos.center.webhook")

VERSION = 1
EVENTS = ("alert", "escalated", "closed")
TIMEOUT_S = 10.0  # per connect and per read; a receiver slower than this is retried
# A claimed delivery goes back to the queue after this long: far longer than one send can take
# (connect + read, each up to TIMEOUT_S), so only a crashed instance's claim ever runs out.
LEASE_S = 60.0
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 300.0  # 5 min: the longest a receiver that is back waits for what it missed
JITTER = 0.2  # retries come up to 20 % early, so instances and targets do not retry in step
FAILING_WARNING_S = 300.0  # undelivered this long after it was queued: one louder line
TOLERANCE_S = 300  # what we advise receivers to accept between X-SOS-Timestamp and their clock
MIN_SECRET_BYTES = 32  # as the config requires: an HMAC-SHA256 key as long as its output
DETAIL_CHARS = 200  # of a receiver's answer, kept with a failure (it often says what is wrong)
USER_AGENT = "sos-centre-webhook/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # str.isdigit() also takes "²", which int() refuses


# -- targets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WebhookTarget:
    """One receiving system, as configured (`[[webhooks]]`).

    `events`: which of EVENTS it gets; `desks`: only alerts routed (or escalated) to one of these
    desks, or every alert when None; `ca_file`: a PEM file of CAs that its server certificate
    must chain to, instead of the system's store (a receiver inside an organisation's network
    with a private CA)."""

    name: str
    url: str
    secret: bytes
    events: frozenset[str] = frozenset(EVENTS)
    desks: frozenset[str] | None = None
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and _NAME.fullmatch(self.name)):
            raise ValueError(f"webhook name '{self.name}': use 1-64 letters, digits, '.', '_' "
                             f"or '-', starting with a letter or digit")
        parts = urlsplit(self.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"webhook '{self.name}': url '{self.url}' must be https://host/...: "
                             f"alerts carry people's positions and go only over TLS")
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"webhook '{self.name}': the secret must be at least "
                             f"{MIN_SECRET_BYTES} bytes (make one: openssl rand -hex 32)")
        unknown = set(self.events) - set(EVENTS)
        if not self.events or unknown:
            raise ValueError(f"webhook '{self.name}': events must be some of "
                             f"{', '.join(EVENTS)} (not {', '.join(sorted(unknown)) or 'none'})")
        if self.desks is not None and not self.desks:
            raise ValueError(f"webhook '{self.name}': an empty desks list would send nothing; "
                             f"leave it out to send every alert")

    @classmethod
    def from_config(cls, hook: Any) -> WebhookTarget:
        """From the config's `[[webhooks]]` entry (control_center.config.WebhookConfig, or
        anything with its attributes: name, url, secret, events, desks; ca_file if it has
        one)."""
        return cls(name=hook.name, url=hook.url, secret=hook.secret,
                   events=frozenset(hook.events),
                   desks=None if hook.desks is None else frozenset(hook.desks),
                   ca_file=getattr(hook, "ca_file", None))

    def wants(self, event: str, desks: Iterable[str]) -> bool:
        """Whether this target gets `event` for an alert that went to `desks`."""
        return event in self.events and (self.desks is None or not self.desks.isdisjoint(desks))


# -- the body -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Escalation:
    """One escalation step of an alert: `step` counts from 1; `desk` is where it went (None: to
    the supervisors only, past the end of the desks' chain); `at` is epoch seconds."""

    step: int
    desk: str | None
    at: float


def event_id(alert_id: str, event: str, escalation: Escalation | None = None) -> str:
    """The receiver's de-duplication key: an alert's `alert` and `closed` happen once each, an
    escalation once per step."""
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event '{event}': one of {', '.join(EVENTS)}")
    if event == "escalated":
        if escalation is None:
            raise ValueError("an 'escalated' notification needs its escalation step")
        return f"{alert_id}:escalated:{escalation.step}"
    return f"{alert_id}:{event}"


def iso(epoch_s: float) -> str:
    """Epoch seconds as the protocol writes times (UTC, milliseconds, Z)."""
    return utc_iso(datetime.fromtimestamp(epoch_s, UTC))


def alert_fields(record: AlertRecord, *, desks: Iterable[str] | None = None,
                 rule: str | None = None, close_reason: str | None = None,
                 position: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The body's `alert` object: a stable subset of the stored alert, so a receiver's
    integration does not break when the store gains columns. `desks`/`rule`: the routing
    decision (the record's `desks`/`route_rule` unless given); `position`: the latest known
    (the alert's own unless given)."""
    where = position if position is not None else record.position
    if desks is None:
        desks = getattr(record, "desks", None) or ()
    if rule is None:
        rule = getattr(record, "route_rule", None)
    fields: dict[str, Any] = {
        "alert_id": record.alert_id,
        "device_id": record.device_id,
        "device_kind": record.device_kind,
        "trigger": record.trigger,
        "created_at": record.created_at,
        "stored_at": iso(record.stored_at),
        "position": {k: where.get(k) for k in ("lat", "lon", "accuracy_m")}
        | {"source": where.get("source", "none")},
        "battery": record.battery,
        "desks": list(desks),
        "rule": rule,
        "status": record.status,
    }
    if record.closed_by is not None:
        fields["closed_by"] = record.closed_by
    if close_reason is not None:
        fields["close_reason"] = close_reason[:1000]
    return fields


def make_body(event: str, alert: Mapping[str, Any], *, sent_at: float,
              escalation: Escalation | None = None) -> dict[str, Any]:
    """The notification; ValueError if it breaks webhook.schema.json (we never send a receiver
    what our own published schema refuses)."""
    body: dict[str, Any] = {
        "v": VERSION,
        "event_id": event_id(alert["alert_id"], event, escalation),
        "event": event,
        "sent_at": iso(sent_at),
        "alert": dict(alert),
    }
    if escalation is not None:
        body["escalation"] = {"step": escalation.step, "desk": escalation.desk,
                              "at": iso(escalation.at)}
    problems = body_problems(body)
    if problems:
        raise ValueError("invalid webhook body: " + "; ".join(problems))
    return body


def body_bytes(body: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON with sorted keys; stored as it is, so every retry posts (and signs)
    the same bytes."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def webhook_schema() -> dict[str, Any]:
    return json.loads(resources.files("control_center").joinpath("webhook.schema.json")
                      .read_text(encoding="utf-8"))


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(webhook_schema(), format_checker=FormatChecker())


def body_problems(body: Any) -> list[str]:
    """Everything in `body` that breaks webhook.schema.json, or []."""
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
            for e in sorted(_validator().iter_errors(body), key=lambda e: list(e.path))]


# -- signatures ---------------------------------------------------------------------------------
def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """`v1=` and the hex HMAC-SHA256 of `{timestamp}.{body}`: the timestamp is signed with the
    body, so a captured request cannot be replayed later under a fresh timestamp."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def signed_headers(secret: bytes, idempotency_key: str, body: bytes, now: float
                   ) -> dict[str, str]:
    """The headers of one attempt, signed at `now`."""
    timestamp = int(now)
    return {"Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": idempotency_key,
            "X-SOS-Timestamp": str(timestamp),
            "X-SOS-Signature": signature(secret, timestamp, body)}


def verify_signature(secret: bytes, timestamp: str | None, signature_header: str | None,
                     body: bytes, now: float, tolerance_s: float = TOLERANCE_S) -> bool:
    """A receiver's check (the one docs/PROTOCOL.md shows): the timestamp is within
    `tolerance_s` of `now` and one `v1=` value in the header is the HMAC of exactly these body
    bytes. Several comma-separated values are allowed, for a change of secret."""
    if not timestamp or not _TIMESTAMP.fullmatch(timestamp) or not signature_header:
        return False
    if abs(now - int(timestamp)) > tolerance_s:
        return False
    expected = signature(secret, int(timestamp), body)
    return any(hmac.compare_digest(expected.encode(), part.strip().encode())
               for part in signature_header.split(","))


# -- the retry decision (pure) ------------------------------------------------------------------
Action = Literal["delivered", "retry", "refused"]


@dataclass(frozen=True)
class Decision:
    """What to do after an attempt: `next_at` (epoch seconds) only for a retry."""

    action: Action
    next_at: float | None = None


def classify(status: int | None) -> Action:
    """2xx: delivered. 4xx except 408 (timeout) and 429 (too many): the receiver refuses this
    request for good. Anything else (no answer, 5xx, 408, 429, a redirect we do not follow) may
    pass later, and an alarm is worth trying again."""
    if status is not None and 200 <= status < 300:
        return "delivered"
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return "refused"
    return "retry"


def retry_delay(attempts: int, jitter: float) -> float:
    """Seconds before the next try after `attempts` failed ones (≥ 1): 1, 2, 4 ... capped at
    MAX_RETRY_S, shortened by up to JITTER of itself (`jitter` in [0, 1)), so it never exceeds
    the cap."""
    exponent = min(max(attempts, 1) - 1, 30)  # 2**30 s is far beyond the cap: no overflow
    return min(FIRST_RETRY_S * 2.0 ** exponent, MAX_RETRY_S) * (1.0 - JITTER * jitter)


def decide(attempts: int, status: int | None, now: float, jitter: float) -> Decision:
    """The whole retry policy: `attempts` made so far (this one included), the HTTP status or
    None for no answer (timeout, connection or TLS error), `now`, and a random `jitter` in
    [0, 1)."""
    action = classify(status)
    if action == "retry":
        return Decision("retry", now + retry_delay(attempts, jitter))
    return Decision(action)


# -- the outbox ---------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    target       TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    body         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      REAL NOT NULL,
    delivered_at REAL,
    refused_at   REAL,
    warned_at    REAL,
    last_error   TEXT,
    PRIMARY KEY (target, event_id)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries(target, next_at)
    WHERE delivered_at IS NULL AND refused_at IS NULL;
"""
_COLUMNS = ("target", "event_id", "body", "created_at", "attempts", "next_at", "delivered_at",
            "refused_at", "warned_at", "last_error")
_OPEN = "delivered_at IS NULL AND refused_at IS NULL"


@dataclass(frozen=True)
class Delivery:
    """One notification for one target. `attempts`: sends started (a claim counts); `body`: the
    exact JSON text posted; `last_error`: why the last attempt failed or was refused."""

    target: str
    event_id: str
    body: str
    created_at: float
    attempts: int
    next_at: float
    delivered_at: float | None
    refused_at: float | None
    warned_at: float | None
    last_error: str | None

    @property
    def state(self) -> Literal["delivered", "refused", "pending"]:
        if self.delivered_at is not None:
            return "delivered"
        return "refused" if self.refused_at is not None else "pending"


class WebhookOutbox(SharedTables):
    """The durable queue of notifications, in the centre's SQLite file at `path` (shared by
    every instance and component, control_center/shared_sqlite.py)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, _SCHEMA)


    def enqueue(self, target: str, event_id: str, body: bytes | str, now: float) -> bool:
        """Queue one notification, due at once; False if (target, event_id) was queued before
        (by this or another instance): the first body stays."""
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO webhook_deliveries(target, event_id, body, created_at, "
                "next_at) VALUES (?,?,?,?,?)", (target, event_id, text, now, now))
        return cur.rowcount == 1

    def enqueue_for(self, targets: Iterable[WebhookTarget], event: str,
                    alert: Mapping[str, Any], *, now: float,
                    escalation: Escalation | None = None,
                    reached: Iterable[str] = ()) -> list[str]:
        """Queue `event` of `alert` (an `alert_fields` object) for every target that wants it:
        by its events, and by its desks against the alert's desks, the desks it escalated to
        before (`reached`: a desk that got the alert by escalation also gets its close) and
        the desk it escalates to now. Returns the names of the targets it was newly queued
        for. ValueError for a body the schema refuses (nothing is queued then)."""
        body = make_body(event, alert, sent_at=now, escalation=escalation)
        desks = set(alert.get("desks") or ()) | set(reached)
        if escalation is not None and escalation.desk is not None:
            desks.add(escalation.desk)
        text = body_bytes(body)
        return [t.name for t in targets
                if t.wants(event, desks) and self.enqueue(t.name, body["event_id"], text, now)]

    def claim(self, target: str, now: float, lease_s: float = LEASE_S) -> Delivery | None:
        """The oldest due delivery for `target`, taken for `lease_s` (no other instance sends
        it meanwhile) and counted as an attempt; None if nothing is due.

        Every sender asks this every second or so: the question is first a plain read, and
        the write lock every instance's store shares is taken only when something is due."""
        query = (f"SELECT {', '.join(_COLUMNS)} FROM webhook_deliveries "
                 f"WHERE target = ? AND {_OPEN} AND next_at <= ? "
                 f"ORDER BY created_at, event_id LIMIT 1")
        with self._lock:
            if self._db.execute(query, (target, now)).fetchone() is None:
                return None
            with self._transaction():
                row = self._db.execute(query, (target, now)).fetchone()  # again, under the lock
                if row is None:  # another instance took it meanwhile
                    return None
                self._db.execute(
                    "UPDATE webhook_deliveries SET next_at = ?, attempts = attempts + 1 "
                    "WHERE target = ? AND event_id = ?", (now + lease_s, target, row[1]))
        delivery = Delivery(*row)
        return dataclasses.replace(delivery, attempts=delivery.attempts + 1,
                                   next_at=now + lease_s)

    def mark_delivered(self, target: str, event_id: str, now: float) -> None:
        with self._lock:
            self._db.execute(
                f"UPDATE webhook_deliveries SET delivered_at = ?, last_error = NULL "
                f"WHERE target = ? AND event_id = ? AND {_OPEN}", (now, target, event_id))

    def mark_refused(self, target: str, event_id: str, now: float, reason: str) -> None:
        with self._lock:
            self._db.execute(
                f"UPDATE webhook_deliveries SET refused_at = ?, last_error = ? "
                f"WHERE target = ? AND event_id = ? AND {_OPEN}",
                (now, reason, target, event_id))

    def mark_failed(self, target: str, event_id: str, next_at: float, reason: str) -> None:
        """A failed attempt: due again at `next_at`. A delivery another instance has settled
        meanwhile (its lease ran out under us) stays settled."""
        with self._lock:
            self._db.execute(
                f"UPDATE webhook_deliveries SET next_at = ?, last_error = ? "
                f"WHERE target = ? AND event_id = ? AND {_OPEN}",
                (next_at, reason, target, event_id))

    def mark_warned(self, target: str, event_id: str, now: float) -> bool:
        """Record the 'failing for long' warning; True only for the first (one instance logs)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE webhook_deliveries SET warned_at = ? "
                "WHERE target = ? AND event_id = ? AND warned_at IS NULL",
                (now, target, event_id))
        return cur.rowcount == 1

    def pending_counts(self) -> dict[str, int]:
        """Undelivered, unrefused deliveries by target name."""
        with self._lock:
            rows = self._db.execute(f"SELECT target, count(*) FROM webhook_deliveries "
                                    f"WHERE {_OPEN} GROUP BY target").fetchall()
        return dict(rows)

    def delivery(self, target: str, event_id: str) -> Delivery | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM webhook_deliveries "
                f"WHERE target = ? AND event_id = ?", (target, event_id)).fetchone()
        return None if row is None else Delivery(*row)

    def deliveries(self, alert_id: str | None = None) -> list[Delivery]:
        """Every delivery, or those of one alert, oldest first (for the console and reports)."""
        query = f"SELECT {', '.join(_COLUMNS)} FROM webhook_deliveries"
        args: tuple[object, ...] = ()
        if alert_id is not None:
            query += " WHERE substr(event_id, 1, ?) = ?"
            args = (len(alert_id) + 1, alert_id + ":")
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at, target, event_id",
                                    args).fetchall()
        return [Delivery(*r) for r in rows]


# -- HTTP ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """A receiver's answer: its status and what it said (the start of its body, or where a
    redirect points), for the log line and `last_error`."""

    status: int
    detail: str = ""


# POST `body` with `headers` to the target; an Answer for any HTTP status, OSError (or
# http.client.HTTPException) when there is none: refused connection, TLS failure, timeout.
HttpPost = Callable[[WebhookTarget, bytes, Mapping[str, str]], Answer]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a 301/302/303 with a GET and no body; a webhook must not (the alert
    would be lost while the answer looks fine): the 3xx comes back as it is and is retried."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _detail(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return " ".join(text.split())[:DETAIL_CHARS]


def urllib_post(target: WebhookTarget, body: bytes, headers: Mapping[str, str],
                timeout: float = TIMEOUT_S) -> Answer:
    """HTTPS with the system's CA store (or the target's `ca_file`), hostname checked, no
    redirects followed, `timeout` per connect and read. Proxies from the environment
    (https_proxy, no_proxy) apply, as for any program on the machine."""
    context = ssl.create_default_context(
        cafile=str(target.ca_file) if target.ca_file is not None else None)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                         _NoRedirects())
    request = urllib.request.Request(target.url, data=body, headers=dict(headers),
                                     method="POST")
    try:
        with opener.open(request, timeout=timeout) as answer:
            return Answer(answer.status, _detail(answer.read(DETAIL_CHARS * 4)))
    except urllib.error.HTTPError as error:
        with error:
            if 300 <= error.code < 400:
                return Answer(error.code, f"Location: {error.headers.get('Location', '?')}")
            return Answer(error.code, _detail(error.read(DETAIL_CHARS * 4)))


def advice(status: int | None, error: BaseException | None) -> str:
    """One line on what went wrong and what to do about it."""
    if status is None:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLCertVerificationError):
            return (f"its TLS certificate is not trusted ({reason.verify_message}): give the "
                    f"receiver a certificate for its host name from a CA in the system store, "
                    f"or set ca_file for this webhook")
        if isinstance(reason, TimeoutError):
            return f"no answer within {TIMEOUT_S:g} s: is the receiver overloaded or stuck?"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused: is the receiver running, and is the url's port right?"
        return (f"no answer ({type(reason).__name__}: {reason}): check the url's host name, "
                f"the network path and the receiver")
    if status in (401, 403):
        return (f"refused with {status}: the receiver does not accept our signature; check that "
                f"this webhook's secret_file holds the secret configured at the receiver")
    if status in (404, 405, 410):
        return f"refused with {status}: no webhook endpoint at this url; check the url"
    if 400 <= status < 500 and status not in (408, 429):
        return (f"refused with {status}: the receiver rejects the notification itself; "
                f"compare its validation with docs/PROTOCOL.md and webhook.schema.json")
    if 300 <= status < 400:
        return (f"redirected ({status}), and webhooks do not follow redirects: set the url "
                f"to the final address")
    if status in (408, 429):
        return f"the receiver is busy ({status}); it will be tried again"
    if 500 <= status < 600:
        return f"the receiver failed ({status}): a problem on its side"
    return f"unexpected answer {status}"


# -- the sender ---------------------------------------------------------------------------------
class WebhookSender:
    """Sends due deliveries to `targets` from `outbox`: `run_once(now)` is one pass (the tests
    drive it step by step); `start()` runs one thread per target that passes every `poll_s`
    and at once after `notify`.

    A pass over a target sends its due deliveries oldest first and stops at the first that is
    to be retried (no answer, 5xx, 408, 429, a redirect): the receiver is down or busy, and the
    rest would only wait out the same timeout; they stay due, and go on the next pass. A
    stopped sender is not started again: make a new one."""

    def __init__(self, outbox: WebhookOutbox, targets: Iterable[WebhookTarget], *,
                 clock: Callable[[], float] = time.time, http_post: HttpPost = urllib_post,
                 rand: Callable[[], float] = random.random, poll_s: float = 1.0,
                 lease_s: float = LEASE_S) -> None:
        self.outbox = outbox
        self.targets: dict[str, WebhookTarget] = {}
        for target in targets:
            if target.name in self.targets:
                raise ValueError(f"two webhooks are named '{target.name}': names must differ "
                                 f"(they key the delivery records)")
            self.targets[target.name] = target
        self._clock = clock
        self._http_post = http_post
        self._rand = rand
        self._poll_s = poll_s
        self._lease_s = lease_s
        self._stopping = threading.Event()
        self._wakes = {name: threading.Event() for name in self.targets}
        self._threads: list[threading.Thread] = []

    # -- what the centre calls ------------------------------------------------------------------
    def notify(self, event: str, alert: Mapping[str, Any], *,
               escalation: Escalation | None = None, now: float | None = None,
               reached: Iterable[str] = ()) -> list[str]:
        """Queue `event` of `alert` for the targets that want it and wake their threads;
        returns the names it was newly queued for (`reached`: see enqueue_for)."""
        queued = self.outbox.enqueue_for(self.targets.values(), event, alert,
                                         now=self._clock() if now is None else now,
                                         escalation=escalation, reached=reached)
        for name in queued:
            self._wakes[name].set()
        return queued

    def start(self) -> None:
        """One thread per target. Deliveries queued for a webhook no longer configured are
        named once in the log: they wait, and go if it comes back under the same name."""
        for name, count in sorted(self.outbox.pending_counts().items()):
            if name not in self.targets:
                log.warning("webhook '%s' is not configured, and %d notification(s) for it "
                            "are undelivered; they are sent if a webhook of that name is "
                            "configured again", name, count)
        for name in self.targets:
            thread = threading.Thread(target=self._loop, args=(name,),
                                      name=f"webhook-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = TIMEOUT_S * 2 + 1) -> None:
        """Ends the threads; a send under way finishes (at most its timeouts) or is abandoned
        to its lease, and is sent again later."""
        self._stopping.set()
        for wake in self._wakes.values():
            wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    # -- passes ---------------------------------------------------------------------------------
    def run_once(self, now: float) -> int:
        """One pass over every target at time `now`; returns how many sends were made."""
        return sum(self.run_target(name, now) for name in self.targets)

    def run_target(self, name: str, now: float | None = None) -> int:
        """One pass over one target: at `now`, or by the clock (re-read after each send)."""
        target = self.targets[name]
        sent = 0
        while not self._stopping.is_set():
            at = self._clock() if now is None else now
            delivery = self.outbox.claim(name, at, self._lease_s)
            if delivery is None:
                break
            sent += 1
            if not self._attempt(target, delivery, at, now):
                break
        return sent

    def _attempt(self, target: WebhookTarget, delivery: Delivery, at: float,
                 fixed_now: float | None) -> bool:
        """Send one delivery and record what came of it; False if the receiver looks down."""
        body = delivery.body.encode("utf-8")
        headers = signed_headers(target.secret, delivery.event_id, body, at)
        status: int | None = None
        error: BaseException | None = None
        detail = ""
        try:
            answer = self._http_post(target, body, headers)
            status, detail = answer.status, answer.detail
        except (OSError, http.client.HTTPException) as exc:
            error = exc
        done = self._clock() if fixed_now is None else fixed_now
        decision = decide(delivery.attempts, status, done, self._rand())
        what = f"webhook '{target.name}': {delivery.event_id}"
        if decision.action == "delivered":
            self.outbox.mark_delivered(target.name, delivery.event_id, done)
            if delivery.attempts > 1:
                log.info("%s delivered after %d attempts", what, delivery.attempts)
            return True
        reason = advice(status, error) + (f" (it said: {detail})" if detail else "")
        if decision.action == "refused":
            self.outbox.mark_refused(target.name, delivery.event_id, done, reason)
            log.error("%s REFUSED, not sent again: %s", what, reason)
            return True
        assert decision.next_at is not None
        self.outbox.mark_failed(target.name, delivery.event_id, decision.next_at, reason)
        log.warning("%s not delivered (attempt %d) to %s: %s; next try in %.0f s", what,
                    delivery.attempts, target.url, reason, decision.next_at - done)
        if (done - delivery.created_at > FAILING_WARNING_S
                and self.outbox.mark_warned(target.name, delivery.event_id, done)):
            log.error("%s has been failing for %.0f min and is retried until it is delivered "
                      "(at least every %.0f min): %s", what,
                      (done - delivery.created_at) / 60, MAX_RETRY_S / 60, reason)
        return False

    def _loop(self, name: str) -> None:
        wake = self._wakes[name]
        while not self._stopping.is_set():
            try:
                self.run_target(name)
            except Exception:  # e.g. the store file locked past its wait: the next pass retries
                log.exception("webhook '%s': a pass failed; trying again in %g s", name,
                              self._poll_s)
            wake.wait(self._poll_s)
            wake.clear()

