// The operator console (docs/CONSOLE-API.md). One plain script, no build step.
//
// Data flow: GET /api/alerts?all=1 and /api/devices give the state, the Server-Sent Events
// stream (/events) keeps it current; every change re-renders from the in-memory state. The only
// timer re-renders ages ("2 min 05 s") and sounds the alarm: nothing is polled.
//
// Everything user-visible is set with textContent (never innerHTML): device ids, reasons and
// error texts come from devices and servers and must not become markup. That includes Leaflet:
// its tooltips, popups and divIcons take a string as HTML, so they are given DOM elements.
"use strict";

(function () {
  // -- state -------------------------------------------------------------------------------
  const state = {
    me: null, // {user, role, rights, csrf, tiles}
    alerts: {}, // alert_id -> Alert
    devices: {}, // device_id -> Device
    selectedId: null,
    awaiting: {}, // alert_id -> {type: "ack"|"close", delivered} until the device applies it
    connection: "connecting",
    loaded: false,
  };

  const CLOSED_SHOWN = 100; // the server sends the newest closed alerts only, this many
  const STATUS_RANK = { open: 0, acknowledged: 1, closed: 2 };

  // For the browser tests and the benchmark (tests/test_console_browser.py,
  // simulator/console_watch.py): read-only views of the page's state, plus select().
  const sosConsole = {
    ready: false, // true once the user and the first alerts and devices are loaded
    map: null, // the Leaflet map
    state,
    rowShownAt: {}, // alert_id -> epoch ms when its row was first put in the DOM
    videoPlayingAt: {}, // alert_id -> epoch ms of the video's first 'playing' event
    alarmActive,
    markerFor, // alert_id -> the selected alert's L.marker, or null
    selected: () => state.selectedId,
    csrf: () => (state.me ? state.me.csrf : null),
    select: (alertId) => selectAlert(alertId, { focusRow: false }),
    ticks: 0, // 1 s ticks so far (a test waits for some to pass)
    beepsHeard: 0, // beeps whose samples reached the speaker's node (not merely scheduled)
    loudBeepsHeard: 0, // of those, the louder ones of an escalated alert
  };
  window.sosConsole = sosConsole;

  const $ = (id) => document.getElementById(id);
  const nowMs = () => Date.now();
  const epochNow = () => performance.timeOrigin + performance.now();

  function can(right) {
    return !!(state.me && Array.isArray(state.me.rights) && state.me.rights.includes(right));
  }

  // -- HTTP ----------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const init = { method, credentials: "same-origin", headers };
    if (method !== "GET") {
      headers["Content-Type"] = "application/json";
      headers["X-CSRF-Token"] = state.me ? state.me.csrf : "";
      init.body = JSON.stringify(body || {});
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (_) {
      throw new ApiError(0, "cannot reach the control centre server");
    }
    if (response.status === 401) {
      window.location.assign("/login");
      throw new ApiError(401, "not logged in");
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const text = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
      throw new ApiError(response.status, text);
    }
    return data;
  }

  function errorMessage(err) {
    if (err instanceof ApiError && err.status) return `${err.message} (HTTP ${err.status})`;
    return err && err.message ? err.message : String(err);
  }

  // -- formatting ----------------------------------------------------------------------------
  const DASH = "—";
  const pad2 = (n) => String(n).padStart(2, "0");

  /** "45 s", "2 min 05 s", "1 h 02 min", "3 d 04 h"; a narrow column breaks it only between
   *  its parts (no-break space between number and unit). */
  function formatDuration(seconds) {
    if (seconds == null || !isFinite(seconds)) return DASH;
    const s = Math.max(0, Math.floor(seconds));
    const nb = "\u00a0";
    if (s < 60) return `${s}${nb}s`;
    if (s < 3600) return `${Math.floor(s / 60)}${nb}min ${pad2(s % 60)}${nb}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}${nb}h ${pad2(Math.floor((s % 3600) / 60))}${nb}min`;
    return `${Math.floor(s / 86400)}${nb}d ${pad2(Math.floor((s % 86400) / 3600))}${nb}h`;
  }

  /** The browser's UTC offset as "+01:00", or "Z" when local time is UTC. */
  function offsetText(date) {
    const minutes = -date.getTimezoneOffset();
    if (minutes === 0) return "Z";
    const sign = minutes > 0 ? "+" : "-";
    const abs = Math.abs(minutes);
    return `${sign}${pad2(Math.floor(abs / 60))}:${pad2(abs % 60)}`;
  }

  /** Local wall-clock time with its offset, the date too when it is not today: "14:05:09 +01:00". */
  function formatTime(ms) {
    if (ms == null || !isFinite(ms)) return DASH;
    const d = new Date(ms);
    const time = `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
    const today = new Date();
    const sameDay = d.toDateString() === today.toDateString();
    const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} `;
    const offset = offsetText(d);
    return `${sameDay ? "" : date}${time}${offset === "Z" ? "Z" : ` ${offset}`}`;
  }

  function utcTime(ms) {
    return new Date(ms).toISOString().slice(11, 19) + "Z";
  }

  /** Local time, and UTC beside it unless local time is UTC: "15:05:09 +01:00 (14:05:09Z)". */
  function formatTimeBoth(ms) {
    if (ms == null || !isFinite(ms)) return DASH;
    const local = formatTime(ms);
    return offsetText(new Date(ms)) === "Z" ? local : `${local} (${utcTime(ms)})`;
  }

  const isoMs = (iso) => {
    const t = iso ? Date.parse(iso) : NaN;
    return isNaN(t) ? null : t;
  };
  const epochToMs = (epoch) => (epoch == null ? null : epoch * 1000);

  function formatBattery(battery) {
    if (battery == null) return "mains";
    const pct = battery.percent == null ? "?" : Math.round(battery.percent);
    return `${pct} %${battery.charging ? " charging" : ""}`;
  }

  // What the device shows; a wearer's cancel request is the one to shout about.
  const FEEDBACK_TEXT = {
    sending: "Sending",
    delivered: "Delivered",
    acknowledged: "Acknowledged",
    closed: "Closed",
    cancelled: "Cancelled",
    idle: "Idle",
    cancel_requested: "CANCEL REQUESTED",
  };

  function feedbackText(alert) {
    const shown = alert.feedback == null ? DASH : FEEDBACK_TEXT[alert.feedback] || alert.feedback;
    return alert.device_offline ? `${shown}\ndevice OFFLINE` : shown;
  }

  function hasFix(position) {
    return !!position && position.lat != null && position.lon != null;
  }

  /** How old the alert's newest position is now: stored `position_at` plus the fix's age then. */
  function positionAgeText(alert) {
    const p = alert.position;
    if (!hasFix(p) || p.source === "none") return "no position";
    if (p.source === "surveyed") return "surveyed";
    if (alert.status === "closed") return p.source === "live" ? "live GPS" : "last known GPS"; // no longer ageing
    const at = epochToMs(alert.position_at);
    if (at == null) return p.age_s == null ? DASH : `${formatDuration(p.age_s)} old`;
    const age = (nowMs() - at) / 1000 + (p.age_s || 0);
    const label = p.source === "last_known" ? "\nLAST KNOWN" : "";
    return `${formatDuration(age)} old${label}`;
  }

  function positionText(alert) {
    const p = alert.position;
    if (!hasFix(p) || p.source === "none") return "UNKNOWN — the device has no position";
    const where = `${p.lat.toFixed(5)}, ${p.lon.toFixed(5)}`;
    const acc = p.accuracy_m != null ? ` ±${Math.round(p.accuracy_m)} m` : "";
    const source = { live: "live GPS", last_known: "LAST KNOWN GPS", surveyed: "surveyed kiosk position" };
    const age = alert.status === "closed" || p.source === "surveyed" ? "" : `; ${positionAgeText(alert)}`;
    return `${where}${acc} (${source[p.source] || p.source}${age})`;
  }

  /** Who has it, short: "NOT TAKEN", "alice", "alice, acked", "closed: sam". */
  function operatorText(alert) {
    if (alert.closed_by) return `closed: ${alert.closed_by}`;
    if (!alert.claimed_by) return alert.acked_by ? `acked: ${alert.acked_by}` : "NOT TAKEN";
    if (!alert.acked_by) return alert.claimed_by;
    return alert.acked_by === alert.claimed_by
      ? `${alert.claimed_by}, acked` : `${alert.claimed_by}, acked: ${alert.acked_by}`;
  }

  function statusText(alert) {
    return (alert.status || "").toUpperCase();
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "className") node.className = v;
      else node.setAttribute(k, v);
    }
    if (text != null) node.textContent = text;
    return node;
  }

  // -- applying data -------------------------------------------------------------------------
  /** Whether `next` is a view of the alert at least as new as `current`. Views are built on
   *  several server threads, so an event, a POST's answer and the snapshot may arrive in
   *  another order than they were read: each carries `as_of` (the server's monotonic clock,
   *  ns, when it was read), and the larger wins. Without it (an older server), a POST's
   *  answer must not move the alert backwards in status or track; the rest is taken as it
   *  comes. */
  function isNotOlder(next, current, { fromResponse = false } = {}) {
    if (!current) return true;
    if (typeof next.as_of === "number" && typeof current.as_of === "number") {
      return next.as_of >= current.as_of;
    }
    if (!fromResponse) return true;
    const rank = (a) => STATUS_RANK[a.status] ?? 0;
    if (rank(next) !== rank(current)) return rank(next) > rank(current);
    return (next.track || []).length >= (current.track || []).length;
  }

  /** The newer of two views of one alert (either may be missing). */
  function newerAlert(a, b) {
    if (!a) return b;
    if (!b) return a;
    return isNotOlder(a, b) ? a : b;
  }

  /** `fromEvent`: it came on the stream, so an alert not seen before is a new SOS (see
   *  autoSelect). */
  function applyAlert(alert, { fromResponse = false, fromEvent = false } = {}) {
    if (!alert || !alert.alert_id) return;
    const current = state.alerts[alert.alert_id];
    if (!isNotOlder(alert, current, { fromResponse })) return;
    state.alerts[alert.alert_id] = alert;
    if (fromEvent && !current) autoSelect(alert);
    settleAwaiting(alert);
    followVoice(alert);
    scheduleRender();
  }

  /** A new open alert while the operator has nothing selected is selected at once, so its
   *  live video starts without a click. An alert already selected (by the operator or by this)
   *  is never switched away from. */
  function autoSelect(alert) {
    if (!state.loaded || state.selectedId || alert.status !== "open") return;
    state.selectedId = alert.alert_id;
    setText($("action-error"), "");
    mapFitPending = true;
  }

  function applyDevice(device) {
    if (!device || !device.device_id) return;
    state.devices[device.device_id] = device;
    scheduleRender();
  }

  /** Clears "sent, waiting for the device" once the alert shows the decision. */
  function settleAwaiting(alert) {
    const waiting = state.awaiting[alert.alert_id];
    if (!waiting) return;
    const done =
      (waiting.type === "ack" && alert.status !== "open") ||
      (waiting.type === "close" && alert.status === "closed");
    const rejected = (alert.pending || []).some(
      (p) => p.type === waiting.type && p.status === "rejected",
    );
    if (done || rejected) delete state.awaiting[alert.alert_id];
  }

  // -- the event stream and (re)synchronisation ---------------------------------------------
  let eventSource = null;
  let eventBuffer = null; // events received while a snapshot is loading, replayed after it
  let resyncRunning = false;
  let resyncAgain = false;

  function handleEvent(kind, raw) {
    let data;
    try {
      data = JSON.parse(raw);
    } catch (_) {
      return;
    }
    if (eventBuffer) eventBuffer.push([kind, data]);
    else if (kind === "alert") applyAlert(data, { fromEvent: true });
    else applyDevice(data);
  }

  // The snapshot is loaded after the stream opened, and the events received meanwhile are
  // applied after it. An event is not necessarily newer than the snapshot (the server builds
  // views on several threads, so one read before the snapshot may be sent after it): every
  // view of an alert is kept only if its `as_of` is not older than the one held (applyAlert,
  // newerAlert), so the order of arrival does not matter. Devices' records have no such stamp:
  // a device's record changes seldom and is pushed whole again on every change.
  async function resync() {
    if (resyncRunning) {
      resyncAgain = true;
      return;
    }
    resyncRunning = true;
    eventBuffer = eventBuffer || [];
    try {
      do {
        resyncAgain = false;
        try {
          const [alerts, devices] = await Promise.all([
            api("GET", "/api/alerts?all=1"),
            api("GET", "/api/devices"),
          ]);
          // Alerts not in the snapshot are dropped (closed ones beyond the newest the server
          // sends); those in both keep the newer view.
          const fresh = {};
          for (const a of alerts.alerts || []) fresh[a.alert_id] = newerAlert(a, state.alerts[a.alert_id]);
          state.alerts = fresh;
          state.devices = {};
          for (const d of devices.devices || []) state.devices[d.device_id] = d;
          state.loaded = true;
          setConnectionNote(null);
        } catch (err) {
          setConnectionNote(`Could not load alerts: ${errorMessage(err)}`);
        }
      } while (resyncAgain);
    } finally {
      const buffered = eventBuffer || [];
      eventBuffer = null;
      resyncRunning = false;
      for (const [kind, data] of buffered) {
        if (kind === "alert") applyAlert(data, { fromEvent: true });
        else applyDevice(data);
      }
      for (const a of Object.values(state.alerts)) settleAwaiting(a);
      scheduleRender();
    }
  }

  function connectEvents() {
    if (eventSource) eventSource.close();
    const source = new EventSource("/events");
    eventSource = source;
    source.addEventListener("open", () => {
      setConnection("live");
      resync(); // also after a reconnect: events sent while we were away are lost
    });
    source.addEventListener("alert", (e) => handleEvent("alert", e.data));
    source.addEventListener("device", (e) => handleEvent("device", e.data));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The server refused the stream (e.g. the session ended): EventSource gives up then.
        setConnection("lost");
        checkSessionThenReconnect(source);
      } else {
        setConnection("reconnecting");
      }
    });
  }

  async function checkSessionThenReconnect(source) {
    try {
      await api("GET", "/api/me"); // a 401 goes to the log-in page
    } catch (_) {
      // offline: try the stream again below
    }
    setTimeout(() => {
      if (eventSource === source) connectEvents();
    }, 3000);
  }

  function setConnection(value) {
    state.connection = value;
    const node = $("connection");
    node.dataset.state = value;
    const text = {
      connecting: "Connecting…",
      live: "Live",
      reconnecting: "Connection lost — reconnecting…",
      lost: "Connection lost — retrying…",
    };
    setText(node, text[value] || value);
  }

  function setConnectionNote(text) {
    const node = $("connection");
    if (text) {
      node.dataset.state = "error";
      setText(node, text);
    } else {
      setConnection(state.connection);
    }
  }

  // -- rendering -----------------------------------------------------------------------------
  let renderQueued = false;

  /** Renders once after the current task, however many events it applied. */
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    queueMicrotask(() => {
      renderQueued = false;
      render();
    });
  }

  function render() {
    renderQueue();
    renderDetail();
    renderAlarm();
    renderMap();
    renderVideo();
    renderFleet();
    renderDispatchDevices();
  }

  function sortedAlerts() {
    return Object.values(state.alerts).sort((a, b) => (b.stored_at || 0) - (a.stored_at || 0));
  }

  // -- the queue -----------------------------------------------------------------------------
  const rowsById = new Map(); // alert_id -> <tr>

  const ALERT_CELLS = ["since", "device", "battery", "feedback", "position", "operator", "status"];

  function makeAlertRow(alert) {
    const tr = el("tr", { tabindex: "0", "data-alert-id": alert.alert_id });
    for (const name of ALERT_CELLS) tr.appendChild(el("td", { className: `cell-${name}` }));
    tr.addEventListener("click", () => selectAlert(alert.alert_id, { focusRow: false }));
    tr.addEventListener("keydown", onRowKey);
    return tr;
  }

  function onRowKey(event) {
    const tr = event.currentTarget;
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      selectAlert(tr.dataset.alertId, { focusRow: false });
    } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const next = event.key === "ArrowDown" ? tr.nextElementSibling : tr.previousElementSibling;
      if (next) selectAlert(next.dataset.alertId, { focusRow: true });
    }
  }

  function fillAlertRow(tr, alert) {
    tr.dataset.status = alert.status;
    tr.dataset.claimedBy = alert.claimed_by || "";
    tr.classList.toggle("unclaimed", alert.status === "open" && !alert.claimed_by);
    tr.classList.toggle("selected", alert.alert_id === state.selectedId);
    tr.setAttribute("aria-selected", String(alert.alert_id === state.selectedId));
    const cells = tr.children;
    setText(cells[0], formatDuration((nowMs() - (isoMs(alert.created_at) ?? nowMs())) / 1000));
    setText(cells[1], `${alert.device_id}\n${alert.device_kind || ""}`.trim());
    setText(cells[2], formatBattery(alert.battery));
    setText(cells[3], feedbackText(alert));
    setText(cells[4], positionAgeText(alert));
    setText(cells[5], operatorText(alert));
    const badge = cells[6].firstElementChild || cells[6].appendChild(el("span"));
    badge.className = `badge badge-${alert.status}${tr.classList.contains("unclaimed") ? " badge-unclaimed" : ""}`;
    setText(badge, statusText(alert));
  }

  /** Puts `rows` into `tbody` in this order, moving only rows out of place (keeps focus). */
  function placeRows(tbody, rows) {
    rows.forEach((tr, i) => {
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
    while (tbody.children.length > rows.length) tbody.lastElementChild.remove();
  }

  function renderQueue() {
    const all = sortedAlerts();
    const active = all.filter((a) => a.status !== "closed");
    const closed = all.filter((a) => a.status === "closed");
    const shownClosed = closed.slice(0, CLOSED_SHOWN);
    const wanted = new Set([...active, ...shownClosed].map((a) => a.alert_id));

    for (const [id, tr] of rowsById) {
      if (!wanted.has(id)) {
        tr.remove();
        rowsById.delete(id);
      }
    }
    const rowFor = (alert) => {
      let tr = rowsById.get(alert.alert_id);
      if (!tr) {
        tr = makeAlertRow(alert);
        rowsById.set(alert.alert_id, tr);
      }
      fillAlertRow(tr, alert);
      return tr;
    };
    placeRows($("alert-rows"), active.map(rowFor));
    placeRows($("closed-rows"), shownClosed.map(rowFor));

    // Recorded after the rows are in the document (the benchmark's "shown" moment).
    const shownAt = epochNow();
    for (const id of wanted) {
      if (!(id in sosConsole.rowShownAt)) sosConsole.rowShownAt[id] = shownAt;
    }

    $("queue-empty").hidden = active.length > 0 || !state.loaded;
    // The total is not known here: the page loads the newest CLOSED_SHOWN closed alerts.
    const full = closed.length >= CLOSED_SHOWN;
    setText($("closed-count"), full ? `(the newest ${CLOSED_SHOWN})` : `(${closed.length})`);
    const more = $("closed-more");
    more.hidden = !full;
    setText(more, `Showing the newest ${CLOSED_SHOWN} closed alerts; older ones are not loaded here.`);
    const unclaimed = active.filter((a) => a.status === "open" && !a.claimed_by).length;
    setText($("alerts-count"), active.length ? `(${active.length} active${unclaimed ? `, ${unclaimed} NEW` : ""})` : "");
  }

  function selectAlert(alertId, { focusRow }) {
    if (!state.alerts[alertId]) return;
    if (state.selectedId !== alertId) {
      state.selectedId = alertId;
      setText($("action-error"), "");
      mapFitPending = true;
    }
    render();
    if (focusRow) {
      const tr = rowsById.get(alertId);
      if (tr) tr.focus();
    }
  }

  // -- the selected alert ----------------------------------------------------------------------
  function renderDetail() {
    const alert = state.selectedId ? state.alerts[state.selectedId] : null;
    const section = $("details");
    section.dataset.alertId = alert ? alert.alert_id : "";
    $("detail-empty").hidden = !!alert;
    $("detail-body").hidden = !alert;
    if (!alert) {
      setText($("detail-title"), "No alert selected");
      return;
    }
    const untaken = alert.status === "open" && !alert.claimed_by ? " — NOT TAKEN" : "";
    setText($("detail-title"), `SOS ${alert.device_id} (${alert.device_kind}) — ${statusText(alert)}${untaken}`);
    section.dataset.status = alert.status;
    renderFacts(alert);
    renderActions(alert);
    renderPending(alert);
    renderVoice();
  }

  function renderFacts(alert) {
    const created = isoMs(alert.created_at);
    const trigger = alert.trigger ? ` (${alert.trigger})` : "";
    const facts = [
      ["Pressed", created == null ? DASH
        : `${formatTimeBoth(created)}${trigger}, ${formatDuration((nowMs() - created) / 1000)} ago`],
      ["Position", positionText(alert)],
      ["Battery", formatBattery(alert.battery)],
      ["Device shows", feedbackText(alert)],
    ];
    if (alert.cancel_requested_at) {
      const t = isoMs(alert.cancel_requested_at);
      facts.push(["Wearer", `asked to CANCEL at ${t == null ? alert.cancel_requested_at : formatTime(t)}`]);
    }
    const who = (verb, name, at) => (name ? [`${verb} by ${name} at ${formatTime(epochToMs(at))}`] : []);
    const people = [
      ...who("taken", alert.claimed_by, alert.claimed_at),
      ...who("acknowledged", alert.acked_by, alert.acked_at),
    ];
    facts.push(["Operator", people.length ? people.join("; ") : "NOT TAKEN"]);
    if ((alert.incident || []).length) {
      const others = alert.incident.map((o) => `${o.device_id} (${o.device_kind}, ${o.status})`);
      const call = alert.call_id ? ` on dispatch call ${alert.call_id}` : "";
      facts.push(["Incident", `with ${others.length} other alert(s)${call}: ${others.join(", ")}`]);
    } else if (alert.call_id) {
      facts.push(["Dispatch call", alert.call_id]);
    }
    if (alert.desks && alert.desks.length) {
      facts.push(["Desks", `${alert.desks.join(", ")}${alert.route_rule ? ` (rule: ${alert.route_rule})` : ""}`]);
    }
    for (const step of alert.escalations || []) {
      const to = step.to_desk ? `to ${step.to_desk} and the supervisors` : "to the supervisors only";
      const offline = step.device_offline ? "; device OFFLINE" : "";
      facts.push([`Escalated (${step.step})`, `${formatTime(epochToMs(step.due_at))}: nobody took it; ${to}${offline}`]);
    }
    if (alert.status === "closed" || alert.closed_by) {
      facts.push(["Closed", `${who("closed", alert.closed_by, alert.closed_at)[0] || DASH}: ${alert.close_reason || DASH}`]);
    }
    facts.push(["Alert id", alert.alert_id]);

    const dl = $("detail-facts");
    // Rebuilt only when the number of lines changes; otherwise the text is updated in place.
    if (dl.children.length !== facts.length * 2) {
      dl.replaceChildren();
      for (let i = 0; i < facts.length; i++) dl.append(el("dt"), el("dd"));
    }
    facts.forEach(([term, value], i) => {
      setText(dl.children[i * 2], term);
      setText(dl.children[i * 2 + 1], value);
      dl.children[i * 2 + 1].classList.toggle(
        "warn", term === "Wearer" || term.startsWith("Escalated") || value.startsWith("UNKNOWN"));
    });
  }

  /** The decision of this type the device has not applied yet: this page's own (`awaiting`,
   *  with whether the broker delivered it) or the alert's `pending` (anyone's, also after a
   *  reload). null if none; a rejected one is none. */
  function pendingDecision(alert, type) {
    const waiting = state.awaiting[alert.alert_id];
    if (waiting && waiting.type === type) return { operator: null, queued: waiting.delivered === false };
    const p = (alert.pending || []).find((c) => c.type === type && (c.status === "pending" || c.status === "sent"));
    return p ? { operator: p.operator || null, queued: p.status === "pending" } : null;
  }

  function renderActions(alert) {
    const mayAct = can("act");
    const closed = alert.status === "closed";
    const mine = state.me && alert.claimed_by === state.me.user;
    const ackPending = pendingDecision(alert, "ack");
    const closePending = pendingDecision(alert, "close");
    const holder = alert.claimed_by && !mine && !closed ? alert.claimed_by : null;
    const buttons = {
      claim: mayAct && !closed && !mine,
      // A close on its way decides more than an acknowledgement: no ack beside it.
      ack: mayAct && alert.status === "open" && !ackPending && !closePending,
      close: mayAct && !closed && !closePending,
      takeover: !!holder && can("takeover"),
    };
    for (const [action, enabled] of Object.entries(buttons)) {
      const button = document.querySelector(`#details [data-action="${action}"]`);
      button.disabled = !enabled || busyAction !== null;
    }
    setText(document.querySelector('#details [data-action="claim"]'), mine ? "Taken by you" : "Take");
    // Only for a supervisor, and only while someone else holds the alert.
    const takeover = document.querySelector('#details [data-action="takeover"]');
    takeover.hidden = !buttons.takeover;
    setText(takeover, holder ? `Take over from ${holder}` : "Take over");
    $("close-reason").disabled = !mayAct || closed;
    $("close-note").disabled = !mayAct || closed;

    const note = $("rights-note");
    note.hidden = mayAct;
    if (!mayAct && state.me) {
      setText(note, `Your role (${state.me.role}) may view alerts but not take, acknowledge or close them.`);
    }

    const status = $("action-status");
    const lines = [];
    for (const [what, p] of [["Close", closePending], ["Acknowledge", ackPending]]) {
      if (!p) continue;
      const by = !p.operator ? "" : state.me && p.operator === state.me.user ? " by you" : ` by ${p.operator}`;
      const offline = p.queued ? " (device offline: sent when it reconnects)" : "";
      lines.push(`${what}${by} sent, waiting for the device${offline}`);
    }
    if (closePending && alert.status === "open") lines.push("Acknowledge is off until the device has the close.");
    setText(status, lines.join("\n"));
  }

  function renderPending(alert) {
    const pending = alert.pending || [];
    $("pending-box").hidden = pending.length === 0;
    const list = $("pending-list");
    list.replaceChildren(
      ...pending.map((p) => {
        const reason = p.reason_code ? `, ${p.reason_code}` : "";
        const by = !p.operator ? "" : state.me && p.operator === state.me.user ? " by you" : ` by ${p.operator}`;
        return el("li", { "data-status": p.status || "" },
          `${p.type}${reason}${by}: ${(p.status || "").toUpperCase()}`);
      }),
    );
  }

  let busyAction = null;

  async function runAction(action) {
    const alert = state.alerts[state.selectedId];
    if (!alert || busyAction) return;
    const errorLine = $("action-error");
    setText(errorLine, "");
    let body;
    if (action === "close") {
      const reason = $("close-reason").value;
      const note = $("close-note").value.trim();
      body = { reason: (note ? `${reason}: ${note}` : reason).slice(0, 200) };
    }
    busyAction = action;
    renderDetail();
    try {
      const path = `/api/alerts/${encodeURIComponent(alert.alert_id)}/${action}`;
      const answer = await api("POST", path, body);
      if (action === "claim" || action === "takeover") {
        applyAlert(answer, { fromResponse: true });
      } else {
        const command = (answer && answer.command) || {};
        state.awaiting[alert.alert_id] = { type: action, delivered: command.delivered };
        settleAwaiting(state.alerts[alert.alert_id]); // the event may have come first
        if (action === "close") $("close-note").value = "";
      }
    } catch (err) {
      if (err.status !== 401) setText(errorLine, `Not done: ${errorMessage(err)}`);
    } finally {
      busyAction = null;
      render();
    }
  }

  // -- voice (docs/VOICE.md) -------------------------------------------------------------------
  // The operator's browser offers (WebRTC), the device answers through the centre: a pillar
  // talks both ways; a token only lets the operator listen in. One call at a time per page; a
  // dropped call is offered again (a reload too: sessionStorage remembers the call's alert).
  const VOICE_REJOINS = 5;
  const VOICE_CONNECT_MS = 20000; // answered but not connected by then: the call failed
  const VOICE_KEY = "sos-voice-alert";
  const voice = {
    pc: null, alertId: null, session: null, local: null, remote: null,
    state: "idle", // idle | connecting | connected | reconnecting | rejoining | failed
    error: "", rejoins: 0, offeredAt: null, connectedAt: null, timer: null,
  };
  sosConsole.voice = voice;

  function voiceMode(alert) {
    // As the device's status says; by its kind for a device that has not said yet.
    return alert.voice_mode || (alert.device_kind === "pillar" ? "two_way" : "listen_in");
  }

  function gatheringComplete(pc, timeoutMs) {
    // No trickle ICE: the offer goes as one signed command with every candidate in it.
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const timer = setTimeout(resolve, timeoutMs); // what was gathered by then is enough
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  }

  async function startVoice(alertId, { rejoin = false } = {}) {
    const alert = state.alerts[alertId];
    if (!alert || alert.status === "closed" || !can("act")) return;
    stopVoicePeer();
    clearTimeout(voice.timer);
    Object.assign(voice, { alertId, state: rejoin ? "rejoining" : "connecting", error: "",
                           offeredAt: epochNow(), connectedAt: null });
    if (!rejoin) voice.rejoins = 0;
    sessionStorage.setItem(VOICE_KEY, alertId);
    renderVoice();
    let pc = null;
    try {
      const config = await api("GET", "/api/voice");
      pc = new RTCPeerConnection({
        iceServers: config.ice_servers || [],
        iceTransportPolicy: config.ice_transport_policy || "all",
      });
      voice.pc = pc;
      if (voiceMode(alert) === "two_way") {
        voice.local = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
        });
        for (const track of voice.local.getAudioTracks()) pc.addTrack(track, voice.local);
      } else {
        pc.addTransceiver("audio", { direction: "recvonly" }); // listen in: nothing is sent
      }
      pc.addEventListener("track", (event) => {
        voice.remote = new MediaStream([event.track]);
        const audio = $("voice-audio");
        audio.srcObject = voice.remote;
        audio.play().catch(() => {});
      });
      pc.addEventListener("connectionstatechange", () => onVoiceConnection(pc));
      await pc.setLocalDescription(await pc.createOffer());
      await gatheringComplete(pc, 3000);
      if (voice.pc !== pc) return;
      const relayOnly = config.ice_transport_policy === "relay";
      const noRelay = relayOnly && !/ typ relay/.test(pc.localDescription.sdp);
      const path = `/api/alerts/${encodeURIComponent(alertId)}/voice`;
      const answer = await api("POST", path, { sdp: pc.localDescription.sdp });
      if (voice.pc !== pc) return;
      voice.session = answer.voice_session;
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      if (noRelay) {
        // The offer still went: the device probes TURN from its side and reports a fault.
        // Not tried again by itself: offering through the same unreachable relay cannot help.
        throw new Error("this browser reached no TURN relay (the centre's voice.ice_urls); " +
                        "the caller hears the recorded message meanwhile");
      }
      voice.timer = setTimeout(() => connectTimedOut(pc), VOICE_CONNECT_MS);
    } catch (err) {
      if (err.status === 401 || (pc && voice.pc !== pc)) return;
      stopVoicePeer();
      voice.error = `Voice not connected: ${errorMessage(err)}`;
      voice.state = "failed";
      // Unanswered (the device or the network may come back) is tried again; refused is not.
      if (err.status === 504 || err.status === 0) rejoinLater();
    }
    renderVoice();
  }

  function connectTimedOut(pc) {
    if (voice.pc !== pc || voice.state === "connected" || voice.state === "reconnecting") return;
    stopVoicePeer();
    voice.error = `Voice not connected: no connection within ${VOICE_CONNECT_MS / 1000} s`;
    voice.state = "failed";
    rejoinLater();
    renderVoice();
  }

  /** The device's word on this page's own call: a failure it reports (e.g. its TURN server
   *  unreachable) is shown with its reason, and the page stops waiting. */
  function followDeviceVoice(alert) {
    const s = alert.voice;
    if (!s || voice.alertId !== alert.alert_id || !voice.session) return;
    if (s.voice_session === voice.session && s.state === "failed" && voice.state !== "failed") {
      clearTimeout(voice.timer);
      stopVoicePeer();
      voice.error = `Voice not connected: the device says: ${s.reason || "failed"}`;
      voice.state = "failed";
      rejoinLater();
    }
  }

  function onVoiceConnection(pc) {
    if (voice.pc !== pc) return;
    const s = pc.connectionState;
    if (s === "connected") {
      clearTimeout(voice.timer);
      voice.state = "connected";
      voice.error = "";
      voice.rejoins = 0;
      if (voice.connectedAt == null) voice.connectedAt = epochNow();
    } else if (s === "disconnected") {
      voice.state = "reconnecting"; // ICE often recovers by itself (a short network drop)
    } else if (s === "failed") {
      stopVoicePeer();
      voice.state = "rejoining";
      rejoinLater();
    }
    renderVoice();
  }

  function rejoinLater() {
    const alertId = voice.alertId;
    if (!alertId || voice.rejoins >= VOICE_REJOINS) {
      voice.state = "failed";
      return;
    }
    voice.rejoins += 1;
    clearTimeout(voice.timer);
    voice.timer = setTimeout(() => {
      if (voice.alertId === alertId) startVoice(alertId, { rejoin: true });
    }, 1000 * voice.rejoins);
  }

  function stopVoicePeer() {
    if (voice.pc) voice.pc.close();
    if (voice.local) for (const track of voice.local.getTracks()) track.stop();
    Object.assign(voice, { pc: null, local: null, remote: null, session: null });
    $("voice-audio").srcObject = null;
  }

  async function hangUp() {
    const { alertId, session } = voice;
    clearTimeout(voice.timer);
    stopVoicePeer();
    Object.assign(voice, { alertId: null, state: "idle", error: "" });
    sessionStorage.removeItem(VOICE_KEY);
    renderVoice();
    if (!alertId || !session) return;
    try {
      await api("POST", `/api/alerts/${encodeURIComponent(alertId)}/voice/hangup`, { voice_session: session });
    } catch (err) {
      if (err.status !== 401) setText($("action-error"), `Hang-up not sent: ${errorMessage(err)}`);
    }
  }

  /** The call ends with its alert (the device ends it too); a reload rejoins an open one. */
  function followVoice(alert) {
    followDeviceVoice(alert);
    if (voice.alertId === alert.alert_id && alert.status === "closed") {
      clearTimeout(voice.timer);
      stopVoicePeer();
      Object.assign(voice, { alertId: null, state: "idle", error: "" });
      sessionStorage.removeItem(VOICE_KEY);
    }
  }

  function rejoinAfterReload() {
    const alertId = sessionStorage.getItem(VOICE_KEY);
    const alert = alertId ? state.alerts[alertId] : null;
    if (alert && alert.status !== "closed" && alert.claimed_by === state.me.user) {
      startVoice(alertId, { rejoin: true });
    } else if (alertId) {
      sessionStorage.removeItem(VOICE_KEY);
    }
  }

  const VOICE_TEXT = {
    connecting: "Connecting…",
    connected: "", // by mode, below
    reconnecting: "Connection lost — reconnecting…",
    rejoining: "Call dropped — calling again…",
  };

  function renderVoice() {
    const alert = state.selectedId ? state.alerts[state.selectedId] : null;
    const box = $("voice-box");
    if (!alert) return;
    const here = voice.alertId === alert.alert_id;
    const twoWay = voiceMode(alert) === "two_way";
    const open = alert.status !== "closed";
    box.hidden = !can("act") || (!open && !here);
    box.dataset.state = here ? voice.state : "idle";
    const start = $("voice-start");
    setText(start, twoWay ? "Talk to the caller" : "Listen in");
    start.hidden = here && voice.state !== "failed";
    start.disabled = !open;
    $("voice-hangup").hidden = !here || voice.state === "failed";
    let text = "";
    if (here) {
      text = voice.state === "connected"
        ? (twoWay ? "Talking with the caller" : "Listening to the device's microphone")
        : VOICE_TEXT[voice.state] || voice.error;
    } else if (alert.voice && alert.voice.state && open) {
      const s = alert.voice;
      text = `Device voice: ${s.state}${s.reason ? ` (${s.reason})` : ""}`;
    }
    setText($("voice-status"), text);
  }

  // -- the alarm -------------------------------------------------------------------------------
  function unclaimedAlerts() {
    return sortedAlerts().filter((a) => a.status === "open" && !a.claimed_by);
  }

  function alarmActive() {
    return unclaimedAlerts().length > 0;
  }

  /** An untaken alert that has already climbed past its desk: the alarm gets louder. */
  function alarmEscalated() {
    return unclaimedAlerts().some((a) => (a.escalations || []).length > 0);
  }

  let audio = null; // AudioContext, made once

  function audioContext() {
    if (!audio) {
      const Ctx = window.AudioContext || window.webkitAudioContext;
      if (!Ctx) return null;
      audio = new Ctx();
      audio.addEventListener("statechange", renderSound);
    }
    return audio;
  }

  /** Browsers keep audio suspended until a user gesture: any click or key press resumes it. */
  function enableSound() {
    const ctx = audioContext();
    if (ctx && ctx.state !== "running") ctx.resume().then(renderSound, renderSound);
  }

  function soundOn() {
    return !!audio && audio.state === "running";
  }

  /** One beep; `loud` (an escalated alert): higher, at full level, and longer. */
  function beep(loud = false) {
    const ctx = audioContext();
    if (!ctx || ctx.state !== "running") return;
    const t = ctx.currentTime;
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    const level = loud ? 0.6 : 0.25;
    osc.type = "square";
    osc.frequency.value = loud ? 1320 : 880;
    // A short ramp at each end avoids clicks.
    gain.gain.setValueAtTime(0, t);
    gain.gain.linearRampToValueAtTime(level, t + 0.01);
    gain.gain.setValueAtTime(level, t + 0.19);
    gain.gain.linearRampToValueAtTime(0, t + 0.2);
    osc.connect(gain).connect(alarmOutput(ctx));
    osc.start(t);
    osc.stop(t + 0.21);
    // Mid-beep, look at what actually flows into the speaker: a beep counts as heard only if
    // its samples arrived there (a context the browser suspended produces none).
    setTimeout(() => {
      const samples = new Float32Array(alarmTap.fftSize);
      alarmTap.getFloatTimeDomainData(samples);
      if (samples.some((v) => Math.abs(v) > 0.05)) sosConsole.beepsHeard += 1;
      if (samples.some((v) => Math.abs(v) > 0.4)) sosConsole.loudBeepsHeard += 1;
    }, 100);
  }

  let alarmTap = null; // AnalyserNode beside the speaker: what the operator hears
  let alarmMix = null;

  function alarmOutput(ctx) {
    if (!alarmMix) {
      alarmMix = ctx.createGain();
      alarmTap = ctx.createAnalyser();
      alarmTap.fftSize = 2048;
      alarmMix.connect(ctx.destination);
      alarmMix.connect(alarmTap);
    }
    return alarmMix;
  }

  function renderSound() {
    const on = soundOn();
    const header = $("sound-state");
    header.dataset.sound = on ? "on" : "off";
    setText(header, on ? "Alarm sound: on (click to test)" : "Alarm sound: off — click to enable");
    $("sound-enable").hidden = on;
  }

  function renderAlarm() {
    const waiting = unclaimedAlerts();
    const banner = $("alarm");
    banner.hidden = waiting.length === 0;
    document.body.classList.toggle("alarm-on", waiting.length > 0);
    if (waiting.length) {
      const devices = [...new Set(waiting.map((a) => a.device_id))].join(", ");
      const escalated = alarmEscalated();
      setText($("alarm-text"), escalated ? `ESCALATED SOS — nobody took it — ${devices} — take it`
        : `NEW SOS — ${devices} — take it`);
      banner.classList.toggle("escalated", escalated);
      document.title = `(${waiting.length}) NEW SOS — SOS control centre`;
    } else {
      document.title = "SOS control centre";
    }
    renderSound();
  }

  // -- the map ---------------------------------------------------------------------------------
  let map = null;
  let gridLayer = null;
  let selectedLayer = null; // track, accuracy circles
  let selectedMarker = null;
  let selectedMarkerId = null;
  let selectedSignature = "";
  let fleetLayer = null;
  let fleetSignature = "";
  let mapFitPending = false;
  let fleetFitted = false;

  function initMap() {
    if (!window.L) {
      setText($("map-note"), "The map library did not load.");
      return;
    }
    const tiles = state.me && state.me.tiles;
    map = L.map("map", {
      attributionControl: !!tiles,
      zoomControl: false,
      worldCopyJump: true,
      center: [20, 0],
      zoom: 2,
    });
    sosConsole.map = map;
    if (tiles && tiles.url) {
      // The attribution is the centre administrator's config (console.tiles_attribution), not
      // device or user text: Leaflet shows it as HTML, so that it may carry a link.
      L.tileLayer(tiles.url, { attribution: tiles.attribution || "", maxZoom: 19 }).addTo(map);
      setText($("map-note"), "");
    } else {
      // No tile server configured (closed network): a labelled grid keeps distances readable.
      map.getContainer().classList.add("no-tiles");
      gridLayer = L.layerGroup().addTo(map);
      map.on("moveend", drawGrid);
      drawGrid();
      setText($("map-note"), "No map tiles configured: grid of latitude and longitude lines.");
    }
    L.control.zoom({ position: "topright" }).addTo(map);
    L.control.scale({ imperial: false, maxWidth: 160 }).addTo(map);
    selectedLayer = L.layerGroup().addTo(map);
    fleetLayer = L.layerGroup().addTo(map);
  }

  const GRID_STEPS = [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
    0.5, 1, 2, 5, 10, 20, 30];

  function gridLabel(value, step, positive, negative) {
    const decimals = Math.max(0, Math.ceil(-Math.log10(step) - 1e-9));
    const hemisphere = value > 0 ? positive : value < 0 ? negative : "";
    return `${Math.abs(value).toFixed(decimals)}°${hemisphere}`;
  }

  function gridText(text, latlng, className) {
    return L.marker(latlng, {
      interactive: false,
      keyboard: false,
      icon: L.divIcon({ className: `grid-label ${className}`, html: el("span", {}, text), iconSize: null }),
    });
  }

  function drawGrid() {
    gridLayer.clearLayers();
    const view = map.getBounds();
    const span = Math.max(view.getEast() - view.getWest(), view.getNorth() - view.getSouth());
    const step = GRID_STEPS.find((s) => span / s <= 8) || 30;
    // Lines reach half a view past each edge so a pan does not show their ends before moveend.
    const b = view.pad(0.5);
    const south = Math.max(b.getSouth(), -85);
    const north = Math.min(b.getNorth(), 85);
    const west = b.getWest();
    const east = b.getEast();
    const line = { color: "#7d8996", weight: 1, opacity: 0.55, interactive: false };
    // Labels sit just inside the visible west and north edges, clear of the scale (bottom left)
    // and the zoom buttons (top right).
    const labelLat = view.getNorth() - (view.getNorth() - view.getSouth()) * 0.01;
    const labelLon = view.getWest() + (view.getEast() - view.getWest()) * 0.005;
    const height = view.getNorth() - view.getSouth();
    const width = view.getEast() - view.getWest();
    for (let lat = Math.ceil(south / step) * step; lat <= north; lat += step) {
      const y = +lat.toFixed(6);
      gridLayer.addLayer(L.polyline([[y, west], [y, east]], line));
      if (y > view.getSouth() + height * 0.1 && y < view.getNorth() - height * 0.06) {
        gridLayer.addLayer(gridText(gridLabel(y, step, "N", "S"), [y, labelLon], "grid-lat"));
      }
    }
    for (let lon = Math.ceil(west / step) * step; lon <= east; lon += step) {
      const x = +lon.toFixed(6);
      gridLayer.addLayer(L.polyline([[south, x], [north, x]], line));
      if (x > view.getWest() && x < view.getEast() - width * 0.12) {
        gridLayer.addLayer(gridText(gridLabel(x, step, "E", "W"), [labelLat, x], "grid-lon"));
      }
    }
  }

  function trackPoints(alert) {
    const points = (alert.track || []).filter((p) => p.lat != null && p.lon != null);
    if (!points.length && hasFix(alert.position)) {
      points.push({ lat: alert.position.lat, lon: alert.position.lon, accuracy_m: alert.position.accuracy_m });
    }
    return points;
  }

  function renderMap() {
    if (!map) return;
    renderSelectedOnMap();
    renderFleetOnMap();
  }

  function renderSelectedOnMap() {
    const alert = state.selectedId ? state.alerts[state.selectedId] : null;
    const points = alert ? trackPoints(alert) : [];
    const current = alert && hasFix(alert.position) ? alert.position : points[points.length - 1];
    const incident = alert ? (alert.incident || []).filter((o) => o.lat != null && o.lon != null) : [];
    const signature = JSON.stringify([alert && alert.alert_id, points, current, alert && alert.status, incident]);
    if (signature === selectedSignature && !mapFitPending) return;
    selectedSignature = signature;

    selectedLayer.clearLayers();
    // The other alerts of its incident (incidents.py): one event, on one map.
    for (const other of incident) {
      const mark = L.circleMarker([other.lat, other.lon], {
        radius: 9, color: "#ffb020", weight: 3, fillColor: "#ffb020", fillOpacity: 0.5,
      });
      mark.bindTooltip(el("span", {}, `same incident: SOS ${other.device_id} (${other.device_kind}, ${other.status})`),
        { direction: "top" });
      selectedLayer.addLayer(mark);
      if (other.accuracy_m) {
        selectedLayer.addLayer(L.circle([other.lat, other.lon], {
          radius: other.accuracy_m, color: "#ffb020", weight: 1, fillOpacity: 0.06, interactive: false,
        }));
      }
    }
    if (!alert || !current) {
      if (selectedMarker) selectedMarker.remove();
      selectedMarker = null;
      selectedMarkerId = null;
      if (mapFitPending && incident.length) { // no fix of its own: show its incident's
        map.fitBounds(L.latLngBounds(incident.map((o) => [o.lat, o.lon])).pad(0.3),
          { maxZoom: 17, animate: false });
      }
      mapFitPending = false;
      return;
    }
    const colour = alert.status === "closed" ? "#8b97a5" : "#ff5c5c";
    for (const p of points) {
      if (p.accuracy_m) {
        selectedLayer.addLayer(L.circle([p.lat, p.lon], {
          radius: p.accuracy_m, color: colour, weight: 1, opacity: 0.5, fillOpacity: 0.06, interactive: false,
        }));
      }
    }
    if (points.length > 1) {
      selectedLayer.addLayer(L.polyline(points.map((p) => [p.lat, p.lon]), {
        color: colour, weight: 3, opacity: 0.9,
      }));
    }
    if (current.accuracy_m && !points.some((p) => p.lat === current.lat && p.lon === current.lon)) {
      selectedLayer.addLayer(L.circle([current.lat, current.lon], {
        radius: current.accuracy_m, color: colour, weight: 2, fillOpacity: 0.1, interactive: false,
      }));
    }
    const latlng = [current.lat, current.lon];
    // One marker per selected alert, moved as it moves, so markerFor() keeps returning it.
    if (selectedMarker && selectedMarkerId === alert.alert_id) {
      selectedMarker.setLatLng(latlng);
    } else {
      if (selectedMarker) selectedMarker.remove();
      selectedMarker = L.marker(latlng, { title: alert.alert_id, alt: alert.alert_id, zIndexOffset: 1000 })
        .addTo(map);
      selectedMarkerId = alert.alert_id;
    }
    // An element, not a string (Leaflet sets a string as innerHTML): the id is the device's.
    selectedMarker.bindTooltip(el("span", {}, `SOS ${alert.device_id}`), { direction: "top", offset: [0, -36] });

    if (mapFitPending) {
      mapFitPending = false;
      const bounds = L.latLngBounds(points.map((p) => [p.lat, p.lon])).extend(latlng);
      for (const other of incident) bounds.extend([other.lat, other.lon]);
      map.fitBounds(bounds.pad(0.3), { maxZoom: 17, animate: false }); // at once: no waiting
    } else if (!map.getBounds().contains(latlng)) {
      map.panTo(latlng, { animate: false }); // keep a moving wearer in view, zoom unchanged
    }
  }

  function renderFleetOnMap() {
    const devices = Object.values(state.devices).filter((d) => hasFix(d.position));
    const signature = JSON.stringify(devices.map((d) => [d.device_id, d.position, d.state, d.active_alert_id]));
    if (signature === fleetSignature) return;
    fleetSignature = signature;
    fleetLayer.clearLayers();
    for (const d of devices) {
      const alarm = !!d.active_alert_id;
      const colour = alarm ? "#ff5c5c" : d.state === "online" ? "#4cc38a" : "#a9b4c0";
      const accuracy = d.position.accuracy_m;
      if (accuracy != null && isFinite(accuracy) && accuracy > 0) {
        fleetLayer.addLayer(L.circle([d.position.lat, d.position.lon], {
          radius: accuracy, color: colour, weight: 1, opacity: 0.5, fillOpacity: 0.06, interactive: false,
        }));
      }
      const marker = L.circleMarker([d.position.lat, d.position.lon], {
        radius: 6, color: "#0b0f14", weight: 2, fillColor: colour, fillOpacity: 1,
      });
      const acc = accuracy != null && isFinite(accuracy) ? `, ±${Math.round(accuracy)} m` : "";
      marker.bindTooltip(el("span", {}, `${d.device_id} (${d.device_kind || "device"}, ${d.state || "unknown"}${acc})`));
      marker.on("click", () => {
        if (d.active_alert_id && state.alerts[d.active_alert_id]) selectAlert(d.active_alert_id, { focusRow: false });
      });
      fleetLayer.addLayer(marker);
    }
    if (!fleetFitted && !state.selectedId && devices.length && map.getSize().x > 0) {
      fleetFitted = true;
      const bounds = L.latLngBounds(devices.map((d) => [d.position.lat, d.position.lon]));
      map.fitBounds(bounds.pad(0.3), { maxZoom: 15, animate: false });
    }
  }

  function markerFor(alertId) {
    return selectedMarker && selectedMarkerId === alertId ? selectedMarker : null;
  }

  // -- live video --------------------------------------------------------------------------------
  const video = { alertId: null, url: null, hls: null, retries: 0 };
  const HLS_CONFIG = {
    lowLatencyMode: false,
    liveSyncDurationCount: 1,
    // The CSP forbids the blob: worker hls.js makes by default; load it from our own origin.
    workerPath: "/static/vendor/hls/hls.worker.js",
  };

  function setVideoStatus(text, { retry = false } = {}) {
    setText($("live-status"), text);
    $("live-retry").hidden = !retry;
  }

  function stopVideo() {
    if (video.hls) video.hls.destroy();
    video.hls = null;
    const node = $("live-video");
    node.removeAttribute("src");
    node.load();
    video.alertId = null;
    video.url = null;
  }

  function startVideo(alertId, url) {
    stopVideo();
    video.alertId = alertId;
    video.url = url;
    const node = $("live-video");
    setVideoStatus("loading…");
    if (window.Hls && Hls.isSupported()) {
      const hls = new Hls(HLS_CONFIG);
      video.hls = hls;
      hls.on(Hls.Events.ERROR, (_event, data) => onHlsError(hls, data));
      hls.on(Hls.Events.MANIFEST_PARSED, () => node.play().catch(() => {}));
      hls.loadSource(url);
      hls.attachMedia(node);
    } else if (node.canPlayType("application/vnd.apple.mpegurl")) {
      node.src = url; // Safari plays HLS itself
      node.play().catch(() => {});
    } else {
      setVideoStatus("error: this browser cannot play the live video (no HLS support)");
    }
  }

  function onHlsError(hls, data) {
    if (hls !== video.hls || !data.fatal) return;
    if (data.type === Hls.ErrorTypes.MEDIA_ERROR && video.retries < 1) {
      video.retries += 1;
      hls.recoverMediaError();
      return;
    }
    const detail = data.response && data.response.code ? ` (HTTP ${data.response.code})` : "";
    setVideoStatus(`error: ${data.details || data.type}${detail}`, { retry: true });
  }

  function onVideoEvent(event) {
    const id = video.alertId;
    if (!id) return;
    if (event.type === "playing") {
      if (!(id in sosConsole.videoPlayingAt)) sosConsole.videoPlayingAt[id] = epochNow();
      setVideoStatus("playing");
    } else if (event.type === "waiting") {
      setVideoStatus("buffering…");
    } else if (event.type === "ended") {
      setVideoStatus("stream ended");
    } else if (event.type === "error") {
      const err = $("live-video").error;
      if (err && !video.hls) setVideoStatus(`error: ${err.message || `media error ${err.code}`}`, { retry: true });
    }
  }

  function renderVideo() {
    const alert = state.selectedId ? state.alerts[state.selectedId] : null;
    const url = alert && alert.live && alert.live.url;
    $("live-section").hidden = !url;
    if (!url) {
      if (video.alertId) stopVideo();
      return;
    }
    // After the alert is closed the same URL plays the recording (the playlist has ended).
    setText($("live-label"), alert.status === "closed" ? "Replay" : "Live video");
    if (video.alertId !== alert.alert_id || video.url !== url) {
      video.retries = 0;
      startVideo(alert.alert_id, url);
    }
  }

  // -- fleet -------------------------------------------------------------------------------------
  const fleetRows = new Map();
  const FLEET_CELLS = ["device", "state", "kind", "battery", "storage", "selftest", "faults", "cert",
    "outbox", "uploads", "firmware"];

  function orDash(value) {
    return value == null || value === "" ? DASH : String(value);
  }

  function stateText(d) {
    const seen = epochToMs(d.last_seen);
    const age = seen == null ? "" : `, seen ${formatDuration((nowMs() - seen) / 1000)} ago`;
    return `${(d.state || "unknown").toUpperCase()}${age ? `\n${age.slice(2)}` : ""}`;
  }

  function storageText(d) {
    const s = d.storage;
    if (!s) return DASH;
    const free = s.free_mb != null ? `, ${Math.round(s.free_mb)} MiB free` : "";
    const reason = s.reason ? `\n${s.reason}` : "";
    return `${(s.mode || DASH).replace(/_/g, " ")}${free}${reason}`;
  }

  function selftestText(d) {
    const t = d.selftest;
    if (!t) return { text: DASH, bad: false };
    const at = isoMs(t.at) ?? epochToMs(typeof t.at === "number" ? t.at : null);
    const when = at == null ? "" : `\n${formatTime(at)}`;
    const failed = Array.isArray(t.failed) ? t.failed : [];
    const ok = t.ok != null ? !!t.ok : failed.length === 0;
    const failures = failed.length ? `: ${failed.join(", ")}` : "";
    return { text: `${ok ? "PASS" : "FAIL"}${failures}${when}`, bad: !ok };
  }

  function faultsText(d) {
    const door = doorText(d);
    if (d.faults == null) return door || DASH;
    const entries = Object.entries(d.faults);
    if (!entries.length) return door || "none";
    return [door, ...entries.map(([part, why]) => `${part}: ${why}`)].filter(Boolean).join("\n");
  }

  // A kiosk's door (its tamper switch): not a fault of the device, but someone opened it.
  function doorText(d) {
    const t = d.tamper;
    if (!t || t.state !== "open") return "";
    const since = epochToMs(t.since);
    if (since == null) return "door open";
    const at = new Date(since);
    const day = at.toDateString() === new Date().toDateString() ? ""
      : `${at.getFullYear()}-${pad2(at.getMonth() + 1)}-${pad2(at.getDate())} `;
    return `door open since ${day}${pad2(at.getHours())}:${pad2(at.getMinutes())}`;
  }

  function certText(d) {
    const t = isoMs(d.cert_not_after);
    if (t == null) return { text: orDash(d.cert_not_after), warn: false };
    const days = (t - nowMs()) / 86400000;
    const date = new Date(t).toISOString().slice(0, 10);
    if (days < 0) return { text: `EXPIRED ${date}`, warn: true };
    if (days < 30) return { text: `${date} — expires in ${Math.floor(days)} d`, warn: true };
    return { text: date, warn: false };
  }

  function renderFleet() {
    const devices = Object.values(state.devices).sort((a, b) => a.device_id.localeCompare(b.device_id));
    const tbody = $("fleet-rows");
    const wanted = new Set(devices.map((d) => d.device_id));
    for (const [id, tr] of fleetRows) {
      if (!wanted.has(id)) {
        tr.remove();
        fleetRows.delete(id);
      }
    }
    const rows = devices.map((d) => {
      let tr = fleetRows.get(d.device_id);
      if (!tr) {
        tr = el("tr", { "data-device-id": d.device_id });
        for (const name of FLEET_CELLS) tr.appendChild(el("td", { className: `cell-${name}` }));
        fleetRows.set(d.device_id, tr);
      }
      fillFleetRow(tr, d);
      return tr;
    });
    placeRows(tbody, rows);
    $("fleet-empty").hidden = devices.length > 0;
    const online = devices.filter((d) => d.state === "online").length;
    setText($("fleet-count"), devices.length ? `(${online}/${devices.length} online)` : "");
  }

  function fillFleetRow(tr, d) {
    tr.dataset.state = d.state || "unknown";
    const c = tr.children;
    const selftest = selftestText(d);
    const cert = certText(d);
    setText(c[0], d.active_alert_id ? `${d.device_id} — SOS ACTIVE` : d.device_id);
    setText(c[1], stateText(d));
    setText(c[2], orDash(d.device_kind));
    // A pillar without battery runs on mains; a token always has one, so null is "not reported".
    setText(c[3], d.battery == null && d.device_kind !== "pillar" ? DASH : formatBattery(d.battery));
    setText(c[4], storageText(d));
    setText(c[5], selftest.text);
    setText(c[6], faultsText(d));
    setText(c[7], cert.text);
    setText(c[8], orDash(d.outbox_pending));
    setText(c[9], orDash(d.uploads_waiting));
    setText(c[10], orDash(d.firmware));
    c[0].classList.toggle("bad", !!d.active_alert_id);
    c[1].className = `cell-state state-${d.state || "unknown"}`;
    c[4].classList.toggle("warn", !!(d.storage && d.storage.mode && d.storage.mode !== "normal"));
    c[5].classList.toggle("bad", selftest.bad);
    c[6].classList.toggle("bad", !!d.faults && Object.keys(d.faults).length > 0);
    c[6].classList.toggle("warn", !c[6].classList.contains("bad") && doorText(d) !== "");
    c[7].classList.toggle("bad", cert.warn);
  }

  // -- dispatch ------------------------------------------------------------------------------------
  function renderDispatchDevices() {
    const select = $("dispatch-device");
    const tokens = Object.values(state.devices)
      .filter((d) => d.device_kind === "token")
      .sort((a, b) => a.device_id.localeCompare(b.device_id));
    const chosen = select.value;
    const options = tokens.map((d) => {
      const o = el("option", { value: d.device_id }, `${d.device_id} (${d.state || "unknown"})`);
      return o;
    });
    const same = options.length === select.options.length &&
      options.every((o, i) => o.value === select.options[i].value && o.textContent === select.options[i].textContent);
    if (!same) {
      select.replaceChildren(...options);
      if (tokens.some((d) => d.device_id === chosen)) select.value = chosen;
    }
    const mayAct = can("act");
    for (const b of document.querySelectorAll("#dispatch-form button")) b.disabled = !mayAct || !tokens.length || dispatchBusy;
    const note = $("dispatch-rights");
    note.hidden = mayAct;
    if (!mayAct && state.me) setText(note, `Your role (${state.me.role}) may not dispatch.`);
  }

  let dispatchBusy = false;

  async function dispatch(kind) {
    const deviceId = $("dispatch-device").value;
    const callId = $("dispatch-call-id").value.trim();
    setText($("dispatch-error"), "");
    if (!deviceId) {
      setText($("dispatch-error"), "Choose a token.");
      return;
    }
    if (kind === "call_start" && !callId) {
      setText($("dispatch-error"), "Enter the call id to start a call.");
      $("dispatch-call-id").focus();
      return;
    }
    const body = { device_id: deviceId, kind };
    if (callId) body.call_id = callId;
    dispatchBusy = true;
    renderDispatchDevices();
    const label = kind === "call_start" ? "Start call" : "End call";
    try {
      const answer = await api("POST", "/api/dispatch", body);
      const command = (answer && answer.command) || {};
      const delivered = command.delivered ? "delivered" : "device offline: sent when it reconnects";
      const line = `${label} ${deviceId}${callId ? ` call ${callId}` : ""}: command ${command.command_id || DASH}, ${delivered}`;
      setText($("dispatch-result"), line);
      addHistory(line);
    } catch (err) {
      if (err.status !== 401) {
        const line = `${label} ${deviceId}: refused: ${errorMessage(err)}`;
        setText($("dispatch-error"), line);
        addHistory(line);
      }
    } finally {
      dispatchBusy = false;
      renderDispatchDevices();
    }
  }

  function addHistory(line) {
    $("dispatch-history").prepend(el("li", {}, `${formatTime(nowMs())}  ${line}`));
  }

  // -- evidence ------------------------------------------------------------------------------------
  let evidenceLoading = false;

  async function loadEvidence() {
    const list = $("evidence-list");
    setText($("evidence-error"), "");
    if (!can("evidence")) {
      list.replaceChildren();
      setText($("evidence-status"), `Your role (${state.me ? state.me.role : "?"}) may not view evidence.`);
      $("evidence-refresh").disabled = true;
      return;
    }
    if (state.me.evidence === false) {
      list.replaceChildren();
      setText($("evidence-status"), "No evidence directory is configured on this centre (console.evidence_dir).");
      $("evidence-refresh").disabled = true;
      return;
    }
    if (evidenceLoading) return;
    evidenceLoading = true;
    $("evidence-refresh").disabled = true;
    setText($("evidence-status"), "Loading and verifying…");
    try {
      const answer = await api("GET", "/api/evidence");
      const devices = (answer && answer.devices) || [];
      list.replaceChildren(...devices.map(evidenceDevice));
      const note = $("evidence-rights");
      note.hidden = can("export");
      setText(note, `Your role (${state.me.role}) may view evidence but not export it.`);
      setText($("evidence-status"), devices.length
        ? `${devices.length} device(s), checked at ${formatTime(nowMs())}.` : "No evidence stored.");
    } catch (err) {
      if (err.status !== 401) {
        setText($("evidence-status"), "");
        setText($("evidence-error"), `Could not load the evidence: ${errorMessage(err)}`);
      }
    } finally {
      evidenceLoading = false;
      $("evidence-refresh").disabled = false;
    }
  }

  const findingText = (f) => (typeof f === "string" ? f : f && (f.text || f.message) ? `${f.kind ? `${f.kind}: ` : ""}${f.text || f.message}` : JSON.stringify(f));

  function evidenceDevice(d) {
    const errors = Array.isArray(d.errors) ? d.errors : [];
    const notes = Array.isArray(d.notes) ? d.notes : [];
    const errorCount = typeof d.errors === "number" ? d.errors : errors.length;
    const ok = d.ok != null ? !!d.ok : errorCount === 0;
    const verdict = d.verdict || (ok ? "VERIFIED" : "NOT VERIFIED");

    const box = el("section", { className: "evidence-device", "data-device-id": d.device_id });
    const head = el("h3");
    head.append(el("span", {}, `${d.device_id} `),
      el("span", { className: `badge ${ok ? "badge-ok" : "badge-bad"}`, "data-verdict": verdict }, verdict));
    box.append(head);
    box.append(el("p", { className: "help" },
      `${errorCount} error(s), ${typeof d.notes === "number" ? d.notes : notes.length} note(s)`));
    if (errors.length) {
      const ul = el("ul", { className: "findings errors" });
      for (const f of errors) ul.append(el("li", {}, findingText(f)));
      box.append(ul);
    }
    if (notes.length) {
      const ul = el("ul", { className: "findings notes" });
      for (const f of notes) ul.append(el("li", {}, findingText(f)));
      box.append(ul);
    }
    const calls = Array.isArray(d.calls) ? d.calls : [];
    if (!calls.length) {
      box.append(el("p", { className: "empty-note" }, "No calls."));
      return box;
    }
    const table = el("table", { className: "grid-table evidence-calls" });
    const thead = el("thead");
    const hr = el("tr");
    for (const h of ["Call", "Segments", "Recorded", "Verification", "Export"]) hr.append(el("th", { scope: "col" }, h));
    thead.append(hr);
    const tbody = el("tbody");
    for (const call of calls) tbody.append(evidenceCall(d.device_id, call, { ok, verdict }));
    table.append(thead, tbody);
    box.append(table);
    return box;
  }

  /** One call: its own verification (the device's errors that concern its segments, and
   *  those about no file: `calls[].ok/errors`) and its export. The centre exports only
   *  evidence that verifies, as a whole device directory: a call that does not verify, or
   *  one whose device's evidence does not, is said to be refused before anyone tries. */
  function evidenceCall(deviceId, call, device) {
    const segments = typeof call.segments === "number" ? call.segments
      : Array.isArray(call.segments) ? call.segments.length : call.segment_count;
    const start = isoMs(call.first_at || call.start_utc);
    const end = isoMs(call.last_at || call.end_utc);
    const span = start == null ? DASH : `${formatTime(start)}${end == null ? "" : ` to ${formatTime(end)}`}`;
    const ok = call.ok != null ? !!call.ok : device.ok; // a server without per-call results
    const errors = Array.isArray(call.errors) ? call.errors : [];
    // A call that verifies in a device that verifies has the device's verdict (INCOMPLETE too).
    const verdict = ok ? (device.ok ? device.verdict : "VERIFIED") : "NOT VERIFIED";
    const tr = el("tr", { "data-call-id": call.call_id, "data-verified": String(ok) });
    tr.append(el("td", {}, call.call_id), el("td", {}, orDash(segments)), el("td", {}, span));

    const check = el("td", { className: "cell-verification" });
    check.append(el("span", { className: `badge ${ok ? "badge-ok" : "badge-bad"}`, "data-verdict": verdict }, verdict));
    if (errors.length) {
      const ul = el("ul", { className: "findings errors" });
      for (const f of errors) ul.append(el("li", {}, findingText(f)));
      check.append(ul);
    } else if (!ok) {
      check.append(el("p", { className: "error-text" }, "The device's evidence does not verify (see above)."));
    }
    tr.append(check);

    const cell = el("td", { className: "cell-export" });
    const button = el("button", { type: "button", className: "btn btn-small", "data-action": "export" }, "Export");
    const mayExport = can("export");
    const refused = !ok ? "This call's evidence does not verify: it is not exported."
      : !device.ok ? "Not exported while the rest of this device's evidence does not verify (see above)."
        : null;
    button.disabled = !mayExport || refused !== null;
    if (!mayExport) button.title = "Your role may not export evidence";
    else if (refused) button.title = refused;
    const result = el("div", { className: "export-result", role: "status" });
    if (refused) result.append(el("p", { className: "error-text" }, refused));
    button.addEventListener("click", () => exportCall(deviceId, call.call_id, button, result));
    cell.append(button, result);
    tr.append(cell);
    return tr;
  }

  async function exportCall(deviceId, callId, button, result) {
    button.disabled = true;
    result.replaceChildren(el("span", {}, "Exporting (decrypting and verifying)…"));
    try {
      const path = `/api/evidence/${encodeURIComponent(deviceId)}/calls/${encodeURIComponent(callId)}/export`;
      const answer = await api("POST", path);
      result.replaceChildren(...exportSummary((answer && answer.export) || {}));
    } catch (err) {
      if (err.status !== 401) result.replaceChildren(el("span", { className: "error-text" }, `Export failed: ${errorMessage(err)}`));
    } finally {
      button.disabled = !can("export");
    }
  }

  function exportSummary(exp) {
    const parts = [];
    const verified = exp.verified != null ? !!exp.verified : null;
    const verdict = exp.verdict ? ` (${exp.verdict})` : "";
    parts.push(el("p", { className: verified === false ? "error-text" : "" },
      verified == null ? `Exported${verdict}.` : verified ? `Exported; verified${verdict}.`
        : `Exported, but the evidence did NOT verify${verdict}; the record says so.`));
    if (exp.sha256) parts.push(el("p", { className: "hash" }, `sha256 ${exp.sha256}`));
    const ul = el("ul", { className: "export-files" });
    for (const f of exp.files || []) {
      const li = el("li");
      const name = f.name || (f.url || "").split("/").pop();
      const a = el("a", { href: f.url, download: name }, name);
      li.append(a);
      const extra = [];
      if (f.bytes != null || f.size != null) extra.push(`${f.bytes ?? f.size} bytes`);
      if (f.sha256) extra.push(`sha256 ${f.sha256}`);
      if (extra.length) li.append(el("span", { className: "hash" }, ` — ${extra.join(", ")}`));
      ul.append(li);
    }
    parts.push(ul);
    return parts;
  }

  // -- tabs ------------------------------------------------------------------------------------------
  const TABS = ["alerts", "fleet", "dispatch", "evidence"];

  function showTab(name, { focus = false } = {}) {
    if (!TABS.includes(name)) name = "alerts";
    for (const t of TABS) {
      const tab = $(`tab-${t}`);
      const on = t === name;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      $(`panel-${t}`).hidden = !on;
      if (on && focus) tab.focus();
    }
    if (history.replaceState) history.replaceState(null, "", `#${name}`);
    if (name === "alerts" && map) {
      // Leaflet measured the box while it was hidden: measure again and redraw.
      map.invalidateSize();
      selectedSignature = "";
      fleetSignature = "";
      if (state.selectedId) mapFitPending = true;
      renderMap();
    }
    if (name === "evidence") loadEvidence();
  }

  function onTabKey(event) {
    const i = TABS.indexOf(event.currentTarget.dataset.tab);
    let next = null;
    if (event.key === "ArrowRight") next = TABS[(i + 1) % TABS.length];
    else if (event.key === "ArrowLeft") next = TABS[(i + TABS.length - 1) % TABS.length];
    else if (event.key === "Home") next = TABS[0];
    else if (event.key === "End") next = TABS[TABS.length - 1];
    if (next) {
      event.preventDefault();
      showTab(next, { focus: true });
    }
  }

  // -- the 1 s tick: ages, clock, beeps (no data is fetched here) ---------------------------------
  function tick() {
    const now = new Date();
    setText($("clock"), formatTimeBoth(now.getTime()));
    for (const [id, tr] of rowsById) {
      const alert = state.alerts[id];
      if (!alert) continue;
      setText(tr.children[0], formatDuration((nowMs() - (isoMs(alert.created_at) ?? nowMs())) / 1000));
      setText(tr.children[4], positionAgeText(alert));
    }
    const selected = state.selectedId && state.alerts[state.selectedId];
    if (selected) renderFacts(selected);
    for (const [id, tr] of fleetRows) {
      const d = state.devices[id];
      if (d) setText(tr.children[1], stateText(d));
    }
    if (alarmActive()) beep(alarmEscalated());
    sosConsole.ticks += 1;
  }

  // -- start ---------------------------------------------------------------------------------------
  async function logOut() {
    try {
      await api("POST", "/api/logout");
    } catch (_) {
      // the session is gone either way
    }
    window.location.assign("/login");
  }

  function wireUp() {
    for (const t of TABS) {
      const tab = $(`tab-${t}`);
      tab.addEventListener("click", () => showTab(t));
      tab.addEventListener("keydown", onTabKey);
    }
    $("logout").addEventListener("click", logOut);
    for (const action of ["claim", "ack", "takeover"]) {
      document.querySelector(`#details [data-action="${action}"]`)
        .addEventListener("click", () => runAction(action));
    }
    $("close-form").addEventListener("submit", (event) => {
      event.preventDefault();
      runAction("close");
    });
    $("dispatch-form").addEventListener("submit", (event) => {
      event.preventDefault();
      dispatch("call_start");
    });
    document.querySelector('#dispatch-form [data-action="call_end"]')
      .addEventListener("click", () => dispatch("call_end"));
    $("evidence-refresh").addEventListener("click", loadEvidence);
    $("alarm-show").addEventListener("click", () => {
      const first = unclaimedAlerts()[0];
      showTab("alerts");
      if (first) selectAlert(first.alert_id, { focusRow: true });
    });
    $("voice-start").addEventListener("click", () => {
      if (state.selectedId) startVoice(state.selectedId);
    });
    $("voice-hangup").addEventListener("click", hangUp);
    $("sound-enable").addEventListener("click", enableSound);
    $("sound-state").addEventListener("click", () => (soundOn() ? beep() : enableSound()));
    // Any gesture counts for the browser's autoplay rule: resume the alarm's audio on the first.
    document.addEventListener("pointerdown", enableSound, { capture: true });
    document.addEventListener("keydown", enableSound, { capture: true });

    const node = $("live-video");
    for (const type of ["playing", "waiting", "ended", "error"]) node.addEventListener(type, onVideoEvent);
    $("live-retry").addEventListener("click", () => {
      const alert = state.alerts[state.selectedId];
      if (alert && alert.live) {
        video.retries = 0;
        startVideo(alert.alert_id, alert.live.url);
      }
    });
  }

  async function start() {
    try {
      state.me = await api("GET", "/api/me");
    } catch (err) {
      if (err.status !== 401) setConnectionNote(`Cannot start: ${errorMessage(err)}`);
      return;
    }
    setText($("user-name"), state.me.user);
    setText($("user-role"), state.me.role);
    wireUp();
    audioContext();
    initMap();
    showTab(location.hash.slice(1) || "alerts");
    render();
    connectEvents();
    // Shows the state at once; the stream's "open" loads it again, then applies events.
    resync().then(() => {
      sosConsole.ready = true;
      rejoinAfterReload();
    });
    tick();
    setInterval(tick, 1000);
  }

  start();
})();
