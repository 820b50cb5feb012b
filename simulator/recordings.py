"""The `recording`, `upload` and `live` objects of a scenario's result, and what is wrong.

Checked from the outside, as an auditor would: the segments on each device's card and in the
centre's evidence store, the receipts the device kept, `sos-evidence verify` on the centre's
copy, and the live chunks the centre accepted during each SOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from control_center.evidence import keys_from_fleet, verify_directory

if TYPE_CHECKING:
    from simulator.runner import ScenarioRun

SEGMENT_GLOB = "[0-9]" * 6 + ".json"


def _manifests(directory: Path) -> dict[int, dict[str, Any]]:
    found = {}
    for path in sorted(directory.glob(SEGMENT_GLOB)) if directory.is_dir() else []:
        try:
            found[int(path.name[:6])] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # verify reports it
    return found


def _receipts(path: Path) -> dict[int, dict[str, Any]]:
    receipts = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                receipt = json.loads(line)
                receipts[receipt["seq"]] = receipt
    return receipts


def recording_results(run: ScenarioRun, alerts: list[dict[str, Any]]) -> dict[str, Any]:
    """{"recording": ..., "upload": ..., "live": ..., "problems": [...]}, per device with a
    camera, and totals."""
    problems: list[str] = []
    recording: dict[str, Any] = {"devices": {}}
    upload: dict[str, Any] = {"devices": {}}
    fleet_keys = keys_from_fleet(run.broker.fleet.directory)
    for spec in run.scenario.devices:
        if not spec.camera:
            continue
        data = run.workdir / "devices" / spec.id / "data"
        card = _manifests(data / "recordings")
        centre_dir = run.workdir / "evidence" / spec.id
        centre = _manifests(centre_dir)
        receipts = _receipts(data / "receipts.jsonl")
        every = {**centre, **card}  # the same manifest where both hold it
        report = verify_directory(centre_dir if centre else data / "recordings", fleet_keys)
        recording["devices"][spec.id] = {
            "segments": len(every),
            "total_s": round(sum(m["end_mono"] - m["start_mono"] for m in every.values()), 1),
            "evidence_segments": sum("evidence" in m["flags"] for m in every.values()),
            "sos_segments": sum("sos" in m["flags"] for m in every.values()),
            "calls": sorted({m["call_id"] for m in every.values() if m["call_id"]}),
            "verify": {"where": "centre" if centre else "device", "ok": report.ok,
                       "summary": report.summary(),
                       "errors": [str(f) for f in report.errors]},
        }
        if not every:
            problems.append(f"{spec.id}: recorded no segment")
        if not report.ok:
            problems.append(f"{spec.id}: {report.summary()}")
        docked = any(s.action == "dock" and s.device == spec.id for s in run.scenario.timeline)
        passes = run.recorder.find(source=spec.id, kind="upload")
        gone_without_receipt = sorted(seq for seq in centre.keys() | receipts.keys()
                                      if seq not in card and seq not in receipts)
        upload["devices"][spec.id] = {
            "segments_uploaded": sum(len(p.data["uploaded"]) for p in passes),
            "bytes": sum(p.data["bytes_sent"] for p in passes),
            "bytes_resent": sum(p.data["bytes_resent"] for p in passes),
            "receipts": len(receipts),
            "verified_at_centre": len(centre) if report.ok and centre else 0,
            "left_on_device": sorted(card),
            "gone_without_receipt": gone_without_receipt,
            "refused": {k: v for p in passes for k, v in p.data["refused"].items()},
        }
        if docked:
            missing = sorted(every.keys() - centre.keys())
            if missing:
                problems.append(f"{spec.id}: segments {missing} never reached the centre")
            if card:
                problems.append(f"{spec.id}: segments {sorted(card)} still on the device after "
                                "the upload")
        if gone_without_receipt:
            problems.append(f"{spec.id}: segments {gone_without_receipt} left the device "
                            "without a receipt")
    recording["segments"] = sum(d["segments"] for d in recording["devices"].values())
    recording["total_s"] = round(sum(d["total_s"] for d in recording["devices"].values()), 1)
    recording["evidence_segments"] = sum(d["evidence_segments"]
                                         for d in recording["devices"].values())
    recording["verify"] = all(d["verify"]["ok"] for d in recording["devices"].values())
    for key in ("segments_uploaded", "bytes", "receipts", "verified_at_centre"):
        upload[key] = sum(d[key] for d in upload["devices"].values())
    return {"recording": recording, "upload": upload, "live": _live(run, alerts, problems),
            "problems": problems}


def _live(run: ScenarioRun, alerts: list[dict[str, Any]], problems: list[str]) -> dict[str, Any]:
    stats = run.live.stats() if run.live is not None else {}
    per_alert = {}
    camera_devices = {s.id for s in run.scenario.devices if s.camera}
    for alert in alerts:
        if alert["device_id"] not in camera_devices:
            continue
        chunks = run.recorder.find(kind="live_chunk", alert_id=alert["alert_id"])
        per_alert[alert["alert_id"]] = {
            "chunks": len(chunks),
            "playlist": str(run.workdir / "live" / alert["alert_id"] / "index.m3u8"),
        }
        if not chunks:
            problems.append(f"alert {alert['alert_id'][:8]}: no live video reached the centre")
    return {**stats, "alerts": per_alert}
