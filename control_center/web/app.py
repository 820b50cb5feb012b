"""The operator's web console: an ASGI app (Starlette) over the centre's store and command path.

Routes and JSON shapes: docs/CONSOLE-API.md. Why Starlette on uvicorn: docs/CONSOLE.md.

Every action goes the way the CLI's does (CenterService.send_command / send_call: signed,
numbered, recorded, then published; the alert shows a decision only when the device applied
it). The console adds who: the logged-in user's name is the command's `operator`, and every
log-in, decision, dispatch, evidence view and export is a line in the audit log with it.

Endpoints that read the store, hash a password or wait for the broker are plain `def`s:
Starlette runs them on its worker threads, so the event loop only serves files and events.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_center.alert_routing import AlertRouting, operator_sees
from control_center.audit import AuditLog
from control_center.evidence import EvidenceError
from control_center.fleet import Fleet
from control_center.service import CommandError
from control_center.store import AlreadyClaimed, Store
from control_center.web.accounts import USERNAME, Accounts, Session
from control_center.web.alert_view import alert_view
from control_center.web.evidence_view import CallRefused, EvidenceBrowser, InvalidId
from control_center.web.fleet_view import device_view, device_views
from control_center.web.hub import EventHub
from control_center.web.login_guard import LoginGuard
from control_center.web.voice_api import (
    SDP_MAX,
    SESSION,
    VoiceRefused,
    VoiceRelay,
    VoiceUnanswered,
    ice_servers,
    new_session,
)

log = logging.getLogger("sos.center.console")
STATIC = Path(str(resources.files("control_center.web").joinpath("static")))
COOKIE = "sos_session"
# Matched whole (fullmatch): `$` would let a trailing newline through.
ALERT_ID = re.compile(r"[0-9a-f]{32}")
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CALL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
LIVE_FILE = re.compile(r"index\.m3u8|chunk-[0-9]{6}\.ts|live\.ts")
LIVE_VIEWS_REMEMBERED = 10_000  # (user, alert) pairs whose live view is audited already
CLOSED_SHOWN = 100  # closed alerts a page loads (the newest)
LOGINS_AT_ONCE = 2  # argon2 hashes at once: 64 MiB and a core each
MAX_BODY = 16 * 1024  # no console request needs more
CLOSE_REASON_MAX = 200
VOICE_ANSWER_S = 10.0  # how long an offer waits for the device's answer without [voice]


class CommandPath(Protocol):
    """What the console needs of CenterService: the CLI's own way to send a decision."""

    def send_command(self, alert_id: str, decision: str, operator: str,
                     timeout_s: float = ..., note: str | None = ...) -> dict[str, Any]: ...

    def send_call(self, device_id: str, kind: str, operator: str, call_id: str | None = ...,
                  timeout_s: float = ...) -> dict[str, Any]: ...

    def send_voice(self, alert_id: str, fields: dict[str, Any], operator: str,
                   timeout_s: float = ...) -> dict[str, Any]: ...


@dataclass
class Console:
    """Everything the console's routes read and act on."""

    store: Store
    accounts: Accounts
    commands: CommandPath
    audit: AuditLog
    hub: EventHub = field(default_factory=EventHub)
    fleet: Fleet | None = None  # certificate expiry and enrolled devices in the fleet view
    live_dir: Path | None = None
    evidence: EvidenceBrowser | None = None
    tiles: dict[str, str] | None = None
    routing: AlertRouting | None = None  # desks, escalation steps; None: every alert to all
    voice: Any = None  # the centre's [voice] settings (VoiceSettings); None: no STUN/TURN
    voice_relay: VoiceRelay | None = None  # made from `store` when None
    clock: Callable[[], float] = time.time
    logins: LoginGuard = field(default_factory=lambda: LoginGuard(LOGINS_AT_ONCE))
    _live_viewed: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)
    _live_started: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.voice_relay is None:
            self.voice_relay = VoiceRelay(self.store)

    # -- what the centre tells us ----------------------------------------------------------------
    def on_center_event(self, event: Any) -> None:
        """CenterService's observer (paho's thread): push what changed about an alert to the
        open pages at once. Devices' records are pushed by the StoreWatcher (control_center/
        web/store_watch.py), which sees every instance's writes, within 0.2 s."""
        message = event.message
        if event.kind == "event" and self.voice_relay is not None:
            self.voice_relay.event_stored(message)
        if event.kind == "status" and message.get("active_alert_id"):
            self.publish_alert(message["active_alert_id"])  # what the device shows changed
        elif event.kind == "alert" and event.new:
            view = self.publish_alert(message["alert_id"])
            for sibling in view["incident"] if view else []:  # they gained a member
                self.publish_alert(sibling["alert_id"])
        elif event.kind in ("alert", "position", "event") and message.get("alert_id"):
            self.publish_alert(message["alert_id"])
        elif event.kind == "event":
            self.publish_device(event.device_id)  # a storage alert, say
        elif event.kind == "live" and event.new and self._first_chunk(str(message["alert_id"])):
            self.publish_alert(str(message["alert_id"]))  # its video can be played now

    def _first_chunk(self, alert_id: str) -> bool:
        """Whether this is the first accepted live chunk of the alert this console saw (chunk 0
        may be lost: live chunks go at QoS 0)."""
        return _first_time(self._live_started, alert_id, self._lock)

    def live_viewed(self, user: str, alert_id: str) -> bool:
        """Whether `user` opens this alert's live view for the first time (it is audited)."""
        return _first_time(self._live_viewed, (user, alert_id), self._lock)

    def device_changed(self, device_id: str) -> None:
        """A device's status changed (seen in the store): its record, and the alert it is
        raising (the record says what the device shows about it)."""
        self.publish_device(device_id)
        device = self.store.device(device_id)
        active = device["status"].get("active_alert_id") if device else None
        if active:
            self.publish_alert(active)

    def publish_alert(self, alert_id: str) -> dict[str, Any] | None:
        """Push the alert's view to the open pages; the view, or None if there is no alert."""
        record = self.store.alert(alert_id)
        if record is None:
            return None
        view = self.view(record)
        self.hub.publish("alert", view)
        return view

    def view(self, record: Any) -> dict[str, Any]:
        return alert_view(self.store, record, self.live_dir, self.routing)

    def shows(self, session: Session, alert: dict[str, Any]) -> bool:
        """Whether `session`'s queue shows this alert: an operator sees the alerts routed or
        escalated to a desk they work (all, if they work none, if the alert has no desk, or if
        no desk it reached lists any operator: an alert must reach someone); supervisors and
        auditors see every alert."""
        if session.role != "operator" or self.routing is None:
            return True
        routes = self.routing.routes
        return operator_sees(set(routes.desks_of(session.username)),
                             {d.id for d in routes.desks if d.operators}, alert.get("desks", []),
                             [s["to_desk"] for s in alert.get("escalations", [])])

    def fresh_fleet(self) -> Fleet | None:
        """The fleet registry as it is now: enrolments, renewals and revocations happen in
        another process (`sos-center ca`); a changed file is re-read (one stat otherwise)."""
        if self.fleet is not None:
            with self._lock:
                try:
                    self.fleet.reload_if_changed()
                except (OSError, ValueError) as exc:  # caught mid-write by hand: keep the last
                    log.warning("console: could not re-read the fleet registry: %s", exc)
        return self.fleet

    def publish_device(self, device_id: str) -> None:
        view = device_view(self.store, self.fresh_fleet(), device_id, self.clock())
        if view is not None:
            self.hub.publish("device", view)


def _first_time(seen: OrderedDict[Any, None], key: Any, lock: threading.Lock) -> bool:
    """True once per key (the newest LIVE_VIEWS_REMEMBERED keys are remembered)."""
    with lock:
        if key in seen:
            seen.move_to_end(key)
            return False
        seen[key] = None
        if len(seen) > LIVE_VIEWS_REMEMBERED:
            seen.popitem(last=False)
        return True


def build_app(console: Console) -> Starlette:
    routes = [
        Route("/", partial(_page, console), methods=["GET"]),
        Route("/login", _login_page, methods=["GET"]),
        Route("/api/login", partial(_login, console), methods=["POST"]),
        Route("/api/logout", partial(_logout, console), methods=["POST"]),
        Route("/api/me", partial(_me, console), methods=["GET"]),
        Route("/api/alerts", partial(_alerts, console), methods=["GET"]),
        Route("/api/alerts/{alert_id}", partial(_alert, console), methods=["GET"]),
        Route("/api/alerts/{alert_id}/voice", partial(_voice_offer, console), methods=["POST"]),
        Route("/api/alerts/{alert_id}/voice/hangup", partial(_voice_hangup, console),
              methods=["POST"]),
        Route("/api/voice", partial(_voice_config, console), methods=["GET"]),
        Route("/api/alerts/{alert_id}/{action}", partial(_act, console), methods=["POST"]),
        Route("/api/devices", partial(_devices, console), methods=["GET"]),
        Route("/api/dispatch", partial(_dispatch, console), methods=["POST"]),
        Route("/api/evidence", partial(_evidence, console), methods=["GET"]),
        Route("/api/evidence/{device_id}/calls/{call_id}/export",
              partial(_export, console), methods=["POST"]),
        Route("/api/exports/{export_id}/{name}", partial(_export_file, console),
              methods=["GET"]),
        Route("/live/{alert_id}/{name}", partial(_live_file, console), methods=["GET"]),
        Route("/events", partial(_events, console), methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _error},
                    middleware=[Middleware(SecurityHeaders, tiles=console.tiles),
                                Middleware(BodyLimit)])
    return app


# -- pages and accounts ------------------------------------------------------------------------
def _login_page(request: Request) -> Response:
    return FileResponse(STATIC / "login.html")


def _page(console: Console, request: Request) -> Response:
    if _current(console, request) is None:
        return RedirectResponse("/login", status_code=303)
    return FileResponse(STATIC / "index.html")


def _login(console: Console, request: Request) -> Response:
    body = _json_sync(request)
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise HTTPException(400, "give a user name and a password")
    _same_origin(request)
    # A password typed into the name field must not end up in the audit log.
    named = username if USERNAME.fullmatch(username) else "-"
    refusal = console.logins.refusal(named, console.clock())
    if refusal is not None:
        raise HTTPException(429, refusal)
    with console.logins.slot() as admitted:
        if not admitted:
            raise HTTPException(429, "too many log-ins at once: try again in a few seconds")
        session = console.accounts.login(username, password, console.clock())
    if session is None:
        console.logins.failed(named, console.clock())
        console.audit.append("console_login_failed", named, client=_client(request))
        raise HTTPException(401, "wrong user name or password")
    console.logins.succeeded(named)
    console.audit.append("console_login", session.username, role=session.role,
                         client=_client(request))
    response = JSONResponse(_me_json(console, session))
    # No Max-Age: the server ends the session (idle, 24 h, log-out, disable); a cookie that
    # expired on its own at the idle deadline counted from log-in would end a busy shift.
    response.set_cookie(COOKIE, session.token, secure=True, httponly=True, samesite="strict",
                        path="/")
    return response


def _logout(console: Console, request: Request) -> Response:
    session = _acting(console, request, None)
    console.accounts.logout(session.token)
    console.audit.append("console_logout", session.username, durable=False)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


def _me(console: Console, request: Request) -> Response:
    return JSONResponse(_me_json(console, _viewing(console, request, "view")))


def _me_json(console: Console, session: Session) -> dict[str, Any]:
    return {"user": session.username, "role": session.role, "rights": sorted(session.rights),
            "csrf": session.csrf, "tiles": console.tiles,
            "evidence": console.evidence is not None}


# -- alerts ------------------------------------------------------------------------------------
def _alerts(console: Console, request: Request) -> Response:
    session = _viewing(console, request, "view")
    records = console.store.alerts(open_only=True)
    if request.query_params.get("all") == "1":
        records += console.store.closed_alerts(CLOSED_SHOWN)
    records.sort(key=lambda r: r.stored_at, reverse=True)
    views = [console.view(r) for r in records]
    return JSONResponse({"alerts": [v for v in views if console.shows(session, v)]})


def _alert(console: Console, request: Request) -> Response:
    _viewing(console, request, "view")
    return JSONResponse(console.view(_record(console, request)))


def _record(console: Console, request: Request) -> Any:
    alert_id = request.path_params["alert_id"]
    record = console.store.alert(alert_id) if ALERT_ID.fullmatch(alert_id) else None
    if record is None:
        raise HTTPException(404, f"no alert {alert_id[:40]}")
    return record


def _act(console: Console, request: Request) -> Response:
    action = request.path_params["action"]
    if action not in ("claim", "ack", "close", "takeover"):
        raise HTTPException(404, f"no action {action[:20]}")
    session = _acting(console, request, "takeover" if action == "takeover" else "act")
    body = _json_sync(request) if action == "close" else {}
    record = _record(console, request)
    if action == "takeover":
        return _take_over(console, session, record)
    reason = None
    if action == "close":
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise HTTPException(400, "give a reason to close the alert")
        reason = reason.strip()
        if len(reason) > CLOSE_REASON_MAX:
            raise HTTPException(400, f"the reason is longer than {CLOSE_REASON_MAX} characters")
    if record.status == "closed":
        raise HTTPException(409, f"alert {record.alert_id[:8]} is closed")
    try:  # acknowledging or closing takes the alert first: one operator decides an alert
        record = console.store.claim(record.alert_id, session.username, console.clock())
    except AlreadyClaimed as exc:
        raise HTTPException(409, str(exc)) from None
    if action == "claim":
        console.audit.append("console_claim", session.username, alert_id=record.alert_id)
        console.publish_alert(record.alert_id)
        return JSONResponse(console.view(record))
    details = {"alert_id": record.alert_id, **({"reason": reason} if reason else {})}
    command = _send(console, session.username, action, details, lambda: (
        console.commands.send_command(record.alert_id, action, session.username, note=reason)))
    console.audit.append(f"console_{action}", session.username, **details,
                         command_id=command["command_id"], delivered=command["delivered"])
    console.publish_alert(record.alert_id)
    return JSONResponse({"command": _command_json(command, record.device_id)}, status_code=202)


def _take_over(console: Console, session: Session, record: Any) -> Response:
    """A supervisor takes an alert someone else holds (who left, or cannot act)."""
    if record.status == "closed":
        raise HTTPException(409, f"alert {record.alert_id[:8]} is closed")
    before = console.store.take_over(record.alert_id, session.username, console.clock())
    console.audit.append("console_takeover", session.username, alert_id=record.alert_id,
                         taken_from=before)
    console.publish_alert(record.alert_id)
    return JSONResponse(console.view(console.store.alert(record.alert_id)))


def _send(console: Console, user: str, action: str, details: dict[str, Any],
          send: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Send a command; when the broker does not confirm it, answer 503 and audit that. The
    command is recorded before it is published, so it may still reach the device (paho sends
    it on reconnecting; the centre re-sends a decision a device missed): the answer says so."""
    try:
        return send()
    except CommandError as exc:
        console.audit.append(f"console_{action}_unconfirmed", user, **details, error=str(exc))
        raise HTTPException(503, f"the broker did not confirm the {action} ({exc}); it is "
                                 "recorded and may still reach the device: check the alert "
                                 "before you try again") from None


def _command_json(command: dict[str, Any], device_id: str) -> dict[str, Any]:
    keys = ("command_id", "type", "alert_id", "call_id", "operator", "delivered")
    return {"device_id": device_id, **{k: command[k] for k in keys if k in command}}


# -- voice (docs/VOICE.md) ---------------------------------------------------------------------
def _voice_config(console: Console, request: Request) -> Response:
    """The browser's STUN/TURN servers, with TURN credentials of the user's own."""
    session = _viewing(console, request, "act")
    timeout = console.voice.answer_timeout_s if console.voice else VOICE_ANSWER_S
    relay = bool(console.voice and console.voice.relay_only)
    return JSONResponse({"ice_servers": ice_servers(console.voice, session.username,
                                                    console.clock()),
                         "ice_transport_policy": "relay" if relay else "all",
                         "answer_timeout_s": timeout})


def _voice_offer(console: Console, request: Request) -> Response:
    """Offer a call to the alert's device and answer with its SDP: the operator talks (pillar)
    or listens in (token). Taking the alert first, as acknowledging does."""
    session = _acting(console, request, "act")
    body = _json_sync(request)
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.startswith("v=0") or not sdp.isascii() \
            or len(sdp) > SDP_MAX:
        raise HTTPException(400, f"give the browser's SDP offer (ASCII, at most {SDP_MAX} "
                                 "characters)")
    record = _record(console, request)
    if record.status == "closed":
        raise HTTPException(409, f"alert {record.alert_id[:8]} is closed")
    try:
        record = console.store.claim(record.alert_id, session.username, console.clock())
    except AlreadyClaimed as exc:
        raise HTTPException(409, str(exc)) from None
    voice_session = new_session()
    timeout = console.voice.answer_timeout_s if console.voice else VOICE_ANSWER_S
    fields = {"type": "voice_offer", "voice_session": voice_session, "sdp": sdp,
              "ice_servers": ice_servers(console.voice, record.device_id, console.clock())}
    details = {"alert_id": record.alert_id, "voice_session": voice_session}
    command = _send(console, session.username, "voice_offer", details, lambda: (
        console.commands.send_voice(record.alert_id, fields, session.username)))
    console.audit.append("console_voice_offer", session.username, **details,
                         command_id=command["command_id"], delivered=command["delivered"])
    console.publish_alert(record.alert_id)
    assert console.voice_relay is not None
    try:
        answer = console.voice_relay.wait_answer(record.alert_id, voice_session,
                                                 command["command_id"], timeout)
    except VoiceUnanswered as exc:
        console.audit.append("console_voice_unanswered", session.username, **details,
                             error=str(exc))
        raise HTTPException(409 if isinstance(exc, VoiceRefused) else 504, str(exc)) from None
    return JSONResponse({"voice_session": voice_session, "sdp": answer["sdp"],
                         "device_id": record.device_id})


def _voice_hangup(console: Console, request: Request) -> Response:
    """The operator leaves the call; the alert stays open (closing it ends the call too). Only
    the operator who holds the alert (whose call it is) may hang up."""
    session = _acting(console, request, "act")
    body = _json_sync(request)
    voice_session = body.get("voice_session")
    if not isinstance(voice_session, str) or not SESSION.fullmatch(voice_session):
        raise HTTPException(400, "give the call's voice_session")
    record = _record(console, request)
    if record.status == "closed":  # the close ended the call on the device already
        return JSONResponse({"ended": "with the alert"})
    if record.claimed_by != session.username:
        raise HTTPException(409, f"alert {record.alert_id[:8]} is held by "
                                 f"{record.claimed_by or 'nobody'}: only they can hang up")
    details = {"alert_id": record.alert_id, "voice_session": voice_session}
    command = _send(console, session.username, "voice_hangup", details, lambda: (
        console.commands.send_voice(record.alert_id, {"type": "voice_hangup",
                                                      "voice_session": voice_session},
                                    session.username)))
    console.audit.append("console_voice_hangup", session.username, **details,
                         command_id=command["command_id"])
    return JSONResponse({"command": _command_json(command, record.device_id)}, status_code=202)


# -- fleet and dispatch ------------------------------------------------------------------------
def _devices(console: Console, request: Request) -> Response:
    _viewing(console, request, "view")
    return JSONResponse({"devices": device_views(console.store, console.fresh_fleet(),
                                                 console.clock())})


def _dispatch(console: Console, request: Request) -> Response:
    body = _json_sync(request)
    session = _acting(console, request, "act")
    device_id, kind, call_id = body.get("device_id"), body.get("kind"), body.get("call_id")
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise HTTPException(400, "choose a device")
    if kind not in ("call_start", "call_end"):
        raise HTTPException(400, "kind must be call_start or call_end")
    if kind == "call_start" and (not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id)):
        raise HTTPException(400, "a call start needs a call id (letters, digits, . _ : -)")
    if console.store.device(device_id) is None:
        raise HTTPException(404, f"device {device_id} has never reported to this centre")
    details = {"device_id": device_id, "kind": kind,
               "call_id": call_id if kind == "call_start" else None}
    command = _send(console, session.username, "dispatch", details, lambda: (
        console.commands.send_call(device_id, kind, session.username, details["call_id"])))
    console.audit.append("console_dispatch", session.username, **details,
                         command_id=command["command_id"], delivered=command["delivered"])
    return JSONResponse({"command": _command_json(command, device_id)}, status_code=202)


# -- evidence ----------------------------------------------------------------------------------
def _evidence(console: Console, request: Request) -> Response:
    session = _viewing(console, request, "evidence")
    if console.evidence is None:
        raise HTTPException(404, "no evidence directory is configured (console.evidence_dir)")
    return JSONResponse(console.evidence.overview(session.username))


def _export(console: Console, request: Request) -> Response:
    session = _acting(console, request, "export")
    if console.evidence is None:
        raise HTTPException(404, "no evidence directory is configured (console.evidence_dir)")
    try:
        export = console.evidence.export(session.username, request.path_params["device_id"],
                                         request.path_params["call_id"])
    except CallRefused as exc:  # it does not verify: the report's words
        raise HTTPException(409, str(exc)) from None
    except EvidenceError as exc:  # e.g. no evidence key on this host
        raise HTTPException(503, str(exc)) from None
    except (LookupError, InvalidId) as exc:
        raise HTTPException(404 if isinstance(exc, LookupError) else 400, str(exc)) from None
    console.store.add_export(export, session.username, console.clock())
    return JSONResponse({"export": export})


def _export_file(console: Console, request: Request) -> Response:
    session = _viewing(console, request, "export")
    if console.evidence is None:
        raise HTTPException(404, "no evidence directory is configured")
    try:
        path = console.evidence.export_file(request.path_params["export_id"],
                                            request.path_params["name"])
    except (LookupError, ValueError) as exc:
        raise HTTPException(404, str(exc)) from None
    console.audit.append("console_evidence_download", session.username,
                         export_id=request.path_params["export_id"], file=path.name)
    return FileResponse(path, filename=path.name)


# -- live video and events ---------------------------------------------------------------------
def _live_file(console: Console, request: Request) -> Response:
    session = _viewing(console, request, "view")
    alert_id, name = request.path_params["alert_id"], request.path_params["name"]
    if (console.live_dir is None or not ALERT_ID.fullmatch(alert_id)
            or not LIVE_FILE.fullmatch(name)):
        raise HTTPException(404, "no such live file")
    path = console.live_dir / alert_id / name
    if not path.is_file():
        raise HTTPException(404, "no such live file")
    if console.live_viewed(session.username, alert_id):
        console.audit.append("console_live_view", session.username, alert_id=alert_id,
                             durable=False)
    if name.startswith("chunk-"):  # written once, never changed: served from the file
        return FileResponse(path, media_type="video/mp2t", headers={"Cache-Control": "no-cache"})
    # The playlist and live.ts are replaced while the stream runs (a rename): one read of one
    # open file, so the length sent is the length of the bytes sent.
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise HTTPException(404, "no such live file") from None
    media = "application/vnd.apple.mpegurl" if name.endswith(".m3u8") else "video/mp2t"
    return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})


async def _events(console: Console, request: Request) -> Response:
    session = await _in_thread(_viewing, console, request, "view")

    def wants(kind: str, data: dict[str, Any]) -> bool:
        return kind != "alert" or console.shows(session, data)

    async def still_allowed() -> bool:  # log-out, disable or expiry ends the stream too
        return await _in_thread(_current, console, request) is not None

    return StreamingResponse(console.hub.stream(request.is_disconnected, still_allowed, wants),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# -- sessions, rights and CSRF -----------------------------------------------------------------
def _current(console: Console, request: Request) -> Session | None:
    token = request.cookies.get(COOKIE)
    return console.accounts.session(token, console.clock()) if token else None


def _viewing(console: Console, request: Request, right: str) -> Session:
    session = _current(console, request)
    if session is None:
        raise HTTPException(401, "log in first")
    if right not in session.rights:
        raise HTTPException(403, f"{session.username} ({session.role}) may not do this")
    return session


def _acting(console: Console, request: Request, right: str | None) -> Session:
    """A state-changing request: a session, the right, and the session's CSRF token in the
    X-CSRF-Token header (SameSite=Strict already keeps other sites' requests cookie-less; the
    token also refuses a request made by anything that cannot read our pages)."""
    session = _viewing(console, request, right or "view")
    if not Accounts.check_csrf(session, request.headers.get("x-csrf-token")):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page")
    _same_origin(request)
    return session


def _same_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin is not None and origin != f"https://{request.headers.get('host', '')}":
        raise HTTPException(403, "request from another origin refused")


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


def _json_sync(request: Request) -> dict[str, Any]:
    """The body of a request handled on a worker thread (read before it by BodyLimit)."""
    return _parse_json(request.scope.get("sos.body", b""))


def _parse_json(raw: bytes) -> dict[str, Any]:
    from protocol.untrusted import UntrustedJsonError, loads_untrusted

    if not raw:
        return {}
    try:
        body = loads_untrusted(raw)
    except UntrustedJsonError as exc:
        raise HTTPException(400, f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


class SecurityHeaders:
    """Strict headers on every answer (the outer middleware: a refusal by BodyLimit gets them
    too)."""

    def __init__(self, app: ASGIApp, tiles: dict[str, str] | None) -> None:
        self.app = app
        self.csp = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                    f"img-src 'self' data: blob:{tile_source(tiles)}; media-src 'self' blob:; "
                    "connect-src 'self'; worker-src 'self'; frame-ancestors 'none'; "
                    "base-uri 'none'; form-action 'self'")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                for name, value in (
                        ("content-security-policy", self.csp),
                        ("x-content-type-options", "nosniff"),
                        ("referrer-policy", "no-referrer"),
                        ("x-frame-options", "DENY"),
                        ("strict-transport-security", "max-age=31536000")):
                    headers.append((name.encode(), value.encode()))
                if scope["path"].startswith("/api/"):
                    headers.append((b"cache-control", b"no-store"))
            await send(message)

        await self.app(scope, receive, with_headers)


def tile_source(tiles: dict[str, str] | None) -> str:
    """The tile server as a CSP source (` https://*.tiles.example`); Leaflet's `{s}` subdomain
    placeholder becomes CSP's `*`."""
    if not tiles:
        return ""
    match = re.match(r"https://[^/]+", tiles["url"])
    return " " + match.group(0).replace("{s}", "*") if match else ""


class BodyLimit:
    """Reads a POST's whole body before its handler runs (sync handlers run on a worker
    thread, where it cannot be awaited) and refuses one over MAX_BODY with 413."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, receive = await _buffer(receive)
        if body is None:
            too_large = JSONResponse({"error": "request too large"}, status_code=413,
                                     headers={"Connection": "close"})
            await too_large(scope, receive, send)
            return
        scope["sos.body"] = body
        await self.app(scope, receive, send)


async def _buffer(receive: Receive) -> tuple[bytes | None, Receive]:
    """Read a request's body and replay it to the app; None as soon as it is over MAX_BODY
    (the rest is not read: the answer closes the connection)."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None, receive
        chunks.append(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay
