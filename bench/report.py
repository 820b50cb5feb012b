"""The bench's output: a readable table, or one JSON object with the same numbers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .stats import Summary


@dataclass
class Report:
    """Everything measured in one run. Two pairs decide the verdict: `ours` (trigger -> stored)
    against `floor` (publish -> subscriber), and `ours_receipt` (trigger -> the centre's receipt
    on the device) against `floor_reply` (publish -> the subscriber's reply back)."""

    context: dict[str, Any]
    floor: Summary
    floor_puback: Summary
    ours: Summary
    floor_reply: Summary
    ours_receipt: Summary
    breakdown: list[Summary]
    target_ms: float
    errors: list[str] = field(default_factory=list)

    @property
    def p99_gap_ms(self) -> float:
        return self.ours.p99_ms - self.floor.p99_ms

    @property
    def receipt_p99_gap_ms(self) -> float:
        return self.ours_receipt.p99_ms - self.floor_reply.p99_ms

    @property
    def target_met(self) -> bool:
        complete = not self.errors and all(
            s.n > 0 for s in (self.ours, self.floor, self.ours_receipt, self.floor_reply))
        gaps = (self.p99_gap_ms, self.receipt_p99_gap_ms)
        return complete and all(not math.isnan(g) and g <= self.target_ms for g in gaps)

    def verdict(self) -> str:
        line = (f"p99 difference ours vs floor: stored {self.p99_gap_ms:.2f} ms, receipt "
                f"{self.receipt_p99_gap_ms:.2f} ms (target: each within {self.target_ms:g} ms)")
        if self.errors:
            return f"{line} -> INCOMPLETE RUN, no verdict"
        return f"{line} -> {'MET' if self.target_met else 'MISSED'}"

    def as_json(self) -> str:
        return json.dumps(_finite(self.as_dict()), indent=2, allow_nan=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "floor": self.floor.as_dict(),
            "floor_puback": self.floor_puback.as_dict(),
            "ours": self.ours.as_dict(),
            "floor_reply": self.floor_reply.as_dict(),
            "ours_receipt": self.ours_receipt.as_dict(),
            "breakdown": [s.as_dict() for s in self.breakdown],
            "verdict": {
                "p99_gap_ms": round(self.p99_gap_ms, 3),
                "receipt_p99_gap_ms": round(self.receipt_p99_gap_ms, 3),
                "target_ms": self.target_ms,
                "met": self.target_met,
                "text": self.verdict(),
            },
            "errors": self.errors,
        }

    def as_table(self) -> str:
        label_w = max(len(s.label) for s in self._rows()) + 2
        head = f"{'':{label_w}}{'n':>5}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  (ms)"
        out = [self._title(), "", head]
        out += [_row(s, label_w) for s in (self.floor, self.floor_puback, self.ours,
                                           self.floor_reply, self.ours_receipt)]
        if self.breakdown:
            out += ["", "where the time goes (the first three from the run above; the rest "
                    "measured alone, same filesystem):"]
            out += [_row(s, label_w) for s in self.breakdown]
        out += [""] + [f"ERROR: {e}" for e in self.errors] + [self.verdict()]
        return "\n".join(out)

    def _rows(self) -> list[Summary]:
        return [self.floor, self.floor_puback, self.ours, self.floor_reply, self.ours_receipt,
                *self.breakdown]

    def _title(self) -> str:
        c = self.context
        return (f"SOS latency bench: one private Mosquitto over TLS at {c['broker']}, "
                f"{c['presses']} samples per line after {c['warmup']} warm-up\n"
                f"temp data on {c['filesystem']} under {c['tmpdir']}; {c['cpus']} CPU(s); "
                f"alert payload {c['payload_bytes']} B (floor payload the same size)")


@dataclass
class EvidenceReport:
    """The "evidence video" section: our segment writer's MB/s beside the stock `age` tool's on
    the same bytes in the same run, and the camera's CPU.

    The verdict is ours / (stock age + one fsync of its output) >= target_ratio: our writer's
    figure includes making the segment durable (the issue's "encrypt + hash + sign + fsync"),
    so stock age is timed doing the same job to the same disk. The ratio to stock age without
    any fsync is reported beside it.
    """

    size_mb: int
    repeats: int
    target_ratio: float
    ours_mb_s: float = math.nan
    stock_mb_s: float = math.nan
    stock_fsync_mb_s: float = math.nan
    ours_cpu_s_per_mb: float = math.nan
    camera: list[tuple[str, str, float, str]] = field(default_factory=list)  # key label value unit
    context: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.ours_mb_s / self.stock_mb_s

    @property
    def ratio_fsync(self) -> float:
        return self.ours_mb_s / self.stock_fsync_mb_s

    @property
    def complete(self) -> bool:
        return not (math.isnan(self.ratio) or math.isnan(self.ratio_fsync))

    @property
    def target_met(self) -> bool:
        return self.complete and self.ratio_fsync >= self.target_ratio

    @property
    def writer_cpu_pct(self) -> float:
        """Our segment writer's CPU at the camera's measured bitrate, % of one core."""
        mbit = {k: v for k, _label, v, _unit in self.camera}.get("stream_mbit_s", math.nan)
        return 100 * self.ours_cpu_s_per_mb * mbit / 8

    def verdict(self) -> str:
        target = f"(target: at least {100 * self.target_ratio:g}%)"
        if not self.complete:
            return (f"ours / (stock age + fsync): not measured {target} -> INCOMPLETE RUN, "
                    "no verdict")
        line = (f"ours / (stock age + fsync): {self.ratio_fsync:.2f} = "
                f"{100 * self.ratio_fsync:.0f}% {target}")
        return f"{line} -> {'MET' if self.target_met else 'NOT MET'}"

    def as_dict(self) -> dict[str, Any]:
        def r(value: float, digits: int = 2) -> float:
            return round(value, digits)
        return {
            "context": self.context | {"size_mb": self.size_mb, "repeats": self.repeats,
                                       "best_of": self.repeats, "interleaved": True},
            "throughput_mb_s": {"ours": r(self.ours_mb_s), "stock_age": r(self.stock_mb_s),
                                "stock_age_fsync": r(self.stock_fsync_mb_s)},
            "ours_cpu_s_per_mb": r(self.ours_cpu_s_per_mb, 5),
            "verdict": {"ratio": r(self.ratio, 3), "ratio_vs_stock_fsync": r(self.ratio_fsync, 3),
                        "target_ratio": self.target_ratio, "met": self.target_met,
                        "text": self.verdict()},
            "camera": {key: r(value, 4) for key, _label, value, _unit in self.camera}
            | ({"writer_cpu_pct": r(self.writer_cpu_pct, 4)} if self.camera else {}),
            "errors": self.errors,
        }

    def as_table(self) -> str:
        c = self.context
        out = [f"evidence video: our segment writer beside stock age {c.get('age', '?')} on the "
               f"same {self.size_mb} MB of random bytes; best of {self.repeats} interleaved "
               "runs each",
               f"temp data on {c.get('filesystem', '?')} under {c.get('tmpdir', '?')}; "
               f"{c.get('cpus', '?')} CPU(s)", ""]
        rows = [
            ("ours:  encrypt + hash + sign + fsync (fsync at least every 1 s and at the end, "
             "signed manifest, store commit)", self.ours_mb_s),
            ("stock: age -r RECIPIENT -o FILE (no fsync)", self.stock_mb_s),
            ("stock: age -r RECIPIENT -o FILE + fsync of its output", self.stock_fsync_mb_s),
        ]
        label_w = max(len(label) for label, _ in rows) + 2
        out.append(f"{'':{label_w}}{'MB/s':>9}")
        out += [f"{label:{label_w}}{value:>9.1f}" for label, value in rows]
        out += ["", f"ours / stock age without any fsync: {self.ratio:.2f} (not like for like: "
                "that file is not yet on the disk when age exits)"]
        if self.camera:
            cam = [(label, value, unit) for _key, label, value, unit in self.camera]
            cam.append(("  + our segment writer (encrypt + hash + sign + fsync) at that bitrate, "
                        "CPU time of the runs above", self.writer_cpu_pct, "%"))
            width = max(len(label) for label, _, _ in cam) + 2
            out += ["", "camera CPU (measured on this machine's cores, not the Pi's):"]
            out += [f"{label:{width}}{value:>9.2f} {unit}" for label, value, unit in cam]
        out += [""] + [f"ERROR: {e}" for e in self.errors] + [self.verdict()]
        return "\n".join(out)


@dataclass
class UploadReport:
    """The "upload" section: our shift-end uploader's goodput beside a raw HTTPS PUT of the same
    bytes to the same server over the same TLS in the same run (target: ours >= 90% of it).

    The raw PUT is the fair floor: it stores each segment file durably as an upload does (body
    written, fdatasync, renamed, directory fsynced before the 201), but without tus, checks,
    receipt or audit. A second raw line adds the SHA-256 of the body, the one per-byte job an
    upload cannot skip, to show how much of the gap is per byte and how much per segment.
    """

    segments: int
    segment_bytes: int  # mean size of one .ts.age
    repeats: int
    chunk_bytes: int  # the device default (UploadSettings.chunk_bytes)
    small_chunk_bytes: int
    link_mbit: float  # pace of the relay for the "over a link" lines; 0: not measured
    target_ratio: float
    raw_mb_s: float = math.nan
    raw_sha_mb_s: float = math.nan
    ours_mb_s: float = math.nan
    ours_small_mb_s: float = math.nan
    raw_link_mb_s: float = math.nan
    ours_link_mb_s: float = math.nan
    resent_bytes: int = 0
    context: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.ours_mb_s / self.raw_mb_s

    @property
    def ratio_small(self) -> float:
        return self.ours_small_mb_s / self.raw_mb_s

    @property
    def ratio_link(self) -> float:
        return self.ours_link_mb_s / self.raw_link_mb_s

    @property
    def complete(self) -> bool:
        return not self.errors and not math.isnan(self.ratio)

    @property
    def target_met(self) -> bool:
        return self.complete and self.ratio >= self.target_ratio

    def as_json(self) -> str:
        return json.dumps(_finite(self.as_dict()), indent=2, allow_nan=False)

    def ms_per_segment(self, mb_s: float) -> float:
        return self.segment_bytes / 1e6 / mb_s * 1000

    def verdict(self) -> str:
        target = f"(target: at least {100 * self.target_ratio:g}%)"
        if not self.complete:
            return f"ours / raw PUT: not measured {target} -> INCOMPLETE RUN, no verdict"
        return (f"ours / raw PUT: {self.ratio:.2f} = {100 * self.ratio:.0f}% {target} -> "
                f"{'MET' if self.target_met else 'NOT MET'}")

    def as_dict(self) -> dict[str, Any]:
        def r(value: float, digits: int = 2) -> float:
            return round(value, digits)
        return {
            "context": self.context | {"segments": self.segments,
                                       "segment_bytes": self.segment_bytes,
                                       "repeats": self.repeats, "best_of": self.repeats,
                                       "interleaved": True, "chunk_bytes": self.chunk_bytes,
                                       "small_chunk_bytes": self.small_chunk_bytes,
                                       "link_mbit": self.link_mbit},
            "goodput_mb_s": {"raw_put": r(self.raw_mb_s), "raw_put_sha256": r(self.raw_sha_mb_s),
                             "ours": r(self.ours_mb_s),
                             "ours_small_chunks": r(self.ours_small_mb_s),
                             "raw_put_link": r(self.raw_link_mb_s),
                             "ours_link": r(self.ours_link_mb_s)},
            "ms_per_segment": {
                "raw_put": r(self.ms_per_segment(self.raw_mb_s)),
                "raw_put_sha256": r(self.ms_per_segment(self.raw_sha_mb_s)),
                "ours": r(self.ms_per_segment(self.ours_mb_s)),
                "ours_small_chunks": r(self.ms_per_segment(self.ours_small_mb_s)),
                "raw_put_link": r(self.ms_per_segment(self.raw_link_mb_s)),
                "ours_link": r(self.ms_per_segment(self.ours_link_mb_s))},
            "resent_bytes": self.resent_bytes,
            "verdict": {"ratio": r(self.ratio, 3), "ratio_small_chunks": r(self.ratio_small, 3),
                        "ratio_link": r(self.ratio_link, 3),
                        "target_ratio": self.target_ratio, "met": self.target_met,
                        "text": self.verdict()},
            "errors": self.errors,
        }

    def as_table(self) -> str:
        c = self.context
        kib, small = self.chunk_bytes // 1024, self.small_chunk_bytes // 1024
        out = [f"upload: the shift-end upload of {self.segments} recorded segments "
               f"({self.segment_bytes / 1e6:.1f} MB each) to one ingest server on 127.0.0.1 in "
               f"its own process, mutual TLS with the device's certificate, one persistent "
               f"connection per line; best of {self.repeats} interleaved runs each",
               "fair baseline: a raw HTTPS PUT of each .ts.age to the same server over the same "
               "TLS, stored durably as an upload is (written, fdatasync, renamed, directory "
               "fsynced before its 201); no tus, checks, receipt or audit",
               f"temp data (device and server) on {c.get('filesystem', '?')} under "
               f"{c.get('tmpdir', '?')}; {c.get('cpus', '?')} CPU(s)", ""]
        rows = [
            ("raw PUT, one per segment file (the baseline)", self.raw_mb_s),
            ("raw PUT + SHA-256 of the body (per-byte work an upload cannot skip)",
             self.raw_sha_mb_s),
            (f"ours: tus uploader, {kib} KiB chunks (the device default)", self.ours_mb_s),
            (f"ours: tus uploader, {small} KiB chunks (a cut resends up to {small} KiB)",
             self.ours_small_mb_s),
        ]
        if self.link_mbit:
            rows += [(f"raw PUT through a {self.link_mbit:g} Mbit/s paced relay",
                      self.raw_link_mb_s),
                     (f"ours, {kib} KiB chunks, through the same relay", self.ours_link_mb_s)]
        label_w = max(len(label) for label, _ in rows) + 2
        out.append(f"{'':{label_w}}{'MB/s':>9}{'ms/segment':>12}")
        out += [f"{label:{label_w}}{value:>9.1f}{self.ms_per_segment(value):>12.1f}"
                for label, value in rows]
        extra = self.ms_per_segment(self.ours_mb_s) - self.ms_per_segment(self.raw_sha_mb_s)
        small_extra = (self.ms_per_segment(self.ours_small_mb_s)
                     - self.ms_per_segment(self.raw_sha_mb_s))
        out += ["", f"ours beyond the raw PUT + SHA-256, per segment: {extra:.1f} ms at {kib} KiB "
                f"chunks, {small_extra:.1f} ms at {small} KiB. Only the bodies travel on the "
                "byte connection; the next segment's POST (manifest checks), the server's "
                "completion (fdatasync, SHA-256 read back, chain check, store fsyncs, audit, "
                "signed receipt) and the device's receipt check, fsync and delete run beside it "
                "on other threads, so what is left is the CPU and disk they take from it (device "
                "and server share these cores here) and the last segment's completion at the "
                "end; each smaller chunk adds a round trip and an fdatasync",
                f"ours with {small} KiB chunks / raw PUT: {self.ratio_small:.2f}; bytes resent "
                f"by ours: {self.resent_bytes}"]
        if self.link_mbit:
            out.append(f"through the {self.link_mbit:g} Mbit/s relay (the link sets the pace, "
                       f"as at a dock): ours / raw PUT {self.ratio_link:.2f}")
        out += [""] + [f"ERROR: {e}" for e in self.errors] + [self.verdict()]
        return "\n".join(out)


@dataclass
class LiveReport:
    """The "live view" section: glass-to-glass latency of the live view during an SOS
    (bench.live_bench), for the newest and the first frame of each chunk, and the losses."""

    seconds: float
    summaries: list[Summary] = field(default_factory=list)  # newest, first, device, transit
    counts: dict[str, Any] = field(default_factory=dict)  # chunks, lost, refused, ...
    context: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "context": self.context | {"seconds": self.seconds},
            "latency": [s.as_dict() for s in self.summaries],
            "counts": self.counts,
            "errors": self.errors,
        }

    def as_table(self) -> str:
        c = self.context
        out = [f"live view during an SOS: synthetic camera {c.get('main', '?')} main + "
               f"{c.get('lores', '?')} lores at {c.get('fps', '?')} fps, {c.get('chunk_s', '?')} s "
               "chunks (MPEG-TS, age, signed) -> MQTT QoS 0 through one private Mosquitto "
               "(mutual TLS) -> centre (verify, decrypt, HLS files); "
               f"{self.seconds:g} s streamed",
               f"device and centre on one machine and one clock; {c.get('cpus', '?')} CPU(s)",
               ""]
        if self.summaries:
            label_w = max(len(s.label) for s in self.summaries) + 2
            out.append(f"{'':{label_w}}{'n':>5}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  (ms)")
            out += [_row(s, label_w) for s in self.summaries]
        if self.counts:
            k = self.counts
            out += ["", f"chunks at the centre: {k.get('chunks')}, lost: {k.get('lost')}, "
                        f"refused: {k.get('refused')}, dropped on the device: "
                        f"{k.get('dropped')}, unsent: {k.get('unsent')}; "
                        f"{k.get('kbit_s')} kbit/s on the wire"]
        out += [f"ERROR: {e}" for e in self.errors]
        return "\n".join(out)


@dataclass
class GpsReport:
    """The "GPS decoder" section: NmeaDecoder lines/s on the receiver-log corpus, fed in
    reader-sized chunks, beside bare `pynmea2.parse(check=True)` on the same lines (target: ours
    >= 80% of it; bench.gps_bench)."""

    logs: int
    lines: int
    size_bytes: int
    reads: int
    repeats: int
    target_ratio: float
    ours_lines_s: float = math.nan
    pynmea2_lines_s: float = math.nan
    fixes: int = 0
    context: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.ours_lines_s / self.pynmea2_lines_s

    @property
    def complete(self) -> bool:
        return not self.errors and not math.isnan(self.ratio)

    @property
    def target_met(self) -> bool:
        return self.complete and self.ratio >= self.target_ratio

    def verdict(self) -> str:
        target = f"(target: at least {self.target_ratio:g})"
        if not self.complete:
            return f"ours / pynmea2.parse: not measured {target} -> INCOMPLETE RUN, no verdict"
        return (f"ours / pynmea2.parse: {self.ratio:.2f} {target} -> "
                f"{'MET' if self.target_met else 'MISSED'}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "context": self.context | {"logs": self.logs, "lines": self.lines,
                                       "bytes": self.size_bytes, "reads": self.reads,
                                       "repeats": self.repeats, "best_of": self.repeats,
                                       "interleaved": True},
            "lines_per_s": {"ours": round(self.ours_lines_s, 1),
                            "pynmea2_parse": round(self.pynmea2_lines_s, 1)},
            "fixes": self.fixes,
            "verdict": {"ratio": round(self.ratio, 3), "target_ratio": self.target_ratio,
                        "met": self.target_met, "text": self.verdict()},
            "errors": self.errors,
        }

    def as_table(self) -> str:
        c = self.context
        out = [f"GPS decoder: {self.lines} lines ({self.size_bytes / 1e3:.0f} kB) of {self.logs} "
               f"real receiver logs; best of {self.repeats} interleaved passes each; "
               f"{c.get('cpus', '?')} CPU(s)", ""]
        rows = [
            (f"ours:    NmeaDecoder.feed in {self.reads} reader-sized reads (1..64 B), "
             f"{self.fixes} fixes", self.ours_lines_s),
            ("pynmea2: pynmea2.parse(line, check=True) on the same lines, already cut",
             self.pynmea2_lines_s),
        ]
        label_w = max(len(label) for label, _ in rows) + 2
        out.append(f"{'':{label_w}}{'lines/s':>10}")
        out += [f"{label:{label_w}}{value:>10.0f}" for label, value in rows]
        out += [""] + [f"ERROR: {e}" for e in self.errors] + [self.verdict()]
        return "\n".join(out)


@dataclass
class CallbackReport:
    """The "camera callback" section: how long picamera2's `outputframe` holds the camera
    thread per frame while the recorder writes real segments (bench.camera_bench.callback_hold),
    for the shipped handoff path and, for comparison, the old synchronous one. Target: the
    handoff path's p99 under `target_us`."""

    target_us: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # mode frames p50 p99 max drops segs
    context: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def headline(self) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["mode"] == "handoff"), None)

    @property
    def target_met(self) -> bool:
        row = self.headline
        return row is not None and row["p99_us"] < self.target_us

    def verdict(self) -> str:
        row = self.headline
        target = f"(target: p99 < {self.target_us:g} us)"
        if row is None:
            return f"outputframe hold p99: not measured {target} -> INCOMPLETE RUN, no verdict"
        return (f"outputframe hold p99 (handoff): {row['p99_us']:.0f} us {target} -> "
                f"{'MET' if self.target_met else 'MISSED'}")

    def as_dict(self) -> dict[str, Any]:
        return {"context": self.context, "target_us": self.target_us,
                "rows": [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
                         for r in self.rows],
                "met": self.target_met, "verdict": self.verdict(), "errors": self.errors}

    def as_table(self) -> str:
        c = self.context
        out = [f"camera callback: outputframe's hold on the camera thread per frame, "
               f"{c.get('video', '?')} fed at {c.get('fps', '?')} fps through the real output "
               "class while the recorder writes real segments (age, fsync every 1 s, signed "
               f"manifests, {c.get('segment_s', '?')} s segments)",
               f"temp data on {c.get('filesystem', '?')} under {c.get('tmpdir', '?')}; "
               f"{c.get('cpus', '?')} CPU(s)", ""]
        if self.rows:
            out.append(f"{'':34}{'frames':>7}{'p50':>9}{'p99':>9}{'max':>10}  (us)"
                       f"{'dropped':>9}{'segments':>9}")
            for r in self.rows:
                out.append(f"{r['label']:34}{r['frames']:>7}{r['p50_us']:>9.0f}"
                           f"{r['p99_us']:>9.0f}{r['max_us']:>10.0f}      "
                           f"{r['dropped']:>9}{r['segments']:>9}")
        out += [""] + [f"ERROR: {e}" for e in self.errors] + [self.verdict()]
        return "\n".join(out)


@dataclass
class ConsoleReport:
    """The "operator console" section (bench.console_bench): how soon an open console page in
    headless Chromium shows a new alert's row, and plays its live video (the page selects a new
    SOS by itself when nothing is selected). Targets: stored -> row visible p99 within
    `row_target_ms`; stored -> video playing within `video_target_ms` in every run (the max: a
    few runs only)."""

    row_target_ms: float
    video_target_ms: float
    alerts: int = 0
    devices: int = 0
    video_runs: int = 0
    rows: list[Summary] = field(default_factory=list)  # stored -> row, publish -> row
    video: Summary | None = None  # stored -> playing (no click: the page selects it)
    sos_stored: Summary | None = None  # trigger -> stored, from the SOS section (when it ran)
    why_not: str | None = None  # no browser here: a reason instead of numbers, not an error
    context: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def row(self) -> Summary | None:
        return next((s for s in self.rows if s.key == "console_stored_row"), None)

    @property
    def row_met(self) -> bool:
        return self.row is not None and self.row.n > 0 and self.row.p99_ms <= self.row_target_ms

    @property
    def video_met(self) -> bool:
        return (self.video is not None and self.video.n > 0
                and self.video.max_ms <= self.video_target_ms)

    def verdict(self) -> str:
        row_target = f"(target: p99 within {self.row_target_ms:g} ms)"
        video_target = f"(target: within {self.video_target_ms:g} ms, every run)"
        if self.why_not:
            return f"operator console: not measured: {self.why_not}"
        row = self.row
        parts = [f"stored -> row visible p99: {row.p99_ms:.0f} ms {row_target} -> "
                 f"{'MET' if self.row_met else 'MISSED'}" if row is not None and row.n
                 else f"stored -> row visible: not measured {row_target}"]
        if self.video is not None and self.video.n:
            parts.append(f"stored -> video playing max: {self.video.max_ms:.0f} ms "
                         f"{video_target} -> {'MET' if self.video_met else 'MISSED'}")
        elif self.video_runs:
            parts.append(f"stored -> video playing: not measured {video_target}")
        line = "; ".join(parts)
        return f"{line} -> INCOMPLETE RUN" if self.errors else line

    def as_dict(self) -> dict[str, Any]:
        return {
            "context": self.context | {"alerts": self.alerts, "devices": self.devices,
                                       "video_runs": self.video_runs},
            "why_not": self.why_not,
            "latency": [s.as_dict() for s in self.rows],
            "video": self.video.as_dict() if self.video is not None else None,
            "sos_trigger_to_stored": self.sos_stored.as_dict() if self.sos_stored else None,
            "verdict": {"row_p99_ms": round(self.row.p99_ms, 3) if self.row else None,
                        "row_target_ms": self.row_target_ms, "row_met": self.row_met,
                        "video_max_ms": round(self.video.max_ms, 3) if self.video else None,
                        "video_target_ms": self.video_target_ms, "video_met": self.video_met,
                        "text": self.verdict()},
            "errors": self.errors,
        }

    def as_table(self) -> str:
        if self.why_not:
            return self.verdict()
        c = self.context
        out = [f"operator console in {c.get('browser', 'headless Chromium')} (headless), the "
               "page open and logged in, SSE from the centre; "
               f"{self.alerts} alerts, one at a time, from {self.devices} enrolled devices, "
               "published as a device does (signed, MQTT QoS 1) through one private Mosquitto "
               "(mutual TLS) to the centre (its store, then the console's event stream)",
               f"video: {self.video_runs} SOS presses on a virtual pillar process with its "
               "camera (real firmware); the page, loaded afresh with nothing selected before "
               "each, selects the new SOS by itself and plays its live view (no click)",
               f"browser, centre and device on one machine and one clock; "
               f"{c.get('cpus', '?')} CPU(s)", ""]
        lines = ([self.sos_stored] if self.sos_stored is not None else []) + self.rows
        lines += [self.video] if self.video is not None else []
        if lines:
            label_w = max(len(s.label) for s in lines) + 2
            out.append(f"{'':{label_w}}{'n':>5}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  (ms)")
            out += [_row(s, label_w) for s in lines]
        out += [""] + [f"ERROR: {e}" for e in self.errors] + [self.verdict()]
        return "\n".join(out)


def combined_json(sos: Report | None, evidence: EvidenceReport | None,
                  upload: UploadReport | None = None, live: LiveReport | None = None,
                  gps: GpsReport | None = None, callback: CallbackReport | None = None,
                  console: ConsoleReport | None = None) -> str:
    """The SOS object as before (when it ran), plus "evidence_video", "upload",
    "live_view", "gps_decoder", "camera_callback" and "console" (each when it ran)."""
    data = sos.as_dict() if sos is not None else {}
    if evidence is not None:
        data["evidence_video"] = evidence.as_dict()
    if upload is not None:
        data["upload"] = upload.as_dict()
    if live is not None:
        data["live_view"] = live.as_dict()
    if gps is not None:
        data["gps_decoder"] = gps.as_dict()
    if callback is not None:
        data["camera_callback"] = callback.as_dict()
    if console is not None:
        data["console"] = console.as_dict()
    return json.dumps(_finite(data), indent=2, allow_nan=False)


def _row(s: Summary, label_w: int) -> str:
    return (f"{s.label:{label_w}}{s.n:>5}{s.p50_ms:>9.2f}{s.p95_ms:>9.2f}"
            f"{s.p99_ms:>9.2f}{s.max_ms:>9.2f}")


def _finite(value: Any) -> Any:
    """NaN (a line with no samples) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
