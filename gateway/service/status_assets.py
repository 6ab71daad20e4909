"""The status page itself: HTML, CSS and a small script, served by the admin app.

Self-contained (no CDN, no framework): the admin port is often reachable only from inside
the cluster or through a port-forward. Script and style are separate files so the page
runs under a strict Content-Security-Policy (`CSP`); data reaches the DOM only through
``textContent`` and SVG attributes, never as markup. See `gateway.status_page` for the
numbers, the README ("Reading the status page") for what they mean.
"""

from __future__ import annotations

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ws-gateway status</title>
<link rel="stylesheet" href="status.css">
<script src="status.js" defer></script>
</head>
<body>
<header>
  <h1>ws-gateway</h1>
  <p id="where">loading&hellip;</p>
  <p id="updated" class="muted"></p>
</header>
<p id="banner" hidden></p>
<section id="tiles" aria-label="now"></section>
<section id="ramp" aria-label="the automatic ramp" hidden>
  <h2 id="ramp-title"></h2>
  <ol id="ramp-steps"></ol>
  <p id="ramp-state"></p>
  <p id="ramp-next"></p>
  <p id="ramp-window" class="muted"></p>
  <table>
    <thead><tr><th>gate</th><th>value</th><th>threshold</th><th>verdict</th><th>from</th></tr></thead>
    <tbody id="ramp-gates"></tbody>
  </table>
</section>
<form id="route-form" aria-label="where does a user go">
  <label for="route-user">Where does user</label>
  <input id="route-user" name="user" autocomplete="off" spellcheck="false" required maxlength="256">
  <button type="submit">go, and why?</button>
  <output id="route-answer" for="route-user"></output>
</form>
<section id="charts" aria-label="the last hour"></section>
<section id="versions" aria-label="usage by app version" hidden>
  <h2>Who is still on the old method</h2>
  <p id="versions-when" class="muted"></p>
  <table>
    <thead><tr><th>app version</th><th>users</th><th>legacy users</th><th>legacy share</th><th>last seen (UTC)</th></tr></thead>
    <tbody id="versions-rows"></tbody>
  </table>
</section>
<footer class="muted">
  Sampled in this process every few seconds; the history starts empty after a restart
  (Prometheus keeps the long view). Raw data: <a href="status.json">status.json</a>,
  <a href="rollout">rollout</a>, <a href="metrics">metrics</a>.
</footer>
</body>
</html>
"""

STYLE = """
:root { --old: #b45309; --new: #1d4ed8; --legacy: #6b7280; --message: #059669; --bad: #dc2626; --ramp: #7c3aed;
        --warn: #d97706; --ok: #15803d; --grid: #e5e7eb; --text: #111827; --muted: #6b7280; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--text);
       margin: 0 auto; padding: 16px 24px; max-width: 1280px; background: #f9fafb; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
h1 { font-size: 20px; margin: 0; }
header p { margin: 0; }
.muted { color: var(--muted); }
#banner { background: var(--bad); color: #fff; padding: 8px 12px; border-radius: 6px; font-weight: 600; }
#tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; margin: 16px 0; }
.tile { background: #fff; border: 1px solid var(--grid); border-left: 6px solid var(--ok); border-radius: 6px;
        padding: 10px 12px; }
.tile.warn { border-left-color: var(--warn); }
.tile.bad { border-left-color: var(--bad); background: #fef2f2; }
.tile.quiet { border-left-color: var(--grid); }
.tile h2 { font-size: 12px; font-weight: 600; text-transform: uppercase; letter-spacing: .04em; margin: 0 0 4px;
           color: var(--muted); }
.tile .value { font-size: 22px; font-weight: 650; }
.tile .detail { color: var(--muted); font-size: 12px; }
#charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid var(--grid); border-radius: 6px; padding: 8px 10px; }
figcaption { font-weight: 600; margin-bottom: 4px; }
svg { width: 100%; height: auto; display: block; }
svg text { font-size: 10px; fill: var(--muted); }
.legend { display: flex; gap: 12px; flex-wrap: wrap; font-size: 12px; margin-top: 2px; }
.legend span::before { content: ""; display: inline-block; width: 10px; height: 3px; margin-right: 4px;
                       vertical-align: middle; background: currentColor; }
.c-old { color: var(--old); } .c-new { color: var(--new); } .c-legacy { color: var(--legacy); }
.c-message { color: var(--message); } .c-ramp { color: var(--ramp); } .c-bad { color: var(--bad); } .c-muted { color: var(--muted); }
footer { margin-top: 16px; font-size: 12px; }
#route-form { display: flex; align-items: baseline; gap: 8px; flex-wrap: wrap; margin: 0 0 16px; }
#route-form input { font: inherit; padding: 2px 6px; min-width: 16em; }
#route-form button { font: inherit; }
#route-answer { font-weight: 600; }
#route-answer.bad { color: var(--bad); }
#versions { background: #fff; border: 1px solid var(--grid); border-radius: 6px; padding: 8px 10px; margin-top: 12px; }
#versions h2 { font-size: 14px; margin: 0 0 4px; }
#versions p { margin: 0 0 6px; font-size: 12px; }
#versions table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
#versions th, #versions td { text-align: right; padding: 3px 8px; border-bottom: 1px solid var(--grid); }
#versions th:first-child, #versions td:first-child { text-align: left; }
#versions td.bad { color: var(--bad); font-weight: 600; }
#ramp { background: #fff; border: 1px solid var(--grid); border-left: 6px solid var(--ok); border-radius: 6px;
        padding: 8px 10px; margin: 0 0 16px; }
#ramp.warn { border-left-color: var(--warn); }
#ramp.bad { border-left-color: var(--bad); background: #fef2f2; }
#ramp.quiet { border-left-color: var(--grid); }
#ramp h2 { font-size: 14px; margin: 0 0 6px; }
#ramp p { margin: 0 0 6px; }
#ramp-steps { display: flex; gap: 4px; list-style: none; padding: 0; margin: 0 0 8px; flex-wrap: wrap; }
#ramp-steps li { padding: 2px 10px; border: 1px solid var(--grid); border-radius: 12px; color: var(--muted); }
#ramp-steps li.passed { color: var(--text); }
#ramp-steps li.current { background: var(--new); border-color: var(--new); color: #fff; font-weight: 650; }
#ramp-state.warn { color: var(--warn); font-weight: 600; }
#ramp-state.bad { color: var(--bad); font-weight: 600; }
#ramp table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
#ramp th, #ramp td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--grid); }
#ramp td.bad { color: var(--bad); font-weight: 600; }
"""

SCRIPT = r"""
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const COLOR = {old: "#b45309", new: "#1d4ed8", legacy: "#6b7280", message: "#059669", bad: "#dc2626", muted: "#9ca3af",
               ramp: "#7c3aed"};
const GUARD = {healthy: "healthy", recovering: "recovering", tripped: "TRIPPED"};
const DASHED = new Set(["configured_percent", "ramp_step_percent", "reply_p95_old", "reply_p95_new"]);
// Each chart: its columns in status.json, a unit, and optionally a fixed top, an alert line, the guard band.
// A line marked optional (a fourth element) is left out, legend too, while its column has no value.
const CHARTS = [
  {title: "Sessions opened per second", unit: "/s", lines: [
    ["sessions_per_s_old", "old backend", "old"], ["sessions_per_s_new", "new backend", "new"]]},
  {title: "Open sessions", unit: "", lines: [["active_old", "old backend", "old"], ["active_new", "new backend", "new"]]},
  {title: "Open sessions by app", unit: "", lines: [
    ["active_legacy", "legacy app (token in URL)", "legacy"], ["active_message", "current app (authenticate)", "message"]]},
  {title: "Connection success (sessions opened / upgrades)", unit: "%", top: 100, alert: 95, lines: [
    ["success_percent", "success", "message"]]},
  {title: "Failures per second", unit: "/s", lines: [
    ["upstream_failures_per_s_old", "old backend", "old"], ["upstream_failures_per_s_new", "new backend", "new"],
    ["auth_failures_per_s", "auth (closed 1008)", "bad"]]},
  {title: "Reply time: average, p95 dashed (client message to the backend's next frame)", unit: "s", alert: 2, lines: [
    ["reply_avg_old", "old backend", "old"], ["reply_avg_new", "new backend", "new"],
    ["reply_p95_old", "p95 old", "old"], ["reply_p95_new", "p95 new", "new"]]},
  {title: "Session ready p95 (upgrade to relaying)", unit: "s", alert: 2, lines: [
    ["ready_p95_old", "old backend", "old"], ["ready_p95_new", "new backend", "new"]]},
  {title: "Users routed to the new backend", unit: "%", top: 100, guard: true, lines: [
    ["configured_percent", "configured", "muted"], ["ramp_step_percent", "ramp step", "ramp", true],
    ["effective_percent", "effective (after the guard)", "new"]]},
];

function node(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svgNode(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(value, unit) {
  if (value === null || value === undefined || Number.isNaN(value)) return "\u2013";
  const short = (v, digits) => String(Number(v.toFixed(digits)));
  if (value === 0) return "0" + (unit === "%" ? " %" : "");
  if (unit === "s") return value < 1 ? Math.round(value * 1000) + " ms" : short(value, 2) + " s";
  if (unit === "%") return short(value, 1) + " %";
  if (unit === "/s") return short(value, value >= 10 ? 0 : 2) + "/s";
  return short(value, 1);
}

function niceTop(max) {
  if (!(max > 0)) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= max) return m * step;
  return 10 * step;
}

function chart(def, data) {
  const lines = def.lines.filter(([key, , , optional]) =>
    !optional || data.recent[key] !== null || data.series[key].some(v => v !== null));
  const W = 560, H = 150, L = 48, R = 8, T = 8, B = 20;
  // From the oldest sample (at least a minute back) to now: a young process fills the width too.
  const t = data.series.t, end = data.now, every = data.sampled_every_seconds;
  const start = Math.max(end - data.window_seconds, Math.min(t.length ? t[0] - every : end, end - 60));
  const x = v => L + (W - L - R) * (v - start) / (end - start);
  // Scaled to the data, so milliseconds stay readable under a 2 s alert; the alert line shows once in range.
  let max = 0;
  for (const [key] of lines) for (const v of data.series[key]) if (v !== null && v > max) max = v;
  const top = def.top || niceTop(max * 1.1);
  const y = v => T + (H - T - B) * (1 - Math.min(v, top) / top);
  const root = svgNode("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": def.title});
  if (def.guard) {
    const state = data.series.guard_state;
    for (let i = 0; i < t.length; i++) {
      if (!state[i]) continue;
      const x0 = x(Math.max(start, i ? t[i - 1] : t[i] - every)), x1 = x(t[i]);
      root.appendChild(svgNode("rect", {x: x0, y: T, width: Math.max(1, x1 - x0), height: H - T - B,
        fill: state[i] >= 2 ? "#fecaca" : "#fde68a"}));
    }
  }
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    root.appendChild(svgNode("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e5e7eb"}));
    root.appendChild(svgNode("text", {x: L - 4, y: y(v) + 3, "text-anchor": "end"}, fmt(v, def.unit)));
  }
  const ago = s => s >= 120 ? `\u2212${Math.round(s / 60)} min` : `\u2212${Math.round(s)} s`;
  for (const [label, at] of [[ago(end - start), start], [ago((end - start) / 2), start + (end - start) / 2], ["now", end]]) {
    root.appendChild(svgNode("text", {x: x(at), y: H - 6, "text-anchor": at === start ? "start" : at === end ? "end" : "middle"}, label));
  }
  if (def.alert && def.alert <= top) {
    root.appendChild(svgNode("line", {x1: L, x2: W - R, y1: y(def.alert), y2: y(def.alert), stroke: COLOR.bad,
      "stroke-dasharray": "4 3"}));
  }
  for (const [key, , color] of lines) {
    const values = data.series[key];
    let d = "", pen = "M";
    for (let i = 0; i < t.length; i++) {
      if (values[i] === null || t[i] < start) { pen = "M"; continue; }
      d += `${pen}${x(t[i]).toFixed(1)},${y(values[i]).toFixed(1)}`;
      pen = "L";
    }
    if (d) root.appendChild(svgNode("path", {d, fill: "none", stroke: COLOR[color], "stroke-width": 2,
      "stroke-dasharray": DASHED.has(key) ? "5 3" : "none", "data-series": key}));
  }
  const figure = node("figure");
  figure.appendChild(node("figcaption", {}, def.title));
  figure.appendChild(root);
  // The legend states the tiles' numbers (data.recent: the same window, the same formulas), not
  // the last 5-second point of the line, which on a few upgrades can say 50 % where the tile says 75 %.
  const legend = node("div", {class: "legend"});
  legend.appendChild(node("span", {class: "c-muted"}, spanOf(data.recent)));
  for (const [key, label, color] of lines) {
    legend.appendChild(node("span", {class: "c-" + color}, `${label}: ${fmt(data.recent[key], def.unit)}`));
  }
  if (def.alert) legend.appendChild(node("span", {class: "c-bad"}, `alert at ${fmt(def.alert, def.unit)}`));
  figure.appendChild(legend);
  return figure;
}

function tile(title, value, detail, level) {
  const e = node("div", {class: "tile " + (level || "")});
  e.appendChild(node("h2", {}, title));
  e.appendChild(node("div", {class: "value"}, value));
  if (detail) e.appendChild(node("div", {class: "detail"}, detail));
  return e;
}

function spanOf(r) {
  return !(r.seconds > 0) ? "no history yet" :
    r.seconds >= 120 ? `last ${Math.round(r.seconds / 60)} min` : `last ${Math.round(r.seconds)} s`;
}

function render(data) {
  const r = data.recent, ro = data.rollout, g = ro.guard || {};
  const span = spanOf(r);
  document.getElementById("where").textContent =
    `${ro.config_file || "(no config file)"}, loaded ${ro.config_loaded_at || "?"}` +
    (data.workers ? ` \u00b7 ${data.workers} workers` : "");
  document.getElementById("updated").textContent = "updated " + new Date(data.now * 1000).toLocaleTimeString();
  const banner = document.getElementById("banner");
  banner.hidden = !ro.draining;
  banner.textContent = ro.draining ? "Draining: this gateway is shutting down and takes no new clients." : "";

  const tiles = document.getElementById("tiles");
  tiles.replaceChildren();
  let guardText = GUARD[g.state] || String(g.state);
  if (g.state === "recovering" && g.step) guardText += ` (step ${g.step})`;
  const trips = g.trips === 1 ? "1 trip" : `${g.trips || 0} trips`;
  // The times as the log writes them (UTC), so the tile and the log line of the trip can be matched.
  const utc = iso => iso ? iso.slice(11, 19) + " UTC" : "?";
  const guardDetail = g.enabled === false ? "guard disabled" :
    g.state === "tripped" ? `guard TRIPPED since ${utc(g.since)} \u00b7 retries at ${utc(g.retries_at)} ` +
      `(in ${g.retries_in_seconds} s) \u00b7 ${trips}` :
    `guard ${guardText} \u00b7 ${trips}`;
  // While the ramp is on, its step is what the guard scales; rollout.new_percent is not used.
  const ramp = ro.ramp && ro.ramp.enabled ? ro.ramp : null;
  const planned = ramp ? `ramp step ${fmt(ramp.step_percent, "%")}` : `configured ${fmt(ro.configured_percent, "%")}`;
  tiles.appendChild(tile("New backend", `${fmt(ro.effective_percent, "%")} of users`,
    `${planned} \u00b7 ${guardDetail}`,
    g.state === "tripped" ? "bad" : g.state === "recovering" ? "warn" : ""));
  tiles.appendChild(tile("Open sessions", `old ${fmt(r.active_old)} \u00b7 new ${fmt(r.active_new)}`,
    `legacy app ${fmt(r.active_legacy)} \u00b7 current app ${fmt(r.active_message)}`, "quiet"));
  // As the alerts: a share counts only above 0.1 upgrades per second, not on a trickle.
  const busy = r.attempts_per_s > 0.1;
  tiles.appendChild(tile("Connection success", fmt(r.success_percent, "%"), `${span} \u00b7 alert under 95 %`,
    r.success_percent === null ? "quiet" : busy && r.success_percent < 95 ? "bad" : ""));
  tiles.appendChild(tile("Auth failures", fmt(r.auth_failure_percent, "%"), `of upgrades, ${span} \u00b7 alert over 5 %`,
    r.auth_failure_percent === null ? "quiet" : busy && r.auth_failure_percent > 5 ? "bad" : ""));
  tiles.appendChild(tile("New-backend trouble", `${fmt(r.upstream_failures_new)} failures`,
    `${span}: ${fmt(r.fallbacks)} fallbacks \u00b7 old backend ${fmt(r.upstream_failures_old)} failures`,
    r.upstream_failures_new > 0 ? "warn" : ""));
  tiles.appendChild(tile("Reply time", `old ${fmt(r.reply_avg_old, "s")} \u00b7 new ${fmt(r.reply_avg_new, "s")}`,
    `average, ${span} \u00b7 p95 old ${fmt(r.reply_p95_old, "s")} \u00b7 new ${fmt(r.reply_p95_new, "s")} \u00b7 alert over 2 s`,
    r.reply_avg_old === null && r.reply_avg_new === null ? "quiet" : Math.max(r.reply_avg_old || 0, r.reply_avg_new || 0) > 2 ? "bad" : ""));
  tiles.appendChild(tile("Session ready p95", `old ${fmt(r.ready_p95_old, "s")} \u00b7 new ${fmt(r.ready_p95_new, "s")}`,
    `${span} \u00b7 alert over 2 s`, Math.max(r.ready_p95_old || 0, r.ready_p95_new || 0) > 2 ? "bad" : ""));

  const charts = document.getElementById("charts");
  charts.replaceChildren(...CHARTS.map(def => chart(def, data)));
  renderRamp(ramp);
  renderVersions(ro.app_versions);
}

// The automatic ramp (rollout.ramp) as /rollout's `ramp` says it; hidden while it is off.
const RAMP_STATES = {advancing: ["advancing", ""], holding: ["holding", "warn"], stepped_back: ["stepped back", "bad"],
                     paused: ["paused", "quiet"], done: ["done", ""]};

function countdown(seconds) {
  const s = Math.max(0, Math.ceil(seconds)), pad = n => String(n).padStart(2, "0");
  return s >= 3600 ? `${Math.floor(s / 3600)}:${pad(Math.floor(s / 60) % 60)}:${pad(s % 60)}` : `${Math.floor(s / 60)}:${pad(s % 60)}`;
}

// A gate's value as the ramp's log line writes it (three significant digits); its threshold as configured.
function gateNumber(gate, value, exact) {
  if (value === null || value === undefined) return "no data";
  return (exact ? String(value) : String(Number(value.toPrecision(3)))) + (gate.name === "reply_seconds_avg" ? " s" : "");
}

function renderRamp(ramp) {
  const section = document.getElementById("ramp");
  section.hidden = !ramp;
  if (!ramp) return;
  // No state yet: the first sync with the shared store (within a second of the start) is still to come.
  const [stateText, level] = ramp.state === null ? ["starting", "quiet"] : RAMP_STATES[ramp.state] || [String(ramp.state), "warn"];
  section.className = level;
  const steps = ramp.steps || [], at = ramp.step_index;
  document.getElementById("ramp-title").textContent = at === null ? "Ramp: starting" :
    `Ramp: step ${at + 1} of ${steps.length} (${fmt(ramp.step_percent, "%")}) \u00b7 ${stateText}`;
  document.getElementById("ramp-steps").replaceChildren(...steps.map((step, i) =>
    node("li", i === at ? {class: "current", "aria-current": "step"} : i < at ? {class: "passed"} : {}, fmt(step, "%"))));
  const state = document.getElementById("ramp-state");
  state.className = level;
  state.textContent = ramp.reason ? `${stateText}: ${ramp.reason}` : stateText;
  const next = [];
  if (ramp.state !== "paused" && ramp.state !== "done") {
    if (ramp.next_step_in_seconds > 0) next.push(`next step in ${countdown(ramp.next_step_in_seconds)}`);
    if (ramp.waiting_for) next.push(`waiting for ${ramp.waiting_for}`);
    else if (ramp.next_step_in_seconds === 0) next.push("next step due now");
  }
  const nextLine = document.getElementById("ramp-next");
  nextLine.hidden = !next.length;
  nextLine.textContent = next.join(" \u00b7 ");
  const since = ramp.since ? ` since ${ramp.since.slice(11, 19)} UTC` : "";
  document.getElementById("ramp-window").textContent =
    `${ramp.sessions} new-backend sessions in this step's window${since} (every replica; ` +
    (ramp.min_sessions ? `judged from ${ramp.min_sessions}) ` : "judged from the first) ") +
    `\u00b7 hold ${ramp.hold_minutes} min \u00b7 on failure: ${ramp.on_failure === "step_back" ? "step back" : "hold"}` +
    (ramp.store_available === false ? " \u00b7 the shared store is not answering" : "");
  document.getElementById("ramp-gates").replaceChildren(...(ramp.gates || []).map(gate => {
    const tr = node("tr", {"data-gate": gate.name});
    const verdict = !gate.ok ? "failing" : gate.value === null ? "ok (no data yet)" : "ok";
    for (const [text, cls] of [[gate.name], [gateNumber(gate, gate.value)],
                               [`${gate.bound === "min" ? "\u2265" : "\u2264"} ${gateNumber(gate, gate.threshold, true)}`],
                               [verdict, gate.ok ? "" : "bad"], [gate.detail]]) {
      tr.appendChild(node("td", cls ? {class: cls} : {}, text));
    }
    return tr;
  }));
}

// Today's users per app version (usage.app_version), as the gateway last read them from its store.
function renderVersions(table) {
  const section = document.getElementById("versions");
  section.hidden = !table;
  if (!table) return;
  document.getElementById("versions-when").textContent =
    `${table.day} (UTC), read ${table.read_at}: users of each app version today, and how many of them ` +
    `still send the token in the URL. Most users first.`;
  const rows = table.versions.map(v => {
    const tr = node("tr", {"data-version": v.version});
    const share = v.legacy_share_percent;
    const when = new Date(v.last_seen * 1000).toISOString().slice(0, 16).replace("T", " ");
    for (const [text, cls] of [[v.version], [String(v.users)], [String(v.users_legacy)],
                               [share === null ? "\u2013" : share.toFixed(2) + " %", v.users_legacy > 0 ? "bad" : ""], [when]]) {
      tr.appendChild(node("td", cls ? {class: cls} : {}, text));
    }
    return tr;
  });
  if (!rows.length) {
    const empty = node("tr");
    empty.appendChild(node("td", {colspan: "5"}, "no sessions counted yet today"));
    rows.push(empty);
  }
  document.getElementById("versions-rows").replaceChildren(...rows);
}

async function refresh() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const data = await response.json();
    render(data);
    setTimeout(refresh, data.sampled_every_seconds * 1000);
  } catch (error) {
    document.getElementById("updated").textContent = "cannot reach the admin port (" + error.message + "); retrying";
    setTimeout(refresh, 5000);
  }
}

// "Where does user X go, and why": /route answers with the function `ws-gateway route` uses,
// on the running config, and what a connection made now gets (the rollback guard included).
async function askRoute(user) {
  const answer = document.getElementById("route-answer");
  answer.className = "";
  answer.textContent = "asking\u2026";
  try {
    const response = await fetch("route?user=" + encodeURIComponent(user), {cache: "no-store"});
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}: this admin port cannot answer it`);
    let text = `${body.user_id}: ${body.line}`;
    if (body.now.backend !== body.backend || body.now.why !== body.why) text += ` \u00b7 right now: ${body.now.backend} (${body.now.why})`;
    answer.textContent = text;
  } catch (error) {
    answer.className = "bad";
    answer.textContent = error.message;
  }
}

document.getElementById("route-form").addEventListener("submit", event => {
  event.preventDefault();
  askRoute(document.getElementById("route-user").value);
});

refresh();
"""
