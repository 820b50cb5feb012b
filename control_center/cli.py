"""`sos-center`: run the control centre and act as its operator from a terminal."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography import x509

from control_center import audit_cli, ca_cli, pki, user_cli
from control_center.alert_routing import AlertRouting
from control_center.broker_admin import sync_broker
from control_center.config import CenterConfig, load_center_config
from control_center.console import alert_line, event_line, record_line, rejection_line
from control_center.escalation import Step
from control_center.fleet import Fleet, FleetError
from control_center.live import LiveReceiver
from control_center.service import CenterEvent, CenterService, CommandError, FleetTrust
from control_center.store import AmbiguousAlertId, Store
from control_center.webhook import WebhookTarget
from protocol.configfile import ConfigError, pem_certificates, pem_private_key
from protocol.mqtt import BrokerConfig
from protocol.signing import Signer, load_key

DEFAULT_CONFIG = os.environ.get("SOS_CENTER_CONFIG", "/etc/sos-center/center.toml")
PENDING = "it stays pending and is sent again when the device reports back"
POLL_S = 0.1  # how often `ack`/`close` look for the device's answer in the store


def _printer(store: Store) -> Callable[[CenterEvent], None]:
    """What `serve` prints: one line per new alert, event, live view and vanished device."""
    return lambda event: _print_event(store, event)


def _print_event(store: Store, event: CenterEvent) -> None:
    m = event.message
    if event.kind == "alert" and event.new:
        print(alert_line(m), flush=True)
    elif event.kind == "event" and event.new and m["type"] == "command_rejected":
        print(rejection_line(m, store.command(m["command_id"])), flush=True)
    elif event.kind == "event" and event.new:
        print(event_line(m), flush=True)
    elif event.kind == "live" and event.new and m["seq"] == 0:
        print(f"LIVE {event.device_id}: video of alert {m['alert_id'][:8]} is playing: "
              f"{Path(m['path']).parent / 'index.m3u8'}", flush=True)
    elif event.kind == "status" and m["state"] == "offline":
        print(f"OFFLINE {event.device_id}: the device vanished (last will)", flush=True)


def _service(config: CenterConfig, store: Store, **kwargs) -> CenterService:
    fleet = Fleet(config.fleet_dir)
    return CenterService(config.broker, store, signer=command_signer(config, fleet),
                         trust=FleetTrust(fleet), **kwargs)


def command_signer(config: CenterConfig, fleet: Fleet) -> Signer:
    """The key this centre signs commands and delivery receipts with: `center.signing_key`, or
    the fleet's shared command key. A key the fleet does not trust is refused (ConfigError):
    devices would refuse every command signed with it."""
    if config.signing_key is None:
        return fleet.centre_signer()
    if not config.signing_key.exists():
        raise ConfigError(f"key 'center.signing_key': {config.signing_key} does not exist")
    signer = Signer(load_key(config.signing_key))
    if signer.public_key_b64 not in fleet.centre_public_keys():
        raise ConfigError(
            f"key 'center.signing_key': {config.signing_key} (public key "
            f"{signer.public_key_b64}) is not trusted by the fleet, so devices would refuse its "
            f"commands; enrol it with `sos-center ca sign --kind centre --signing-key "
            f"{signer.public_key_b64} CSR_FILE`")
    return signer


def identity_name(broker: BrokerConfig) -> str:
    """The identity a centre instance connects as: its certificate's common name, which the
    broker also makes its client id (`use_username_as_clientid`), whatever it asks for."""
    if broker.cert_file is None:
        return "sos-center-1"  # no certificate: a broker without TLS, only in tests
    cert = x509.load_pem_x509_certificate(Path(broker.cert_file).read_bytes())
    return pki.common_name(cert)


def command_broker(broker: BrokerConfig, fleet: Fleet) -> BrokerConfig:
    """How `sos-center ack|close` reaches the broker: as `<instance identity>-cli`, its own
    identity. With the instance's own certificate it would get the instance's client id and
    take over the serving instance's connection. Made and enrolled in the fleet directory on
    first use (the command already needs that directory for the command-signing key), and the
    running broker is told about it then."""
    name = f"{identity_name(broker)}-cli"
    known = fleet.active(name) is not None
    pair = fleet.enrol_local(name, "centre", fleet.directory / "operators" / name)
    if not known:
        sync_broker(fleet, broker.host, broker.port)
    return dataclasses.replace(broker, cert_file=str(pair.cert_file),
                               key_file=str(pair.key_file))


@contextlib.contextmanager
def one_at_a_time(broker: BrokerConfig) -> Iterator[None]:
    """Two `ack`s at once on one host share one identity, so one client id: the second would
    take over the first's connection. Hold a lock next to the identity's key meanwhile."""
    assert broker.cert_file is not None
    with open(Path(broker.cert_file).with_name("lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cmd_serve(config: CenterConfig, args: argparse.Namespace) -> int:
    store = Store(config.db)
    live = None
    if config.live_dir is not None:
        fleet = Fleet(config.fleet_dir)
        if not fleet.live_identity_file.exists():
            print(f"config error: key 'center.live_dir' is set but {fleet.live_identity_file} "
                  "is missing (run `sos-center ca init` again to make the live-view key)",
                  file=sys.stderr)
            return 2
        live = LiveReceiver(fleet.live_identity_file, config.live_dir, FleetTrust(fleet))
    observers: list[Callable[[CenterEvent], None]] = [_printer(store)]

    def tell_all(event: CenterEvent) -> None:
        for observer in list(observers):  # one failing must not silence the others
            try:
                observer(event)
            except Exception:
                logging.getLogger("sos.center").exception("an observer of the %s failed",
                                                          event.kind)

    service = _service(config, store, client_id=identity_name(config.broker),
                       group=config.group, on_event=tell_all, live=live,
                       router=config.routes.route_at)
    steps: list[Callable[[Step], None]] = [_print_step]
    routing = AlertRouting(store, config.routes,
                           [WebhookTarget.from_config(hook) for hook in config.webhooks],
                           on_step=lambda step: [announce(step) for announce in steps],
                           incident_radius_m=config.incident_radius_m,
                           incident_window_s=config.incident_window_s)
    observers.append(routing.on_center_event)
    # Block the signals before any thread starts (threads inherit the mask) and wait for one
    # with sigwait: a handler that sets an Event the main thread is waiting on can deadlock.
    stopping = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    service.start(wait_s=None)
    routing.start()
    console = None
    if config.console is not None:
        from control_center.web.launch import start_console  # only a centre with a console

        try:
            console = start_console(config.console, store=store, accounts_db=config.db,
                                    fleet=Fleet(config.fleet_dir), commands=service,
                                    live_dir=config.live_dir, routing=routing,
                                    voice=config.voice)
        except (OSError, RuntimeError) as exc:
            print(f"config error: key 'console.port': cannot serve the console on "
                  f"{config.console.listen}:{config.console.port}: {exc}", file=sys.stderr)
            service.stop()
            routing.stop()
            return 2
        observers.append(console.console.on_center_event)
        steps.append(lambda step: console.console.publish_alert(step.alert_id))
    print(f"sos-center serving: broker {config.broker.host}:{config.broker.port}, "
          f"store {config.db}" + (f", live view in {config.live_dir}" if live else "")
          + (f", operator console at {console.url}" if console else "")
          + "; Ctrl-C stops", flush=True)
    signal.sigwait(stopping)
    if console is not None:
        console.stop()
    service.stop()  # first: nothing it still receives may find the routing stopped
    routing.stop()
    store.close()
    return 0


def _print_step(step: Step) -> None:
    to = f"desk {step.to_desk}" if step.to_desk else "the supervisors only (end of its chain)"
    offline = "; its device is OFFLINE" if step.device_offline else ""
    print(f"ESCALATED {step.alert_id[:8]} (step {step.step}): nobody took it; now to {to} and "
          f"the supervisors{offline}", flush=True)


def check_console_files(config: CenterConfig) -> None:
    """The console's certificate and key, checked at start-up with the key's name."""
    if config.console is None:
        return
    for key, path, check in (("console.cert_file", config.console.cert_file, pem_certificates),
                             ("console.key_file", config.console.key_file, pem_private_key)):
        try:
            check(path)
        except (ConfigError, OSError) as exc:
            raise ConfigError(f"key '{key}': {exc}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            config.console.cert_file, config.console.key_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"key 'console.key_file': {config.console.key_file} is not the key of "
                          f"console.cert_file {config.console.cert_file} ({exc.reason})") from None


def cmd_alerts(config: CenterConfig, args: argparse.Namespace) -> int:
    store = Store(config.db)
    records = store.alerts(open_only=not args.all)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in records], indent=2))
    elif not records:
        print("no open alerts" if not args.all else "no alerts")
    else:
        for record in records:
            print(record_line(record))
    return 0


def cmd_decide(config: CenterConfig, args: argparse.Namespace) -> int:
    store = Store(config.db)
    try:
        alert_id = store.resolve_alert_id(args.alert_id)
    except AmbiguousAlertId as exc:
        print(f"error: {exc}; type more of it", file=sys.stderr)
        return 2
    if alert_id is None:
        print(f"error: no alert '{args.alert_id}' (see: sos-center alerts)", file=sys.stderr)
        return 2
    try:
        broker = command_broker(config.broker, Fleet(config.fleet_dir))
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with one_at_a_time(broker):
        command = _decide(dataclasses.replace(config, broker=broker), store, alert_id, args)
    if command is None:
        return 1
    return _report_outcome(store, command, args.wait)


def _report_outcome(store: Store, command: dict, wait_s: float) -> int:
    """Wait for the device's answer and say it: 0 applied, 1 rejected, 3 no answer yet (the
    serving instance re-sends it when the device reports back)."""
    what = f"{command['alert_id'][:8]} {command['type']}"
    if not command["delivered"]:
        print(f"{what}: the device is not connected; {PENDING}")
        return 3
    answer = _await_answer(store, command["command_id"], wait_s)
    if answer is None:
        print(f"{what}: no answer from the device yet; {PENDING}")
        return 3
    if answer["status"] == "applied":
        print(f"{what}: applied")
        return 0
    print(f"{what}: rejected: {answer['reason_code'] or 'no reason given'}")
    return 1


def _await_answer(store: Store, command_id: str, wait_s: float) -> dict | None:
    """The command once the device's answer is stored, or None after `wait_s`. The serving
    instance stores the answer (this process subscribes to nothing), so the shared store is
    where it shows: looked at every POLL_S."""
    deadline = time.monotonic() + wait_s
    while True:
        command = store.command(command_id)
        if command is not None and command["status"] in ("applied", "rejected"):
            return command
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


def _decide(config: CenterConfig, store: Store, alert_id: str,
            args: argparse.Namespace) -> dict | None:
    """Connect as the command identity, send the decision, disconnect; None if it failed."""
    service = _service(config, store, client_id=identity_name(config.broker), consume=False)
    try:
        service.start()
        return service.send_command(alert_id, args.command, args.operator or config.operator)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    finally:
        service.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sos-center",
        description="The SOS control centre: receive alerts from tokens and pillars, store them, "
                    "and send the operator's acknowledgement and close back to the device.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="centre config TOML (default: $SOS_CENTER_CONFIG or %(default)s)")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="consume alerts and print one line per new alert, until Ctrl-C; "
                   "with center.live_dir, also write each SOS's live view there (HLS); with a "
                   "[console] section, also serve the operators' web console (HTTPS)")
    alerts = sub.add_parser("alerts", help="list open alerts (oldest first)")
    alerts.add_argument("--all", action="store_true", help="include closed alerts")
    alerts.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (("ack", "acknowledge an alert: the device shows that help is coming"),
                       ("close", "close an alert: the device stops its SOS")):
        p = sub.add_parser(name, help=text)
        p.add_argument("alert_id", metavar="ID", help="alert id or a unique prefix of it")
        p.add_argument("--operator", help="operator name to record (default: from the config)")
        p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                       help="how long to wait for the device's answer (default: %(default)s); "
                            "exit 0 applied, 1 rejected, 3 no answer yet")
        p.set_defaults(command=name)
    ca_cli.add_parser(sub)
    audit_cli.add_parser(sub)
    user_cli.add_parser(sub)
    sub.add_parser("ingest", add_help=False,
                   help="receive devices' evidence uploads over HTTPS (tus, mutual TLS); "
                        "`sos-center ingest --help` lists its options")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "ingest" in argv:  # its own options, and no centre config (docs/UPLOAD.md)
        at = argv.index("ingest")
        if all(a.startswith("-") or argv[i - 1] in ("--config", "--log-level")
               for i, a in enumerate(argv[:at])):
            from control_center.ingest.cli import main as ingest_main

            logging.basicConfig(level=logging.WARNING,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            return ingest_main(argv[at + 1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.action == "ca":  # the fleet CA needs no centre config
        return ca_cli.run(args)
    if args.action == "audit":  # needs no centre config either
        return audit_cli.run(args)
    try:
        config = load_center_config(args.config)
        fleet = Fleet(config.fleet_dir)  # fail now, not at the first alert
        if args.action in ("serve", "ack", "close"):
            command_signer(config, fleet)
        if args.action == "serve":
            check_console_files(config)
    except (ConfigError, FleetError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.action == "user":
        return user_cli.run(args, config)
    handlers = {"serve": cmd_serve, "alerts": cmd_alerts, "ack": cmd_decide,
                "close": cmd_decide}
    return handlers[args.action](config, args)


if __name__ == "__main__":
    sys.exit(main())
