"""Two control centres, each with its own signing key, command one real device in turn, and
every command ends in the device's answer (issue 11's acceptance test)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from control_center.service import CenterService, FleetTrust
from control_center.store import Store
from protocol.signing import Signer, load_or_make_key
from tests.conftest import CenterProbe
from tests.test_device_process import Device


@contextlib.contextmanager
def partner_centre(broker, tmp_path: Path, name: str = "centre.partner") -> Iterator[CenterProbe]:
    """A partner organisation's centre: its own identity and signing key (enrolled together,
    so the fleet trusts the key), its own store, and its own shared-subscription group, so it
    receives every alert and event as ours does."""
    identity = broker.identity(name, "centre")
    signer = Signer(load_or_make_key(broker.signing_key_file(name)))
    store = Store(tmp_path / f"{name}.sqlite")
    probe: CenterProbe
    service = CenterService(identity, store, client_id=name, group=name.replace(".", "-"),
                            on_event=lambda e: probe.record(e), signer=signer,
                            trust=FleetTrust(broker.fleet))
    probe = CenterProbe(service, store)
    service.start()
    try:
        yield probe
    finally:
        service.stop()
        store.close()


@contextlib.contextmanager
def running_token(broker, tmp_path: Path) -> Iterator[Device]:
    """A real token process; its trust.centre_keys are the centre keys enrolled by now."""
    token = Device(broker, tmp_path, "tok-two-01")
    token.start()
    token.wait_kind("link", up=True)
    try:
        yield token
    finally:
        token.close()


def raise_alert(token: Device, *centres: CenterProbe, seed: int = 1) -> str:
    """Hold SOS (the `seed`-th press) until every centre has stored the new alert, and let
    go; its id."""
    known = {a.alert_id for a in centres[0].store.alerts(open_only=False)}
    # As a person would: press again once the device is back to idle after the last close.
    # Pressing at once could start within the 30 ms debounce of the last release (the ack and
    # close take about 20 ms), and the logic rightly took the two presses for one.
    token.wait(lambda es: ([e.data["state"] for e in es if e.kind == "feedback"] or ["idle"])[-1]
               == "idle", timeout=30)
    token.press(1.7, seed=seed)
    record = centres[0].wait_for(lambda: next(
        (a for a in centres[0].store.alerts() if a.alert_id not in known), None))
    for centre in centres[1:]:
        centre.wait_for(lambda c=centre: c.store.alert(record.alert_id))
    token.wait(lambda es: sum(e.kind == "button_released" for e in es) == seed)  # let go
    return record.alert_id


def decide(centre: CenterProbe, alert_id: str, decision: str) -> dict:
    """Send a decision and wait for the device's answer to it; the command as stored."""
    sent = centre.service.send_command(alert_id, decision, f"op-{decision}")
    return centre.wait_for(lambda: (c := centre.store.command(sent["command_id"]))
                           and c["status"] != "sent" and c)


def test_two_centres_with_their_own_keys_command_one_device_in_turn_without_a_refusal(
        broker, center, tmp_path: Path) -> None:
    with partner_centre(broker, tmp_path) as partner, running_token(broker, tmp_path) as token:
        answers = []
        for number, (acks, closes) in enumerate([(center, partner), (partner, center)]):
            alert_id = raise_alert(token, center, partner, seed=number + 1)
            answers.append(decide(acks, alert_id, "ack"))
            answers.append(decide(closes, alert_id, "close"))
            token.wait(lambda es, n=number: [e.data.get("state") for e in es
                                             if e.kind == "feedback"].count("closed") > n)
            assert closes.store.alert(alert_id).status == "closed"
            assert acks.store.alert(alert_id).acked_by == "op-ack"
        assert [(a["type"], a["status"]) for a in answers] == \
            [("ack", "applied"), ("close", "applied")] * 2
        assert "rejected" not in token.log_file.read_text()


def test_a_command_signed_by_a_key_the_device_does_not_trust_is_rejected_at_the_centre(
        broker, center, tmp_path: Path) -> None:
    """The partner's key is enrolled after the device was set up: the fleet trusts it, the
    device does not yet."""
    with running_token(broker, tmp_path) as token, partner_centre(broker, tmp_path) as late:
        alert_id = raise_alert(token, center, late)
        answer = decide(late, alert_id, "close")
        assert (answer["status"], answer["reason_code"]) == ("rejected", "bad_signature")
        assert late.store.alert(alert_id).status == "open"
        assert any(e.kind == "event" and e.message["type"] == "command_rejected"
                   and e.message["command_id"] == answer["command_id"] for e in late.events)
        assert token.process.running and "closed" not in token.feedback()
