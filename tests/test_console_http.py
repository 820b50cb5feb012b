"""The console's HTTP side as a client sees it over real TLS: sessions, cookies, headers,
refusals, the event stream, and `sos-center serve` with a `[console]` section.

What a person sees in the page is tested in Chromium (test_console_browser.py); these check
what no page shows: the cookie's flags, the headers, the answers to requests no page makes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from control_center import pki
from control_center.store import Store
from control_center.web.accounts import Accounts
from simulator.broker import HOST
from simulator.console_rig import PASSWORD, ConsoleRig
from tests.helpers import alert_message, raise_alert, send_alert


class Client:
    """One browser-like client: keeps the session cookie and the CSRF token."""

    def __init__(self, rig: ConsoleRig) -> None:
        self.url = urlsplit(rig.url)
        self.context = ssl.create_default_context(cafile=str(rig.broker.fleet.ca.cert_file))
        self.cookie: str | None = None
        self.csrf: str | None = None

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.url.hostname, self.url.port, timeout=20,
                                           context=self.context)

    def request(self, method: str, path: str, body: Any = None, *, csrf: bool = True,
                headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if self.cookie:
            sent["Cookie"] = self.cookie
        if csrf and self.csrf:
            sent["X-CSRF-Token"] = self.csrf
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        connection = self.connection()
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        text = response.read()
        connection.close()
        answer = json.loads(text) if response.getheader("content-type", "").startswith(
            "application/json") else text
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer

    def log_in(self, user: str, password: str = PASSWORD) -> tuple[int, dict[str, str], Any]:
        status, headers, body = self.request("POST", "/api/login",
                                             {"username": user, "password": password})
        if status == 200:
            self.cookie = headers["set-cookie"].split(";", 1)[0]
            self.csrf = body["csrf"]
        return status, headers, body


@pytest.fixture
def rig(broker, tmp_path: Path) -> Iterator[ConsoleRig]:
    running = ConsoleRig(tmp_path / "centre", broker)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def alice(rig: ConsoleRig) -> Client:
    client = Client(rig)
    assert client.log_in("alice")[0] == 200
    return client


# -- sessions ----------------------------------------------------------------------------------
def test_the_session_cookie_is_secure_httponly_and_samesite_strict(rig: ConsoleRig) -> None:
    status, headers, _ = Client(rig).log_in("alice")
    flags = {part.strip().lower() for part in headers["set-cookie"].split(";")[1:]}
    assert status == 200
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags
    assert not any(flag.startswith("max-age") for flag in flags)  # the server ends it


def test_a_name_with_five_wrong_passwords_is_refused_for_a_minute(rig: ConsoleRig) -> None:
    for _ in range(5):
        assert Client(rig).log_in("alice", "not the right password")[0] == 401
    status, _, body = Client(rig).log_in("alice")  # even the right password, for now
    assert status == 429 and "try again" in body["error"]
    assert Client(rig).log_in("bob")[0] == 200  # another name is not affected


def test_a_password_typed_as_the_name_is_not_audited(rig: ConsoleRig) -> None:
    Client(rig).log_in("Hunter2 Hunter2!", "x")
    assert "Hunter2" not in rig.config.audit_log.read_text()


def test_without_a_session_the_api_answers_401_and_the_page_sends_to_log_in(
        rig: ConsoleRig) -> None:
    client = Client(rig)
    assert client.request("GET", "/api/alerts")[0] == 401
    status, headers, _ = client.request("GET", "/")
    assert (status, headers["location"]) == (303, "/login")


def test_a_wrong_password_and_an_unknown_name_get_the_same_answer(rig: ConsoleRig) -> None:
    wrong = Client(rig).log_in("alice", "not the right password")
    unknown = Client(rig).log_in("mallory", "not the right password")
    assert wrong[0] == unknown[0] == 401
    assert wrong[2] == unknown[2]


def test_a_failed_log_in_is_written_to_the_audit_log(rig: ConsoleRig) -> None:
    Client(rig).log_in("alice", "not the right password")
    lines = [json.loads(line) for line in rig.config.audit_log.read_text().splitlines()]
    assert any(e["event"] == "console_login_failed" and e["actor"] == "alice" for e in lines)


def test_disabling_a_user_ends_her_session_at_once(rig: ConsoleRig, alice: Client) -> None:
    with Accounts(rig.workdir / "center.sqlite") as accounts:
        accounts.disable("alice")
    assert alice.request("GET", "/api/me")[0] == 401


def test_a_non_ascii_csrf_token_is_refused_not_an_error(rig: ConsoleRig, alice: Client) -> None:
    alice.csrf = "\xe9t\xe9"
    alert_id = raise_alert(rig, "tok-http-01")
    assert alice.request("POST", f"/api/alerts/{alert_id}/claim", {})[0] == 403


def test_log_out_ends_the_session_on_the_server(rig: ConsoleRig, alice: Client) -> None:
    assert alice.request("POST", "/api/logout", {})[0] == 204
    assert alice.request("GET", "/api/me")[0] == 401


# -- refusals ----------------------------------------------------------------------------------
def test_a_post_from_another_origin_is_refused(rig: ConsoleRig, alice: Client) -> None:
    alert_id = raise_alert(rig, "tok-http-01")
    status, _, body = alice.request("POST", f"/api/alerts/{alert_id}/claim", {},
                                    headers={"Origin": "https://evil.example"})
    assert status == 403 and "origin" in body["error"]
    assert rig.store.alert(alert_id).claimed_by is None


def test_a_body_over_the_limit_is_refused_with_the_strict_headers(rig: ConsoleRig,
                                                                  alice: Client) -> None:
    status, headers, _ = alice.request("POST", "/api/dispatch",
                                       raw=b"{" + b" " * 20_000 + b"}")
    assert status == 413
    assert "script-src 'self'" in headers["content-security-policy"]


def test_a_second_operator_may_not_acknowledge_an_alert_taken_by_another(
        rig: ConsoleRig, alice: Client) -> None:
    alert_id = raise_alert(rig, "tok-http-01")
    assert alice.request("POST", f"/api/alerts/{alert_id}/claim", {})[0] == 200
    bob = Client(rig)
    bob.log_in("bob")
    status, _, body = bob.request("POST", f"/api/alerts/{alert_id}/ack", {})
    assert status == 409 and "taken by alice" in body["error"]
    assert rig.store.commands(alert_id) == []


def test_a_supervisor_takes_over_an_alert_and_it_is_audited(rig: ConsoleRig,
                                                            alice: Client) -> None:
    alert_id = raise_alert(rig, "tok-http-01")
    alice.request("POST", f"/api/alerts/{alert_id}/claim", {})
    bob, sam = Client(rig), Client(rig)
    bob.log_in("bob")
    sam.log_in("sam")
    assert bob.request("POST", f"/api/alerts/{alert_id}/takeover", {})[0] == 403
    status, _, view = sam.request("POST", f"/api/alerts/{alert_id}/takeover", {})
    assert (status, view["claimed_by"]) == (200, "sam")
    lines = [json.loads(line) for line in rig.config.audit_log.read_text().splitlines()]
    assert any(e["event"] == "console_takeover" and e["actor"] == "sam"
               and e["taken_from"] == "alice" for e in lines)


def test_only_the_operator_holding_an_alert_may_hang_up_its_call(rig: ConsoleRig,
                                                                 alice: Client) -> None:
    alert_id = raise_alert(rig, "tok-http-01")
    assert alice.request("POST", f"/api/alerts/{alert_id}/claim", {})[0] == 200
    bob = Client(rig)
    bob.log_in("bob")
    status, _, body = bob.request("POST", f"/api/alerts/{alert_id}/voice/hangup",
                                  {"voice_session": "5e" * 16})
    assert status == 409 and "alice" in body["error"]
    assert rig.store.commands(alert_id) == []


def test_a_voice_offer_that_is_not_an_ascii_sdp_is_refused_and_nothing_is_sent(
        rig: ConsoleRig, alice: Client) -> None:
    alert_id = raise_alert(rig, "tok-http-01")
    for sdp in ("hello", "v=0\r\ns=\u00e9\r\n", "v=0\r\n" + "a" * 10_000):
        status, _, body = alice.request("POST", f"/api/alerts/{alert_id}/voice", {"sdp": sdp})
        assert status == 400 and "SDP" in body["error"]
    assert rig.store.commands(alert_id) == []


def test_a_closed_alert_cannot_be_acknowledged(rig: ConsoleRig, alice: Client) -> None:
    alert_id = raise_alert(rig, "tok-http-01")
    rig.store.mark(alert_id, "close", "another centre", at=time.time())
    status, _, body = alice.request("POST", f"/api/alerts/{alert_id}/ack", {})
    assert status == 409 and "closed" in body["error"]
    assert rig.store.commands(alert_id) == []


def test_with_the_broker_down_an_ack_is_answered_503_saying_it_may_still_go(
        rig: ConsoleRig, alice: Client) -> None:
    alert_id = raise_alert(rig, "tok-http-01")
    rig.broker.stop()
    status, _, body = alice.request("POST", f"/api/alerts/{alert_id}/ack", {})
    assert status == 503 and "may still reach the device" in body["error"]
    lines = [json.loads(line) for line in rig.config.audit_log.read_text().splitlines()]
    assert any(e["event"] == "console_ack_unconfirmed" and e["actor"] == "alice"
               and e["alert_id"] == alert_id for e in lines)


def test_closing_without_a_reason_is_refused_and_nothing_is_sent(rig: ConsoleRig,
                                                                 alice: Client) -> None:
    alert_id = raise_alert(rig, "tok-http-01")
    status, _, body = alice.request("POST", f"/api/alerts/{alert_id}/close", {"reason": " "})
    assert status == 400 and "reason" in body["error"]
    assert rig.store.commands(alert_id) == []


def test_an_auditor_may_not_dispatch(rig: ConsoleRig) -> None:
    audrey = Client(rig)
    audrey.log_in("audrey")
    status, _, _ = audrey.request("POST", "/api/dispatch", {"device_id": "tok-http-01",
                                                            "kind": "call_end"})
    assert status == 403
    assert rig.store.commands("") == []


def test_live_files_are_served_only_by_name(rig: ConsoleRig, alice: Client) -> None:
    assert alice.request("GET", "/live/" + "0" * 32 + "/..%2Fstream.json")[0] == 404
    assert alice.request("GET", "/live/" + "0" * 32 + "/index.m3u8")[0] == 404


# -- headers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/login", "/api/me", "/static/console.js"])
def test_every_answer_carries_the_strict_headers(rig: ConsoleRig, alice: Client,
                                                 path: str) -> None:
    _, headers, _ = alice.request("GET", path)
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"


# -- the event stream --------------------------------------------------------------------------
@pytest.fixture
def stream(alice: Client) -> Iterator[queue.Queue[tuple[str, dict]]]:
    """alice's open event stream: (event, data) as they arrive."""
    connection = alice.connection()
    connection.request("GET", "/events", headers={"Cookie": alice.cookie or ""})
    response = connection.getresponse()
    assert response.getheader("content-type").startswith("text/event-stream")
    assert response.readline().startswith(b": connected")
    events: queue.Queue[tuple[str, dict]] = queue.Queue()

    def read() -> None:
        kind = None
        # The test closes the connection while this reads: http.client then raises.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            for line in response:
                if line.startswith(b"event: "):
                    kind = line[7:].strip().decode()
                elif line.startswith(b"data: ") and kind:
                    events.put((kind, json.loads(line[6:])))
        events.put(("end", {}))  # the server ended the stream

    threading.Thread(target=read, daemon=True).start()
    yield events
    connection.close()


def next_alert_event(events: queue.Queue[tuple[str, dict]], alert_id: str) -> dict:
    while True:
        kind, data = events.get(timeout=10)
        if kind == "alert" and data["alert_id"] == alert_id:
            return data


def test_a_stored_alert_is_pushed_to_an_open_event_stream(rig: ConsoleRig, stream) -> None:
    alert_id = raise_alert(rig, "tok-http-01")
    data = next_alert_event(stream, alert_id)
    assert data["status"] == "open" and data["device_id"] == "tok-http-01"


def test_a_disabled_users_open_event_stream_ends(rig: ConsoleRig, alice: Client,
                                                 stream) -> None:
    with Accounts(rig.workdir / "center.sqlite") as accounts:
        accounts.disable("alice")
    assert stream.get(timeout=15) == ("end", {})


def test_an_alert_another_instance_stored_is_pushed_too(rig: ConsoleRig, stream) -> None:
    """Instances sharing the store split the alerts: this console must show the others'."""
    other_instance = Store(rig.workdir / "center.sqlite")
    alert = alert_message("tok-http-02")
    other_instance.add_alert(alert, stored_at=time.time())
    assert next_alert_event(stream, alert["alert_id"])["device_id"] == "tok-http-02"
    other_instance.close()


# -- sos-center serve --------------------------------------------------------------------------
def centre_config(broker, tmp_path: Path, console: str) -> Path:
    b = broker.centre
    path = tmp_path / "center.toml"
    path.write_text(f'[center]\ndb = "{tmp_path / "center.sqlite"}"\n'
                    f'fleet_dir = "{broker.fleet.directory}"\n'
                    f'[broker]\nhost = "{b.host}"\nport = {b.port}\nca_file = "{b.ca_file}"\n'
                    f'cert_file = "{b.cert_file}"\nkey_file = "{b.key_file}"\n{console}')
    return path


def test_serve_with_a_console_section_serves_the_console(broker, tmp_path: Path) -> None:
    server = pki.issue_server_cert(broker.fleet.ca, tmp_path / "tls", "console", [HOST])
    config = centre_config(broker, tmp_path, f'[console]\nlisten = "{HOST}"\nport = 0\n'
                           f'cert_file = "{server.cert_file}"\nkey_file = "{server.key_file}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "control_center.cli", "--config", str(config),
                             "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        line = lines.get(timeout=30)
        assert "operator console at https://" in line
        url = urlsplit(line.split("operator console at ", 1)[1].split(";")[0].strip())
        context = ssl.create_default_context(cafile=str(broker.fleet.ca.cert_file))
        connection = http.client.HTTPSConnection(HOST, url.port, timeout=10, context=context)
        connection.request("GET", "/login")
        assert connection.getresponse().status == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_serve_refuses_a_key_that_is_not_the_certificates(broker, tmp_path: Path) -> None:
    one = pki.issue_server_cert(broker.fleet.ca, tmp_path / "one", "console", [HOST])
    other = pki.issue_server_cert(broker.fleet.ca, tmp_path / "other", "console", [HOST])
    config = centre_config(broker, tmp_path, f'[console]\ncert_file = "{one.cert_file}"\n'
                                             f'key_file = "{other.key_file}"\n')
    done = subprocess.run([sys.executable, "-m", "control_center.cli", "--config", str(config),
                           "serve"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "key 'console.key_file'" in done.stderr and "not the key" in done.stderr


def test_serve_refuses_a_missing_console_certificate_naming_the_key(broker,
                                                                    tmp_path: Path) -> None:
    config = centre_config(broker, tmp_path, '[console]\ncert_file = "nope.pem"\n'
                                             'key_file = "nope.key"\n')
    done = subprocess.run([sys.executable, "-m", "control_center.cli", "--config", str(config),
                           "serve"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "key 'console.cert_file'" in done.stderr


def test_serve_routes_an_alert_and_prints_its_escalation(broker, tmp_path: Path) -> None:
    config = centre_config(broker, tmp_path, '''
[[desks]]
id = "north"
name = "North"
escalate_after_s = 1
next = "south"

[[desks]]
id = "south"
name = "South"

[[routes]]
name = "all to north"
desks = ["north"]
''')
    proc = subprocess.Popen([sys.executable, "-m", "control_center.cli", "--config", str(config),
                             "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        assert "sos-center serving" in lines.get(timeout=30)
        device_id = "tok-serve-01"
        message = send_alert(broker, device_id)
        while not (line := lines.get(timeout=30)).startswith("ESCALATED"):
            pass
        assert message["alert_id"][:8] in line and "desk south" in line
        store = Store(tmp_path / "center.sqlite")
        assert store.alert(message["alert_id"]).desks == ("north",)
        store.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
