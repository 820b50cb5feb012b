"""The broker lets each identity do only its job (docs/DESIGN.md, "Broker: each identity does
only its job"), against the real Mosquitto with the generated configuration.

Each refusal is checked from both sides: nothing reaches the intruder, and nothing is lost by
the victim. "Nothing reached" is made observable with a marker: Mosquitto handles packets one at
a time on one thread, so once a marker published after the victim's messages has arrived, any of
those messages routed to the same client would have arrived before it.
"""

from __future__ import annotations

import dataclasses
import queue
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_center import cli
from control_center.broker_admin import BrokerAdmin
from control_center.config import DEFAULT_GROUP, CenterConfig
from control_center.fleet import MAX_PACKET_BYTES, MAX_PACKET_HEADROOM, render_broker_access
from control_center.live import MAX_PAYLOAD_BYTES as LIVE_MAX_PAYLOAD_BYTES
from control_center.store import Store
from protocol import Topics
from protocol.mqtt import BrokerConfig, make_client
from simulator.broker import PrivateBroker
from tests.helpers import RawClient

NOT_AUTHORIZED = 0x87
GROUP_ALERTS = f"$share/{DEFAULT_GROUP}/sos/v1/dev/+/alert"
VICTIM, INTRUDER = "tok-001", "tok-666"


@pytest.fixture
def centre(broker) -> Iterator[RawClient]:
    """The serving centre's subscription, as CenterService makes it."""
    client = RawClient(broker.centre, broker.CENTRE)
    assert client.subscribe_reason(GROUP_ALERTS) < 0x80
    yield client
    client.close()


@pytest.fixture
def victim(broker) -> Iterator[RawClient]:
    client = RawClient(broker.identity(VICTIM), VICTIM)
    assert client.subscribe_reason(Topics(VICTIM).command) < 0x80
    yield client
    client.close()


@pytest.fixture
def intruder(broker) -> Iterator[RawClient]:
    client = RawClient(broker.identity(INTRUDER), INTRUDER)
    assert client.subscribe_reason(Topics(INTRUDER).command) < 0x80  # for the marker
    yield client
    client.close()


def send_alerts(device: RawClient, device_id: str, n: int) -> list[bytes]:
    payloads = [f"alert {i} of {device_id}".encode() for i in range(n)]
    for payload in payloads:
        assert device.publish_reason(Topics(device_id).alert, payload) < 0x80
    return payloads


def assert_received_nothing_but_the_marker(broker, intruder: RawClient) -> None:
    """Publish a marker to the intruder's own command topic (after everything else) and check
    it is the only message the intruder ever got."""
    sender = RawClient(broker.identity("centre.marker", "centre"), "centre.marker")
    try:
        sender.publish(Topics(INTRUDER).command, b"marker")
    finally:
        sender.close()
    assert intruder.wait_messages(1) == [(Topics(INTRUDER).command, b"marker")]


def connection_outcome(config: BrokerConfig) -> str:
    """"connected" or "refused" (TLS or CONNACK), whichever the first attempt ends in."""
    outcome: queue.Queue[str] = queue.Queue()
    client = make_client("probe", config)
    client.on_connect = lambda c, u, f, rc, p: outcome.put("refused" if rc.is_failure
                                                           else "connected")
    client.on_connect_fail = lambda c, u: outcome.put("refused")
    client.on_disconnect = lambda *a: outcome.put("refused")
    client.connect_async(config.host, config.port)
    client.loop_start()
    try:
        return outcome.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


# -- subscriptions -------------------------------------------------------------------------------
@pytest.mark.parametrize("topic", [
    GROUP_ALERTS,
    "$share/sos-center/sos/v1/dev/+/live",
    f"$share/own-group/sos/v1/dev/{INTRUDER}/cmd",
    Topics(VICTIM).command,
    "sos/v1/dev/+/cmd",
    "sos/v1/dev/+/alert",
    "#",
    "$CONTROL/dynamic-security/#",
])
def test_a_device_may_not_subscribe_beyond_its_own_command_topic(broker, intruder,
                                                                 topic: str) -> None:
    assert intruder.subscribe_reason(topic) == NOT_AUTHORIZED


def test_a_device_in_the_centres_shared_group_takes_no_alert_from_the_centre(
        broker, centre, victim, intruder) -> None:
    for topic in (GROUP_ALERTS, Topics(VICTIM).command, "#"):
        intruder.subscribe_reason(topic)
    sent = send_alerts(victim, VICTIM, 50)
    received = centre.wait_messages(50)
    assert [payload for _, payload in received] == sent
    assert_received_nothing_but_the_marker(broker, intruder)


def test_another_devices_commands_reach_it_and_not_the_intruder(broker, victim,
                                                                intruder) -> None:
    intruder.subscribe_reason(Topics(VICTIM).command)
    sender = RawClient(broker.centre, broker.CENTRE)
    try:
        sender.publish(Topics(VICTIM).command, b"ack for the victim")
    finally:
        sender.close()
    assert victim.wait_messages(1) == [(Topics(VICTIM).command, b"ack for the victim")]
    assert_received_nothing_but_the_marker(broker, intruder)


# -- client ids ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stolen_id", [PrivateBroker.CENTRE, VICTIM])
def test_a_device_asking_for_another_identitys_client_id_does_not_take_over_its_session(
        broker, centre, victim, stolen_id: str) -> None:
    thief = RawClient(broker.identity(INTRUDER), stolen_id)
    try:
        sent = send_alerts(victim, VICTIM, 5)
        assert [p for _, p in centre.wait_messages(5)] == sent
        sender = RawClient(broker.identity("centre.marker", "centre"), "centre.marker")
        sender.publish(Topics(VICTIM).command, b"still yours")
        sender.close()
        assert victim.wait_messages(1) == [(Topics(VICTIM).command, b"still yours")]
        assert not centre.disconnected.is_set() and not victim.disconnected.is_set()
        assert not thief.disconnected.is_set()  # it is connected, as itself
    finally:
        thief.close()


def test_the_broker_makes_the_client_id_the_certificates_identity(broker) -> None:
    RawClient(broker.identity(INTRUDER), "centre.sim").close()
    assert f"as {INTRUDER} (p5" in broker.log_file.read_text()


# -- packet size ---------------------------------------------------------------------------------
def test_the_packet_limit_holds_a_live_chunk_with_its_largest_header() -> None:
    assert MAX_PACKET_BYTES - LIVE_MAX_PAYLOAD_BYTES >= MAX_PACKET_HEADROOM


def test_the_largest_live_chunk_passes(broker, victim) -> None:
    watcher = RawClient(broker.centre, broker.CENTRE)
    try:
        assert watcher.subscribe_reason(f"sos/v1/dev/{VICTIM}/live") < 0x80
        victim.client.publish(f"sos/v1/dev/{VICTIM}/live", b"v" * LIVE_MAX_PAYLOAD_BYTES, qos=0)
        ((_, payload),) = watcher.wait_messages(1, timeout=30)
        assert len(payload) == LIVE_MAX_PAYLOAD_BYTES
    finally:
        watcher.close()


def test_an_oversize_publish_is_refused_and_the_next_alert_still_arrives(broker, centre,
                                                                          victim,
                                                                          intruder) -> None:
    watcher = RawClient(broker.identity("centre.watch", "centre"), "centre.watch")
    try:
        assert watcher.subscribe_reason("sos/v1/dev/+/live") < 0x80
        intruder.client.publish(f"sos/v1/dev/{INTRUDER}/live", b"x" * (MAX_PACKET_BYTES + 1),
                                qos=0)
        assert intruder.disconnected.wait(30), "the broker kept a client sending an oversize packet"
        sent = send_alerts(victim, VICTIM, 1)
        assert [p for _, p in centre.wait_messages(1)] == sent
        victim.client.publish(f"sos/v1/dev/{VICTIM}/live", b"marker", qos=0)
        assert watcher.wait_messages(1) == [(f"sos/v1/dev/{VICTIM}/live", b"marker")]
    finally:
        watcher.close()


# -- revocation ----------------------------------------------------------------------------------
def test_a_revoked_device_is_disconnected_without_restarting_the_broker(broker, centre,
                                                                        intruder) -> None:
    intruder.client.reconnect_delay_set(30, 30)  # so `disconnected` stays the revocation's
    broker.revoke(INTRUDER)
    assert intruder.disconnected.wait(10)
    assert broker.running and not centre.disconnected.is_set()


def test_a_revoked_device_cannot_connect_again(broker, intruder) -> None:
    config = broker.identity(INTRUDER)
    broker.revoke(INTRUDER)
    assert connection_outcome(config) == "refused"


def test_the_operator_procedure_disconnects_a_revoked_device(broker, centre,
                                                             intruder) -> None:
    """docs/FLASHING.md: `ca revoke`, reload, `ca sync`."""
    intruder.client.reconnect_delay_set(30, 30)
    fleet = str(broker.fleet.directory)
    assert sos_center("ca", "revoke", INTRUDER, "--fleet", fleet).returncode == 0
    broker.reload()
    synced = sos_center("ca", "sync", "--fleet", fleet, "--broker", f"127.0.0.1:{broker.port}")
    assert f"deleteClient {INTRUDER} (disconnected)" in synced.stdout, synced.stderr
    assert intruder.disconnected.wait(10)
    assert not centre.disconnected.is_set()


def sos_center(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "control_center.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_a_revoked_device_leaves_the_brokers_access_list(broker) -> None:
    broker.identity(INTRUDER)
    broker.revoke(INTRUDER)
    with BrokerAdmin(broker.admin) as admin:
        (listed,) = admin.request([{"command": "listClients"}])
    assert INTRUDER not in listed["data"]["clients"]
    assert listed["data"]["clients"] == [c["username"] for c in
                                         render_broker_access(broker.fleet)["clients"]]


def test_syncing_an_up_to_date_broker_changes_nothing(broker) -> None:
    broker.identity(VICTIM)
    assert broker.sync() == []


# -- the operator's command client ---------------------------------------------------------------
def command_config(broker, tmp_path: Path) -> CenterConfig:
    """What `sos-center ack` reads from center.toml on the serving centre's host."""
    return CenterConfig(db=tmp_path / "center.sqlite", fleet_dir=broker.fleet.directory,
                        group=DEFAULT_GROUP, operator="op",
                        broker=broker.centre)


def test_the_command_client_has_its_own_identity(broker) -> None:
    command = cli.command_broker(broker.centre, broker.fleet)
    assert cli.identity_name(command) == f"{broker.CENTRE}-cli"
    assert cli.identity_name(broker.centre) == broker.CENTRE


def test_the_command_client_does_not_disconnect_the_serving_centre(broker, centre, victim,
                                                                   tmp_path: Path) -> None:
    config = command_config(broker, tmp_path)
    command = dataclasses.replace(config, broker=cli.command_broker(config.broker, broker.fleet))
    store = Store(config.db)
    try:
        service = cli._service(command, store, client_id=cli.identity_name(command.broker),
                               consume=False)
        service.start()
        try:
            assert service.send_call(VICTIM, "call_start", "op", call_id="c-1")["delivered"]
        finally:
            service.stop()
    finally:
        store.close()
    ((_, payload),) = victim.wait_messages(1)
    assert b'"call_start"' in payload
    sent = send_alerts(victim, VICTIM, 1)
    assert [p for _, p in centre.wait_messages(1)] == sent
    assert not centre.disconnected.is_set()
