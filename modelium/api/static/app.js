// Modelium's dashboard: plain JavaScript, no build step, nothing loaded from elsewhere.
//
// * The models table and the device bars come from GET /models and GET /status, every 2 s and
//   soon after any lifecycle event.
// * The live event list and the timeline of loads and evictions come from the WebSocket
//   /ws/events (one JSON event per message: {"seq", "type", "ts", ...fields}, plus
//   {"type": "heartbeat"} messages). After a close the page reconnects with since=<last seq seen>,
//   so no event is lost or shown twice. Without that WebSocket the page polls GET /events, and
//   says "live stream unavailable" when neither exists.
// * With API keys on, the key typed into the header (kept in localStorage) goes as
//   "Authorization: Bearer" on fetches and as ?api_key= on the WebSocket.
"use strict";

(() => {
  const KEY_STORE = "modelium.apiKey";
  const REFRESH_MS = 2000;
  const POLL_MS = 2000;
  const BACKLOG = 500; // events of history the stream starts with
  const MAX_EVENTS = 300; // rows kept in the live list
  const LIFECYCLE = new Set([
    "ModelDiscovered", "ModelChanged", "ModelRemoved", "ModelInvalid", "Load", "Evict", "Reject",
    "LoadStarted", "LoadCompleted", "LoadFailed", "Unloaded", "WorkerCrashed", "Reserved", "Released",
    "DeviceRegistered",
  ]);
  const TIMELINE = new Set(["LoadStarted", "LoadCompleted", "LoadFailed", "Evict", "Unloaded", "WorkerCrashed"]);
  const NOISE = new Set(["Tick", "DeviceSampled", "heartbeat"]);

  const $ = (id) => document.getElementById(id);
  let apiKey = localStorage.getItem(KEY_STORE) || "";
  let lastSeq = null; // seq of the last event shown
  let ws = null;
  let wsRetry = 0;
  let wsTimer = null;
  let pollTimer = null;
  let polling = false;
  let refreshTimer = null;
  let refreshing = false;
  let refreshAgain = false;
  const lanes = new Map(); // model -> {segments: [{kind, start, end, device}], marks: [{kind, ts}]}

  // ------------------------------------------------------------------ formatting

  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = Number(n);
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? String(v) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
  }

  function fmtAgo(ts) {
    if (!ts) return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return new Date(ts * 1000).toLocaleString();
  }

  function fmtTime(ts) {
    return ts ? new Date(ts * 1000).toLocaleTimeString() : "";
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k === "title") node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c);
    return node;
  }

  function notice(text) {
    const n = $("notice");
    n.textContent = text || "";
    n.hidden = !text;
  }

  function setStream(text, kind) {
    const s = $("stream-status");
    s.textContent = text;
    s.className = "badge " + (kind || "");
  }

  // ------------------------------------------------------------------ the JSON routes

  async function fetchJSON(path) {
    const headers = apiKey ? { Authorization: "Bearer " + apiKey } : {};
    const r = await fetch(path, { headers, cache: "no-store" });
    if (r.status === 401 || r.status === 403) {
      const err = new Error(r.status === 401
        ? "The server needs an API key: enter one at the top right."
        : "This API key may not read " + path + ".");
      err.status = r.status;
      throw err;
    }
    if (!r.ok) {
      const err = new Error(path + " answered " + r.status);
      err.status = r.status;
      throw err;
    }
    return r.json();
  }

  async function refresh() {
    if (refreshing) { refreshAgain = true; return; }
    refreshing = true;
    try {
      const [models, status] = await Promise.all([fetchJSON("/models"), fetchJSON("/status")]);
      renderModels(models.models || [], status.models || []);
      renderDevices(status.devices || {});
      renderServer(status.server || {});
      notice("");
    } catch (e) {
      notice(e.status ? e.message : "The server does not answer (" + e.message + ").");
      if (!e.status) $("server").textContent = "unreachable";
    } finally {
      refreshing = false;
      renderTimeline();
      if (refreshAgain) { refreshAgain = false; refresh(); }
    }
  }

  function refreshSoon() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 150);
  }

  function renderServer(server) {
    const parts = [];
    if (server.version) parts.push("v" + server.version);
    if (server.state) parts.push(server.state);
    if (server.policy) parts.push("policy " + server.policy);
    if (server.seq !== undefined) parts.push("log seq " + server.seq);
    $("server").textContent = parts.join(" · ");
  }

  function renderModels(models, counts) {
    const byName = new Map(counts.map((c) => [c.name, c]));
    const body = $("models").tBodies[0];
    const rows = models.filter((m) => m.state !== "removed").map((m) => {
      const c = byName.get(m.name) || {};
      const queued = c.queued !== undefined ? c.queued : m.pending;
      const memory = m.bytes
        ? el("span", { text: fmtBytes(m.bytes), title: m.measured_bytes ? "measured " + fmtBytes(m.measured_bytes) : "reserved" })
        : el("span", { class: "muted", text: m.estimate_bytes ? "~" + fmtBytes(m.estimate_bytes) : "–", title: "estimate" });
      const used = m.last_used
        ? el("span", { text: fmtAgo(m.last_used), title: new Date(m.last_used * 1000).toISOString() })
        : el("span", { class: "muted", text: "never" });
      return el("tr", { "data-model": m.name, "data-state": m.state },
        el("td", { class: "name", text: m.name, title: m.path || "" }),
        el("td", {}, el("span", { class: "state " + m.state, text: m.state, title: m.reason || "" })),
        el("td", { text: m.device || "–" }),
        el("td", { class: "num" }, memory),
        el("td", { class: "num queued", text: String(queued ?? 0) }),
        el("td", { class: "num inflight", text: String(c.inflight ?? 0) }),
        el("td", {}, used));
    });
    body.replaceChildren(...rows);
    $("models-empty").hidden = rows.length > 0;
    $("models-updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  function renderDevices(devices) {
    const out = Object.entries(devices).map(([name, d]) => {
      const reserved = d.reserved_bytes || 0;
      const used = d.used_bytes; // measured; null when the device cannot say
      const budget = d.budget_bytes || 0;
      const scale = Math.max(d.total_bytes || 0, budget, reserved, used || 0, 1);
      const pct = (n) => Math.min(100, (100 * n) / scale).toFixed(2) + "%";
      const bar = el("div", { class: "bar", title: "scale: " + fmtBytes(scale) },
        el("div", { class: "fill reserved", style: "width:" + pct(reserved) }));
      if (used !== null && used !== undefined) bar.append(el("div", { class: "fill used", style: "width:" + pct(used) }));
      if (budget) bar.append(el("div", { class: "budget", style: "left:" + pct(budget) }));
      const facts = [
        "reserved " + fmtBytes(reserved) + " of budget " + fmtBytes(budget),
        used !== null && used !== undefined ? "measured " + fmtBytes(used) + " in use" : "no measurement",
      ];
      if (d.total_bytes) facts.push("total " + fmtBytes(d.total_bytes));
      return el("div", { class: "device", "data-device": name },
        el("div", { class: "device-head" },
          el("strong", { text: name }),
          el("span", { class: "muted", text: " " + [d.label, d.kind, d.fake ? "simulated" : ""].filter(Boolean).join(", ") })),
        bar,
        el("div", { class: "facts", text: facts.join(" · ") }));
    });
    $("devices").replaceChildren(...out);
  }

  // ------------------------------------------------------------------ events

  function describe(ev) {
    const bits = [];
    if (ev.device) bits.push("on " + ev.device);
    if (ev.load_s !== undefined) bits.push("in " + Number(ev.load_s).toFixed(2) + " s");
    if (ev.bytes) bits.push(fmtBytes(ev.bytes));
    if (ev.memory_bytes) bits.push("measured " + fmtBytes(ev.memory_bytes));
    if (ev.kind && ev.type === "RequestArrived") bits.push(ev.kind);
    if (ev.reason) bits.push("(" + ev.reason + ")");
    if (ev.error) bits.push(ev.error);
    return bits.join(" ");
  }

  function handle(ev) {
    if (!ev || typeof ev !== "object" || !ev.type) return;
    if (ev.type === "error") { // the server refused the query; it closes the stream next
      notice("Event stream: " + ((ev.error && ev.error.message) || "refused"));
      return;
    }
    if (ev.type === "heartbeat") {
      $("stream-status").title = "last heartbeat " + new Date().toLocaleTimeString();
      if ($("show-noise").checked) {
        $("events").prepend(el("li", { "data-type": "heartbeat", class: "noise" },
          el("span", { class: "time", text: new Date().toLocaleTimeString() }),
          el("span", { class: "type", text: "heartbeat" }),
          el("span", { class: "detail", text: "log at #" + (ev.last_seq ?? "?") })));
      }
      return;
    }
    if (typeof ev.seq === "number") {
      if (lastSeq !== null && ev.seq <= lastSeq) return; // already shown
      lastSeq = ev.seq;
    }
    const noise = NOISE.has(ev.type);
    if (!noise || $("show-noise").checked) {
      const list = $("events");
      list.prepend(el("li", { "data-type": ev.type, "data-model": ev.model, "data-seq": ev.seq, class: noise ? "noise" : "" },
        el("span", { class: "seq", text: ev.seq !== undefined ? "#" + ev.seq : "" }),
        el("span", { class: "time", text: fmtTime(ev.ts) }),
        el("span", { class: "type " + ev.type, text: ev.type }),
        el("span", { class: "model", text: ev.model || "" }),
        el("span", { class: "detail", text: describe(ev), title: describe(ev) })));
      while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
    }
    if (TIMELINE.has(ev.type)) addTimeline(ev);
    if (LIFECYCLE.has(ev.type)) refreshSoon();
  }

  function connect() {
    clearTimeout(wsTimer);
    if (ws) { ws.onclose = null; ws.close(); }
    const q = new URLSearchParams(lastSeq === null ? {} : { since: String(lastSeq) }); // none: new events only
    if (apiKey) q.set("api_key", apiKey);
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/events?" + q;
    let opened = false;
    const sock = new WebSocket(url);
    ws = sock;
    sock.onopen = () => {
      opened = true;
      wsRetry = 0;
      stopPolling();
      setStream("live", "ok");
    };
    sock.onmessage = (m) => {
      let ev;
      try { ev = JSON.parse(m.data); } catch (_) { return; }
      handle(ev);
    };
    sock.onclose = (e) => {
      if (ws !== sock) return;
      ws = null;
      if (e.code === 4400) lastSeq = null; // query refused (e.g. since beyond a new log): start afresh
      if (opened) {
        // a close with a resume hint (or a dropped connection): pick up after the last seq seen
        setStream("reconnecting", "warn");
        wsTimer = setTimeout(connect, Math.min(10000, 250 * 2 ** wsRetry++));
      } else {
        if (e.code === 1008 || e.code === 4401 || e.code === 4403) notice("The event stream needs an API key: enter one at the top right.");
        startPolling();
        wsTimer = setTimeout(connect, Math.min(30000, 2000 * 2 ** wsRetry++));
      }
    };
  }

  // without the WebSocket: GET /events, or nothing
  function startPolling() {
    if (polling) return;
    polling = true;
    const poll = async () => {
      if (!polling) return;
      try {
        const body = await fetchJSON("/events?since=" + (lastSeq ?? 0) + "&limit=200");
        if (!polling) return; // the WebSocket came back meanwhile
        for (const ev of body.events || []) handle(ev);
        setStream("live stream unavailable · polling", "warn");
        pollTimer = setTimeout(poll, (body.events || []).length >= 200 ? 0 : POLL_MS);
      } catch (_) {
        if (!polling) return;
        setStream("live stream unavailable", "bad");
        pollTimer = setTimeout(poll, 10 * POLL_MS);
      }
    };
    pollTimer = setTimeout(poll, 0);
  }

  function stopPolling() {
    polling = false;
    clearTimeout(pollTimer);
    pollTimer = null;
  }

  // ------------------------------------------------------------------ the timeline

  function lane(model) {
    if (!lanes.has(model)) lanes.set(model, { segments: [], marks: [] });
    return lanes.get(model);
  }

  function closeOpen(l, kind, ts) {
    for (const s of l.segments) if (s.end === null && (!kind || s.kind === kind)) s.end = ts;
  }

  function addTimeline(ev) {
    if (!ev.model) return;
    const l = lane(ev.model);
    const ts = ev.ts || Date.now() / 1000;
    let text;
    switch (ev.type) {
      case "LoadStarted":
        closeOpen(l, null, ts);
        l.segments.push({ kind: "loading", start: ts, end: null, device: ev.device });
        text = "loading on " + ev.device;
        break;
      case "LoadCompleted":
        closeOpen(l, "loading", ts);
        l.segments.push({ kind: "resident", start: ts, end: null, device: ev.device });
        text = "loaded on " + ev.device + (ev.load_s !== undefined ? " in " + Number(ev.load_s).toFixed(2) + " s" : "");
        break;
      case "LoadFailed":
        closeOpen(l, null, ts);
        l.marks.push({ kind: "failed", ts });
        text = "load failed" + (ev.reason ? ": " + ev.reason : "");
        break;
      case "Evict":
        l.marks.push({ kind: "evict", ts });
        text = "evicted" + (ev.reason ? " (" + ev.reason + ")" : "");
        break;
      case "Unloaded":
        closeOpen(l, null, ts);
        text = "unloaded" + (ev.reason ? " (" + ev.reason + ")" : "");
        break;
      case "WorkerCrashed":
        closeOpen(l, null, ts);
        l.marks.push({ kind: "failed", ts });
        text = "worker crashed" + (ev.reason ? ": " + ev.reason : "");
        break;
      default:
        return;
    }
    const list = $("timeline-list");
    list.prepend(el("li", { "data-type": ev.type, "data-model": ev.model },
      el("span", { class: "time", text: fmtTime(ts) }),
      el("span", { class: "model", text: ev.model }),
      el("span", { class: "type " + ev.type, text: text, title: text })));
    while (list.children.length > 100) list.lastElementChild.remove();
    renderTimeline();
  }

  function renderTimeline() {
    const now = Date.now() / 1000;
    let start = now;
    for (const l of lanes.values()) {
      for (const s of l.segments) start = Math.min(start, s.start);
      for (const m of l.marks) start = Math.min(start, m.ts);
    }
    const span = Math.max(60, now - start);
    start = now - span;
    const pos = (ts) => Math.max(0, Math.min(100, (100 * (ts - start)) / span));
    const rows = [...lanes.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([model, l]) => {
      const track = el("div", { class: "track" });
      for (const s of l.segments) {
        const left = pos(s.start);
        const width = Math.max(0.4, pos(s.end ?? now) - left);
        track.append(el("div", {
          class: "seg " + s.kind, style: "left:" + left + "%;width:" + width + "%",
          title: s.kind + (s.device ? " on " + s.device : "") + " from " + fmtTime(s.start) + (s.end ? " to " + fmtTime(s.end) : ""),
        }));
      }
      for (const m of l.marks) {
        track.append(el("div", { class: "mark " + m.kind, style: "left:" + pos(m.ts) + "%", title: m.kind + " at " + fmtTime(m.ts) }));
      }
      return el("div", { class: "lane", "data-model": model }, el("span", { class: "lane-name", text: model }), track);
    });
    if (!rows.length) rows.push(el("p", { class: "muted", text: "No loads or evictions seen yet." }));
    else {
      rows.push(el("div", { class: "axis" }, el("span", { text: fmtTime(start) }), el("span", { text: "now" })));
    }
    $("timeline").replaceChildren(...rows);
  }

  // ------------------------------------------------------------------ start

  async function start() {
    stopPolling();
    lastSeq = null;
    lanes.clear();
    $("events").replaceChildren();
    $("timeline-list").replaceChildren();
    try {
      const health = await fetchJSON("/health");
      lastSeq = Math.max(0, (health.seq || 0) - BACKLOG); // begin with some history
    } catch (_) {
      lastSeq = 0;
    }
    connect();
    refresh();
  }

  $("api-key").value = apiKey;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    apiKey = $("api-key").value.trim();
    if (apiKey) localStorage.setItem(KEY_STORE, apiKey);
    else localStorage.removeItem(KEY_STORE);
    start();
  });
  setInterval(refresh, REFRESH_MS);
  start();
})();
