"""Routing at run time: escalation of untaken alerts and notifications to other systems.

`serve` (and the simulator) make one `AlertRouting` beside the MQTT service. The routing
decision itself is made when an alert is stored (CenterService's `router`, RouteTable.route_at)
and written with it; this part:

- runs the EscalationWatch over the open alerts (escalation.py): a step it records is printed,
  pushed to the console and sent to the webhooks that want `escalated`;
- queues the webhook notifications (webhook.py): `alert` for each new alert, `closed` when its
  device applied the close. Queuing is idempotent by event id, so several instances, a re-sent
  alert or a repeated answer notify once.

An alert counts as taken (escalation stops) once someone claimed it in the console or it is no
longer open (acknowledged through the CLI, say).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control_center import incidents
from control_center.escalation import (
    AlertState,
    EscalationLog,
    EscalationWatch,
    Step,
    desk_policies,
)
from control_center.routing import RouteTable
from control_center.store import AlertRecord, Store
from control_center.webhook import (
    Escalation,
    WebhookOutbox,
    WebhookSender,
    WebhookTarget,
    alert_fields,
)

log = logging.getLogger("sos.center.routing")


class AlertRouting:
    def __init__(self, store: Store, routes: RouteTable, webhooks: list[WebhookTarget], *,
                 on_step: Callable[[Step], None] = lambda step: None,
                 clock: Callable[[], float] = time.time, interval_s: float = 1.0,
                 incident_radius_m: float = incidents.RADIUS_M,
                 incident_window_s: float = incidents.WINDOW_S) -> None:
        self.store = store
        self.routes = routes
        self._radius_m = incident_radius_m
        self._window_s = incident_window_s
        self._clock = clock
        self._announce = on_step
        self.log = EscalationLog(Path(store.path), clock=clock)
        self.watch = EscalationWatch(self.log, desk_policies(routes.desks), self._open_alerts,
                                     self._on_step, clock=clock, interval_s=interval_s)
        self.webhooks = WebhookSender(WebhookOutbox(Path(store.path)), webhooks, clock=clock)

    def start(self) -> None:
        self.catch_up()
        self.webhooks.start()
        self.watch.start()

    def stop(self) -> None:
        self.watch.stop()
        self.webhooks.stop()
        self.webhooks.outbox.close()
        self.log.close()

    # -- the centre's events ---------------------------------------------------------------------
    def on_center_event(self, event: Any) -> None:
        """CenterService's observer: a new alert, and an applied close, go to the webhooks."""
        message = event.message
        if event.kind == "alert" and event.new:
            self._join_incident(message["alert_id"])
            self._notify("alert", message["alert_id"])
        elif (event.kind == "event" and event.new and message.get("type") == "command_applied"
              and message.get("command_type") == "close" and message.get("alert_id")):
            self._notify("closed", message["alert_id"])

    def _notify(self, kind: str, alert_id: str, escalation: Escalation | None = None) -> None:
        record = self.store.alert(alert_id)
        if record is None or not self.webhooks.targets:
            return
        reached = [s["to_desk"] for s in self.log.steps(alert_id) if s["to_desk"]]
        try:
            self.webhooks.notify(kind, alert_fields(record, desks=self.desks_of(record),
                                                    close_reason=self._close_reason(record)),
                                 escalation=escalation, reached=reached)
        except (ValueError, OSError, sqlite3.Error) as exc:  # a body our schema refuses; the
            log.error("could not queue the %s notification of alert %s: %s", kind,  # store
                      alert_id[:8], exc)

    def catch_up(self) -> None:
        """At start: queue again what a crash between storing and queuing could have lost
        (`alert` of each open alert, `escalated` of each recorded step). Queuing is keyed by
        event id, so what was queued before is not queued twice."""
        for record in self.store.alerts(open_only=True):
            self._notify("alert", record.alert_id)
            for step in self.log.steps(record.alert_id):
                self._notify("escalated", record.alert_id,
                             Escalation(step["step"], step["to_desk"], step["due_at"]))

    def _close_reason(self, record: AlertRecord) -> str | None:
        if record.status != "closed":
            return None
        notes = [c["note"] for c in self.store.commands(record.alert_id)
                 if c["type"] == "close" and c.get("note")]
        return notes[-1] if notes else None

    # -- incidents -------------------------------------------------------------------------------
    def _join_incident(self, alert_id: str) -> None:
        """Give a new alert its incident (incidents.py): its token's dispatch call, or alerts
        near it in space and time. Done by the instance that stored it, right after."""
        record = self.store.alert(alert_id)
        if record is None:
            return
        call_id = self.store.current_call(record.device_id)
        recent = self.store.recent_alerts(record.stored_at - self._window_s)
        incident = incidents.incident_for(
            _placed(record, call_id), [_placed(r, r.call_id) for r in recent],
            radius_m=self._radius_m, window_s=self._window_s)
        self.store.set_incident(alert_id, incident, call_id)

    # -- escalation ------------------------------------------------------------------------------
    def desks_of(self, record: AlertRecord) -> tuple[str, ...]:
        """The alert's desks that the table still has; an alert stored before routing, whose
        routing failed, or whose desks a later config removed belongs to the catch-all rule's
        desks (so it is still shown and still escalates)."""
        known = tuple(d for d in record.desks if d in self.routes.desk_ids)
        return known or self.routes.rules[-1].desks

    def _open_alerts(self) -> list[AlertState]:
        return [AlertState(r.alert_id, r.stored_at, self.desks_of(r),
                           r.claimed_by is not None or r.status != "open",
                           r.status == "closed", r.device_offline)
                for r in self.store.alerts(open_only=True)]

    def _on_step(self, step: Step) -> None:
        self._notify("escalated", step.alert_id,
                     Escalation(step.step, step.to_desk, step.at))
        self._announce(step)

    def steps(self, alert_id: str) -> list[dict[str, Any]]:
        return self.log.steps(alert_id)


def _placed(record: AlertRecord, call_id: str | None) -> incidents.Placed:
    return incidents.Placed(record.alert_id, record.stored_at, record.position.get("lat"),
                            record.position.get("lon"), call_id, record.incident_id)


def operator_sees(works: set[str], staffed: set[str], desks: list[str],
                  escalated_to: list[str | None]) -> bool:
    """Whether an operator who works the desks `works` has this alert in their queue: routed or
    escalated to one of them. Everyone has it when they work no desk, when it has no desk, or
    when no desk it reached is `staffed` (lists an operator): an alert must reach someone."""
    if not works or not desks:
        return True
    reached = set(desks) | {d for d in escalated_to if d is not None}
    if not reached & staffed:
        return True
    return bool(works & reached)
