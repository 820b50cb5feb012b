"""`sos-sim`: run simulated shifts end to end with the real firmware and control centre."""

from __future__ import annotations

import argparse
import contextlib
import heapq
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from protocol.configfile import ConfigError
from simulator.broker import is_fleet, sim_enrolments
from simulator.processes import Entry, Recorder
from simulator.runner import CONSOLE_USER, ConsoleStartError, RunResult, ScenarioRun, dumps, heard
from simulator.scenario import available, load_scenario
from simulator.voice_answerer import HEARD as VOICE_HEARD

SHOWN = {"setup", "button", "kill", "start", "broker", "problem", "error", "ack", "close",
         "alert", "duplicate", "event", "position", "ready", "link", "trigger", "feedback",
         "call_start", "call_end", "dock", "undock", "upload_started", "upload_progress",
         "upload", "segment_stored", "segment_refused", "live", "row", "ignore", "escalated",
         "webhook", "voice"}


class TimelinePrinter:
    """Prints entries in time order: they arrive through different threads and pipes, so each
    waits `delay_s` in a small buffer for anything earlier that is still on its way."""

    def __init__(self, delay_s: float = 0.3) -> None:
        self.t0 = time.time()
        self.delay_s = delay_s
        self._pending: list[tuple[float, int, Entry]] = []
        self._count = 0
        self._last_progress: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, daemon=True)
        self._thread.start()

    def __call__(self, entry: Entry) -> None:
        if entry.kind not in SHOWN:
            return
        if entry.kind == "upload_progress":  # the bar once per segment, not once per chunk
            step = (entry.source, entry.data["segments_done"])
            if step == self._last_progress:
                return
            self._last_progress = step
        with self._lock:
            self._count += 1
            heapq.heappush(self._pending, (entry.wall, self._count, entry))

    def _flush_loop(self) -> None:
        while not self._closed.wait(0.1):
            self._flush(time.time() - self.delay_s)

    def _flush(self, until: float) -> None:
        with self._lock:
            while self._pending and self._pending[0][0] <= until:
                _, _, entry = heapq.heappop(self._pending)
                print(f"{entry.wall - self.t0:8.3f}s  {entry.source:<14} {entry.text}",
                      flush=True)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._flush(float("inf"))


def print_summary(result: RunResult) -> None:
    print()
    print(f"{'alert':<9} {'device':<14} {'latency':>9} {'ack->device':>12} {'stored':>7}  "
          "feedback")
    for a in result.alerts:
        latency = f"{a['latency_ms']:.1f} ms" if a["latency_ms"] is not None else "-"
        ack = f"{a['ack_latency_ms']:.1f} ms" if a["ack_latency_ms"] is not None else "-"
        print(f"{a['alert_id'][:8]:<9} {a['device_id']:<14} {latency:>9} {ack:>12} "
              f"{a['deliveries']:>5}x  {' > '.join(a['feedback'])}")
    if any(a.get("desks") for a in result.alerts):
        print_routing(result)
    if result.recordings:
        rec, up, live = (result.recordings[k] for k in ("recording", "upload", "live"))
        print(f"\nrecording: {rec['segments']} segment(s), {rec['total_s']} s, "
              f"{rec['evidence_segments']} flagged as evidence; "
              f"{'VERIFIED' if rec['verify'] else 'NOT VERIFIED'} (sos-evidence verify)")
        if up["receipts"]:
            print(f"upload:    {up['segments_uploaded']} segment(s), {up['bytes'] / 1e6:.1f} MB, "
                  f"{up['receipts']} signed receipt(s), {up['verified_at_centre']} verified at "
                  "the centre")
        else:
            print("upload:    none (not docked in this scenario; the recordings stay on the card)")
        newest = live.get("latency_newest_ms", {})
        if live.get("chunks"):
            print(f"live:      {live['chunks']} chunk(s) during the SOS, {live['lost']} lost; "
                  f"newest frame {newest['p50']:.0f} ms (p50) / {newest['p95']:.0f} ms (p95) "
                  "behind the camera")
    if result.console:
        print_console(result.console)
    if result.ok:
        print(f"\nOK: {len(result.alerts)} alert(s), each stored once at the control centre, "
              "and every operator decision applied on the device.")
    else:
        print("\nFAILED:\n  " + "\n  ".join(result.problems))


def print_routing(result: RunResult) -> None:
    """Where each alert was routed, the steps it climbed, and what the webhook receiver got."""
    print()
    for a in result.alerts:
        print(f"{a['alert_id'][:8]:<9} -> {', '.join(a['desks']) or '(no desk)'} "
              f"(rule '{a['route_rule']}')")
        for step in a["escalations"]:
            where = step["to_desk"] or "the supervisors only"
            print(f"{'':<9}    escalated, step {step['step']}: to {where} at {step['at']}")
    if result.webhook is not None:
        got = ", ".join(f"{count} {event}" for event, count in
                        sorted(result.webhook["received"].items())) or "nothing"
        print(f"\nwebhook:   received {got}; {result.webhook['duplicates']} duplicate(s), "
              f"{result.webhook['bad_signatures']} bad signature(s)")


def print_console(console: dict[str, Any]) -> None:
    """The console's lines of the summary: where it was, each row's time in the browser, and
    each pillar's voice call as the operator on duty answered it."""
    print(f"\nconsole:   {console['url']} (user {console['user']})")
    if console["why_not"]:
        print(f"           no browser timed it: {console['why_not']}")
        return
    for row in console["alerts"]:
        if row["stored_to_row_ms"] is None:
            print(f"           {row['alert_id'][:8]}: its row NEVER appeared in "
                  f"{console['browser']}")
            continue
        pressed = (f"{row['pressed_to_row_ms']:.0f} ms after the press, "
                   if row["pressed_to_row_ms"] is not None else "")
        print(f"           {row['alert_id'][:8]}: row visible in {console['browser']} {pressed}"
              f"{row['stored_to_row_ms']:.0f} ms after it was stored")
        if row.get("voice"):
            print(f"           {'':8}  voice: {voice_line(row['voice'])}")
    if console.get("voice_why_not"):
        print(f"           nobody answered by voice: {console['voice_why_not']}")


def voice_line(voice: dict[str, Any]) -> str:
    """`connected 1.3 s after the press; the operator heard the caller (r=0.93), ...`"""
    if voice["pressed_to_connected_ms"] is None:
        return "NOT connected" + (f": {voice['error']}" if voice["error"] else "")
    line = (f"connected {voice['pressed_to_connected_ms'] / 1000:.1f} s after the press; "
            + heard("the operator", "the caller", voice["operator_heard_caller_r"]) + ", "
            + heard("the caller", "the operator", voice["caller_heard_operator_r"]))
    warp = voice.get("operator_receive")
    r = voice["operator_heard_caller_r"]
    if warp and r is not None and r < VOICE_HEARD:  # why, as far as the browser knows
        line += (f"; meanwhile the operator's browser concealed {warp['concealed_ms']:.0f} ms, "
                 f"cut {warp['removed_ms']:.0f} ms and stretched {warp['inserted_ms']:.0f} ms "
                 "of the caller's sound (late packets: a busy machine)")
    return line


def cmd_run(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    refusal = fleet_refusal(args, [d.id for d in scenario.devices
                                   if d.id not in {i.partition("=")[0] for i in args.provisioned}])
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    workdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sos-sim-"))
    workdir.mkdir(parents=True, exist_ok=True)
    printer = None if args.json else TimelinePrinter()
    if printer:
        print(f"== {scenario.name} (speed {args.speed:g}x) ==\n{scenario.description}\n",
              flush=True)
    try:
        provisioned = dict(_device_root(item) for item in args.provisioned)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = ScenarioRun(scenario, workdir, speed=args.speed, seed=args.seed,
                      recorder=Recorder(on_entry=printer), fleet_dir=args.fleet, port=args.port,
                      provisioned=provisioned, browser=not args.no_browser,
                      console_port=args.console_port)
    try:
        try:
            result = run.run(keep_running=args.console)
        except ConsoleStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            if printer:
                printer.close()
        if args.json:
            print(dumps(result), flush=True)
        else:
            print_summary(result)
            if args.out:
                print(f"broker, centre and device files are in {workdir}")
        if args.console:
            hold(run, sys.stderr if args.json else sys.stdout)
    finally:
        if not args.out:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result.ok else 1


def hold(run: ScenarioRun, out: TextIO) -> None:
    """`--console`: keep what the run left running until SIGINT or SIGTERM, then stop it."""
    try:
        with stop_signal() as wait:
            print(f"\nconsole:  {run.console_url}  user {CONSOLE_USER}  password "
                  f"{run.console_password}\n          (its certificate is from the run's fleet "
                  f"CA {run.ca_file}: trust that, or accept the browser's warning)\n"
                  "The broker, the control centre with its console and the devices keep "
                  "running until Ctrl-C.", file=out, flush=True)
            signum = wait()
        print(f"{signal.Signals(signum).name}: stopping", file=out, flush=True)
    finally:
        run.stop()


@contextlib.contextmanager
def stop_signal() -> Iterator[Callable[[], int]]:
    """Inside: SIGINT and SIGTERM no longer interrupt; the yielded function blocks until one
    of them arrives and returns its number.

    `sos-center serve` blocks the signals before it starts any thread and sigwaits. That does
    not fit here: the run has started threads (paho, uvicorn, the device readers) with the
    signals unblocked, and Linux delivers a process-wide signal to any thread that does not
    block it, where a sigwait in the main thread would never see it. Blocking them from the
    start instead would be inherited by every process the run starts (Mosquitto, the devices,
    chromedriver keep a blocked mask across exec), which SIGTERM could then no longer stop.
    So the signals get a handler that does nothing, and Python's C-level handler writes each
    one's number to a wakeup socket, from whichever thread took it: the main thread reads it.
    """
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    stopping = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: None) for s in stopping}
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def wait() -> int:
        while (signum := reader.recv(1)[0]) not in stopping:
            continue  # another signal with a Python handler (none by default)
        return signum

    try:
        yield wait
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        reader.close()
        writer.close()


def fleet_refusal(args: argparse.Namespace, enrolled_devices: list[str]) -> str | None:
    """Why the run must not start on `--fleet`, or None. The simulator's centre is an identity
    of the fleet like any other: in a fleet that exists (a deployment's, a partner's) it and the
    scenario's devices are enrolled only when the user says so."""
    if args.fleet is None or args.enrol_sim_identities or not is_fleet(args.fleet):
        return None
    added = sim_enrolments(args.fleet, enrolled_devices)
    return (f"--fleet {args.fleet} is an existing fleet; this run would enrol in it: "
            f"{'; '.join(added)}. Pass --enrol-sim-identities to allow that, or use a fleet "
            "of its own for the simulator (sos-center ca init --fleet DIR)")


def _device_root(item: str) -> tuple[str, Path]:
    device_id, _, root = item.partition("=")
    config = Path(root) / "etc" / "sos-device" / "device.toml"
    if not device_id or not config.exists():
        raise ValueError(f"--provisioned {item}: expected ID=ROOT with ROOT/etc/sos-device/"
                         "device.toml (written by sos-provision)")
    return device_id, Path(root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sos-sim",
        description="Desktop simulator: a private Mosquitto (TLS), the control centre with an "
                    "automatic operator and its web console (HTTPS; URL, user and password are "
                    "printed), and virtual tokens and pillars running the real firmware "
                    "with virtual hardware (bouncy button, NMEA GPS on a pty).",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a scenario and print its timeline (or --json)")
    run.add_argument("scenario", metavar="SCENARIO",
                     help=f"a name ({', '.join(available())}) or a path to a scenario TOML")
    run.add_argument("--speed", type=float, default=1.0,
                     help="compress scenario time by this factor (button holds stay real)")
    run.add_argument("--json", action="store_true",
                     help="print one JSON object with the per-alert results and 'ok' (and "
                          "'console': its URL and, per alert, press/stored -> row visible in "
                          "the browser, ms, and for a pillar's alert 'voice': press -> voice "
                          "connected, ms, and how well each side heard the other, "
                          "operator_heard_caller_r and caller_heard_operator_r)")
    run.add_argument("--out", metavar="DIR", help="keep the run's files here (default: removed)")
    run.add_argument("--seed", type=int, default=1, help="seed for GPS noise and contact bounce")
    run.add_argument("--fleet", type=Path, metavar="DIR",
                     help="use this fleet (sos-center ca init) instead of a new one; an "
                          "existing fleet is refused unless --enrol-sim-identities is given")
    run.add_argument("--enrol-sim-identities", action="store_true",
                     help="allow enrolling the simulator's identities in the existing --fleet: "
                          "centre.sim, a centre identity that reads every device's topics and "
                          "may send commands to every device (re-keyed on every run), the "
                          "broker administrator admin.fleet if missing, and every scenario "
                          "device not given with --provisioned (re-keyed if already enrolled). "
                          "Revoke them afterwards with `sos-center ca revoke NAME`")
    run.add_argument("--port", type=int, help="broker port (default: a free one)")
    run.add_argument("--provisioned", action="append", default=[], metavar="ID=ROOT",
                     help="run device ID from a directory `sos-provision` wrote "
                          "(with --fleet and --port as given to it); repeatable")
    run.add_argument("--console", action="store_true",
                     help="after the result, keep the broker, the control centre with its web "
                          "console and the devices running until Ctrl-C (SIGINT or SIGTERM), "
                          "printing the console's URL, user and password again, so a person "
                          "can log in and look around (the automatic operator stops)")
    run.add_argument("--console-port", type=int, default=0, metavar="PORT",
                     help="the web console's HTTPS port on 127.0.0.1 (default: a free one); "
                          "its URL, user and one-run password are printed at the start")
    run.add_argument("--no-browser", action="store_true",
                     help="do not open the console in headless Chromium (by default it is, "
                          "when chromium, chromedriver and selenium are installed, to measure "
                          "press -> row visible for each alert: the 'console' figures; and a "
                          "second one, an operator on duty whose microphone plays an espeak-ng "
                          "voice, answers each pillar's SOS by voice at once: the 'voice' "
                          "figures)")
    sub.add_parser("list", help="list the scenarios with their descriptions")
    from simulator.selftest import add_selftest_parser

    add_selftest_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "list":
        for name in available():
            print(f"{name}: {load_scenario(name).description}")
        return 0
    if args.action == "selftest":
        from simulator.selftest import cmd_selftest

        return cmd_selftest(args)
    if args.speed <= 0:
        print("error: --speed must be positive", file=sys.stderr)
        return 2
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
