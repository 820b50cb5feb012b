"""Tell a running broker who may do what: enrolments and revocations without a restart.

The broker's dynamic-security plugin (docs/DESIGN.md, "Broker: each identity does only its job")
loads its configuration at start and is changed afterwards only through its control topic,
`$CONTROL/dynamic-security/v1`. `BrokerAdmin.sync` compares what the broker has with what the
registry says (`render_broker_access`) and sends only the difference: a new identity gets its
client and role, a revoked one is deleted, which disconnects it at once (the plugin kicks every
connection with that user name). It connects as the fleet's administrator, `admin.fleet`.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from typing import Any

from control_center.fleet import Fleet, FleetError, render_broker_access
from protocol import new_id
from protocol.mqtt import BrokerConfig, make_client

REQUEST_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
AclKey = tuple[str, str, int, bool]


class BrokerAdminError(FleetError):
    """The broker could not be reached or refused a change; the text says what to do."""


def admin_config(fleet: Fleet, host: str, port: int) -> BrokerConfig:
    """How the fleet's administrator reaches the broker at host:port (made on first use)."""
    pair = fleet.broker_admin()
    return BrokerConfig(host, port, ca_file=str(fleet.ca.cert_file),
                        cert_file=str(pair.cert_file), key_file=str(pair.key_file))


class BrokerAdmin:
    """A short-lived connection to the plugin's control topic: `with BrokerAdmin(cfg) as a:`."""

    def __init__(self, broker: BrokerConfig, timeout_s: float = 10.0) -> None:
        self._broker = broker
        self._timeout_s = timeout_s
        self._responses: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready = threading.Event()
        self._refused: str | None = None
        self._client = make_client("admin", broker)  # the broker makes it the identity anyway
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def __enter__(self) -> BrokerAdmin:
        self._client.connect_async(self._broker.host, self._broker.port, clean_start=True)
        self._client.loop_start()
        if not self._ready.wait(self._timeout_s) or self._refused:
            self.close()
            raise BrokerAdminError(
                f"could not administer the broker at {self._broker.host}:{self._broker.port}"
                f" ({self._refused or 'no answer'}); if it started before admin.fleet was "
                f"enrolled, restart it with a configuration from `sos-center ca broker-config`")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # -- requests --------------------------------------------------------------------------------
    def request(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one message; their responses, in order. Raises on any error."""
        if not commands:
            return []
        tag = new_id()
        tagged = [{**c, "correlationData": f"{tag}:{i}"} for i, c in enumerate(commands)]
        self._client.publish(REQUEST_TOPIC, json.dumps({"commands": tagged}), qos=1)
        responses = self._wait_for(tag)
        errors = [f"{r['command']}: {r['error']}" for r in responses if r.get("error")]
        if errors:
            raise BrokerAdminError(f"the broker refused: {'; '.join(errors)}")
        return responses

    def sync(self, fleet: Fleet) -> list[str]:
        """Bring the broker's access list up to the registry's; what changed, one line each."""
        fleet.broker_admin()  # so the plan never deletes the administrator itself
        clients, roles, default = self.request([
            {"command": "listClients", "verbose": True},
            {"command": "listRoles", "verbose": True},
            {"command": "getDefaultACLAccess"},
        ])
        commands = plan(
            {"clients": clients["data"]["clients"], "roles": roles["data"]["roles"],
             "defaultACLAccess": {a["acltype"]: a["allow"] for a in default["data"]["acls"]}},
            render_broker_access(fleet))
        self.request(commands)
        return [describe(c) for c in commands]

    # -- paho callbacks --------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = f"connection refused: {reason_code}"
            self._ready.set()
            return
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if reason_codes[0].is_failure:
            self._refused = f"{RESPONSE_TOPIC} refused: {reason_codes[0]}"
        self._ready.set()

    def _on_message(self, client, userdata, message) -> None:
        with contextlib.suppress(ValueError):  # not ours to judge: _wait_for skips it
            self._responses.put(json.loads(message.payload))

    def _wait_for(self, tag: str) -> list[dict[str, Any]]:
        """The responses to our request (another administrator's are skipped)."""
        while True:
            try:
                answer = self._responses.get(timeout=self._timeout_s)
            except queue.Empty:
                raise BrokerAdminError("the broker did not answer the dynamic-security request "
                                       f"within {self._timeout_s:.0f} s") from None
            responses = answer.get("responses", [])
            if any(str(r.get("correlationData", "")).startswith(f"{tag}:") for r in responses):
                return responses


def sync_broker(fleet: Fleet, host: str, port: int) -> list[str]:
    """Connect as the fleet's administrator and bring the broker at host:port up to date."""
    with BrokerAdmin(admin_config(fleet, host, port)) as admin:
        return admin.sync(fleet)


# -- the difference between two plugin configurations ------------------------------------------
def plan(current: dict[str, Any], desired: dict[str, Any]) -> list[dict[str, Any]]:
    """The control commands that turn `current` (what listClients/listRoles/getDefaultACLAccess
    report) into `desired` (render_broker_access): roles first, so clients can name them;
    deletions last."""
    return [*_default_commands(current["defaultACLAccess"], desired["defaultACLAccess"]),
            *_role_commands(current["roles"], desired["roles"]),
            *_client_commands(current["clients"], desired["clients"]),
            *({"command": "deleteRole", "rolename": name} for name in sorted(
                {r["rolename"] for r in current["roles"]}
                - {r["rolename"] for r in desired["roles"]}))]


def _default_commands(current: dict[str, bool], desired: dict[str, bool]) -> list[dict[str, Any]]:
    if current == desired:
        return []
    return [{"command": "setDefaultACLAccess",
             "acls": [{"acltype": k, "allow": v} for k, v in desired.items()]}]


def _acl_keys(acls: list[dict[str, Any]]) -> dict[AclKey, dict[str, Any]]:
    return {(a["acltype"], a["topic"], a.get("priority", 0), a["allow"]): a for a in acls}


def _role_commands(current: list[dict[str, Any]],
                   desired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    have = {r["rolename"]: _acl_keys(r.get("acls", [])) for r in current}
    commands: list[dict[str, Any]] = []
    for role in desired:
        name, want = role["rolename"], _acl_keys(role["acls"])
        if name not in have:
            commands.append({"command": "createRole", "rolename": name, "acls": role["acls"]})
            continue
        commands += [{"command": "removeRoleACL", "rolename": name, "acltype": k[0],
                      "topic": k[1]} for k in have[name].keys() - want.keys()]
        commands += [{"command": "addRoleACL", "rolename": name, **want[k]}
                     for k in want.keys() - have[name].keys()]
    return commands


def _client_commands(current: list[dict[str, Any]],
                     desired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    have = {c["username"]: {r["rolename"] for r in c.get("roles", [])} for c in current}
    want = {c["username"]: {r["rolename"] for r in c["roles"]} for c in desired}
    commands: list[dict[str, Any]] = []
    for name in sorted(want):
        if name not in have:
            commands.append({"command": "createClient", "username": name,
                             "roles": [{"rolename": r} for r in sorted(want[name])]})
            continue
        commands += [{"command": "addClientRole", "username": name, "rolename": r}
                     for r in sorted(want[name] - have[name])]
        commands += [{"command": "removeClientRole", "username": name, "rolename": r}
                     for r in sorted(have[name] - want[name])]
    commands += [{"command": "deleteClient", "username": name}
                 for name in sorted(have.keys() - want.keys())]
    return commands


def describe(command: dict[str, Any]) -> str:
    """One line for an operator: `deleteClient tok-amb-0412 (disconnected)`."""
    what = command.get("username") or command.get("rolename") or ""
    note = " (disconnected)" if command["command"] == "deleteClient" else ""
    return f"{command['command']} {what}{note}".strip()

