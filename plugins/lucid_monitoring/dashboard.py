'''The dashboard page served at ``/monitoring/ui``: one self-contained HTML document.

Inline CSS and JS, no CDN, so it works on an air-gapped admin network. It polls
``/monitoring/dashboard`` (every 2 s, or ``?interval=<ms>``) and draws its charts on
``<canvas>``; each chart writes how many points it drew into ``data-points`` so a
headless browser test can check the charts show data.

The cluster view (its own section and table) polls ``/monitoring/cluster`` on the same
schedule: one row per node (alive, revision, workers, last-minute req/s, error rate,
p50/p99) and a row of cluster totals, and it names the node that evaluates the alert
rules. Its numbers go through ``fmt(kind, value)``, the one place that says how a
figure of each kind is written.

With ``server.admin_secret`` set the data needs a viewer token. The page takes it from
the URL fragment (``/monitoring/ui#token=<jwt>``: a fragment is never sent to the
server, so it stays out of access logs and Referer headers), or asks for it when the
API answers 401/403; it keeps it in ``sessionStorage`` (this tab only), removes it from
the address bar, and sends it as ``Authorization: Bearer`` with every poll.
'''

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Lucid monitoring</title>
<style>
  :root { --bg:#0f1419; --panel:#182029; --fg:#e6e6e6; --muted:#8a98a8; --ok:#3fb950;
          --warn:#d29922; --bad:#f85149; --a:#58a6ff; --b:#bc8cff; --c:#f0883e; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, sans-serif; background:var(--bg); color:var(--fg); }
  header { display:flex; gap:1.5em; align-items:baseline; padding:.6em 1em;
           background:var(--panel); border-bottom:1px solid #263040; }
  header h1 { font-size:1.1em; margin:0; }
  header .muted { color:var(--muted); }
  main { display:grid; grid-template-columns:repeat(auto-fit, minmax(380px, 1fr));
         gap:12px; padding:12px; }
  section { background:var(--panel); border-radius:6px; padding:10px 12px; min-width:0;
            overflow-x:auto; }
  section h2 { font-size:.95em; margin:0 0 6px; color:var(--muted); font-weight:600; }
  canvas { width:100%; height:180px; display:block; }
  .big { font-size:1.6em; font-weight:600; }
  table { width:100%; border-collapse:collapse; font-size:.9em; }
  td, th { text-align:left; padding:3px 6px; border-bottom:1px solid #263040; }
  .passing, .closed, .resolved { color:var(--ok); }
  .warning, .half_open, .pending { color:var(--warn); }
  .critical, .open, .firing, .failing { color:var(--bad); }
  .legend span { margin-right:1em; }
  .empty { color:var(--muted); font-style:italic; }
  #login { margin-left:auto; display:flex; gap:.5em; }
  #login[hidden] { display:none; }
  #login input { background:var(--bg); color:var(--fg); border:1px solid #263040;
                 border-radius:4px; padding:2px 6px; width:22em; }
</style>
</head>
<body>
<header>
  <h1>Lucid monitoring</h1>
  <span class="muted">generation <b id="generation">-</b></span>
  <span class="muted">in flight <b id="in-flight">-</b></span>
  <span class="muted">updated <b id="updated">never</b></span>
  <span class="muted" id="status">connecting…</span>
  <form id="login" hidden>
    <input id="token" type="password" autocomplete="off"
           placeholder="admin token (lucid token --role viewer)" aria-label="admin token">
    <button type="submit">Use token</button>
  </form>
</header>
<main>
  <section><h2>Requests per second</h2>
    <div class="big" id="rps-now">-</div>
    <canvas id="chart-rps" data-points="0"></canvas></section>
  <section><h2>Error rate (5xx answers)</h2>
    <div class="big" id="errors-now">-</div>
    <canvas id="chart-errors" data-points="0"></canvas></section>
  <section><h2>Latency (ms)</h2>
    <div class="legend"><span style="color:var(--a)">p50</span>
      <span style="color:var(--b)">p95</span><span style="color:var(--c)">p99</span></div>
    <canvas id="chart-latency" data-points="0"></canvas></section>
  <section><h2>Active alerts</h2><div id="alerts" class="empty">none</div></section>
  <section><h2>Services and instances</h2><div id="services" class="empty">none</div></section>
  <section><h2>Routes (last minute)</h2><div id="routes" class="empty">none</div></section>
  <section><h2>Top rate-limited keys</h2><div id="limited" class="empty">none</div></section>
  <section id="cluster-view" style="grid-column:1/-1"><h2>Cluster (last minute)
    <span id="cluster-leader" style="font-weight:400"></span></h2>
    <div id="cluster" class="empty" style="white-space:nowrap">none</div></section>
</main>
<script>
"use strict";
const params = new URLSearchParams(location.search);
const INTERVAL = Math.max(200, Number(params.get("interval")) || 2000);
const MAX_POINTS = 300;
const TOKEN_KEY = "lucid-admin-token";
const points = [];
let seeded = false;
let clusterPolling = false;  // started after the first successful poll (token known)
let token = null;
try { token = sessionStorage.getItem(TOKEN_KEY); } catch (e) { /* storage off */ }
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  setToken(fragment.get("token"));
  history.replaceState(null, "", location.pathname + location.search);
}

function setToken(value) {
  token = value || null;
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch (e) { /* storage off: the token lives as long as the page */ }
}

function askForToken(message) {
  document.getElementById("status").textContent = message;
  document.getElementById("login").hidden = false;
  document.getElementById("token").focus();
}

document.getElementById("login").addEventListener("submit", event => {
  event.preventDefault();
  const input = document.getElementById("token");
  setToken(input.value.trim());
  input.value = "";
  document.getElementById("login").hidden = true;
  document.getElementById("status").textContent = "connecting…";
  poll();
});

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",
    '"':"&quot;","'":"&#39;"}[c]));
}

function draw(id, series, colors, format) {
  const canvas = document.getElementById(id);
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 360, h = canvas.clientHeight || 180;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, w, h);
  const pad = {l: 48, r: 8, t: 8, b: 18};
  let max = 0, n = 0;
  for (const s of series) for (const v of s) { if (v != null) { max = Math.max(max, v); } }
  n = Math.max(...series.map(s => s.length));
  max = max > 0 ? max * 1.15 : 1;
  ctx.strokeStyle = "#263040"; ctx.fillStyle = "#8a98a8"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + (h - pad.t - pad.b) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
    ctx.fillText(format(max * (4 - i) / 4), 2, y + 4);
  }
  let points = 0;
  series.forEach((s, k) => {
    ctx.strokeStyle = colors[k]; ctx.fillStyle = colors[k]; ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    s.forEach((v, i) => {
      if (v == null) return;
      const x = pad.l + (w - pad.l - pad.r) * (n <= 1 ? 1 : i / (n - 1));
      const y = pad.t + (h - pad.t - pad.b) * (1 - v / max);
      if (!started) { ctx.moveTo(x, y); started = true; } else { ctx.lineTo(x, y); }
      ctx.fillRect(x - 1.5, y - 1.5, 3, 3);
      points++;
    });
    ctx.stroke();
  });
  canvas.dataset.points = String(points);
  return points;
}

function fill(id, html) {
  const element = document.getElementById(id);
  element.className = "";
  element.innerHTML = html;
}

function table(rows, columns) {
  if (!rows.length) return '<span class="empty">none</span>';
  let html = "<table><tr>" + columns.map(c => "<th>" + esc(c[0]) + "</th>").join("") + "</tr>";
  for (const r of rows) {
    html += "<tr>" + columns.map(c => {
      const v = c[1](r);
      const cls = c[2] ? ' class="' + esc(c[2](r)) + '"' : "";
      return "<td" + cls + ">" + esc(v == null ? "-" : v) + "</td>";
    }).join("") + "</tr>";
  }
  return html + "</table>";
}

// How the cluster view writes each kind of figure: "rps" (req/s), "rate" (a share,
// 0..1), "ms" (milliseconds), "count"; null or undefined is "-".
function fmt(kind, value) {
  if (value == null) return "-";
  if (kind === "rps") return Number(value).toFixed(1);
  if (kind === "rate") return (Number(value) * 100).toFixed(2) + " %";
  if (kind === "ms") return Number(value).toFixed(1);
  return String(value);
}

function renderCluster(data) {
  const rows = (data.nodes || []).map(n => Object.assign({}, n.minute || {}, {
    node: n.node_id + (n.node_id === data.node_id ? " (this node)" : ""),
    state: n.alive ? "alive" : "dead", revision: n.revision, workers: n.workers,
    leader: n.node_id === data.leader ? "leader" : ""}));
  const totals = data.totals || {};
  rows.push(Object.assign({}, totals.minute || {}, {
    node: "cluster", state: totals.alive + "/" + totals.nodes + " alive",
    revision: data.revision, workers: (data.nodes || []).reduce(
      (sum, n) => sum + (n.alive ? n.workers : 0), 0), leader: "", total: true}));
  let html = table(rows, [
    ["node", r => r.node], ["state", r => r.state, r => r.state === "dead" ? "failing" : ""],
    ["alerts", r => r.leader], ["revision", r => r.revision], ["workers", r => r.workers],
    ["req/s", r => fmt("rps", r.rps)], ["errors", r => fmt("rate", r.error_rate)],
    ["p50 ms", r => fmt("ms", r.p50_ms)], ["p99 ms", r => fmt("ms", r.p99_ms)]]);
  // the last row is the cluster's: mark it for styles and tests
  html = html.replace(/<tr>(?![\s\S]*<tr>)/, '<tr class="cluster-total">');
  fill("cluster", html);
  document.getElementById("cluster-leader").textContent =
    data.leader ? "· alerts evaluated by " + data.leader : "· no alert leader";
  document.body.dataset.clusterPolls =
    String(Number(document.body.dataset.clusterPolls || 0) + 1);
}

async function pollCluster() {
  try {
    const headers = token ? {"Authorization": "Bearer " + token} : {};
    const response = await fetch("cluster", {cache: "no-store", headers: headers});
    if (response.ok) renderCluster(await response.json());
  } catch (e) { /* the main poll reports the connection's state */ }
  setTimeout(pollCluster, INTERVAL);
}

function point(t, f) {
  return {t: t, rps: f.rps, err: f.error_rate * 100, p50: f.p50_ms, p95: f.p95_ms,
          p99: f.p99_ms};
}

function render(data) {
  if (!seeded && data.series) {
    for (const s of data.series) points.push(point(s.t, s));
    seeded = true;
  }
  if (data.now) points.push(point(data.time, data.now));
  while (points.length > MAX_POINTS) points.shift();
  document.getElementById("generation").textContent = data.generation;
  document.getElementById("in-flight").textContent = data.in_flight;
  document.getElementById("updated").textContent = new Date(data.time * 1000)
    .toLocaleTimeString();
  if (data.now) {
    document.getElementById("rps-now").textContent = data.now.rps.toFixed(1) + " req/s";
    document.getElementById("errors-now").textContent =
      (data.now.error_rate * 100).toFixed(2) + " %";
  }
  draw("chart-rps", [points.map(p => p.rps)], ["#58a6ff"], v => v.toFixed(1));
  draw("chart-errors", [points.map(p => p.err)], ["#f85149"], v => v.toFixed(1) + "%");
  draw("chart-latency", [points.map(p => p.p50), points.map(p => p.p95),
       points.map(p => p.p99)], ["#58a6ff", "#bc8cff", "#f0883e"], v => v.toFixed(1));
  const instances = [];
  for (const s of data.services || []) for (const i of s.instances) instances.push(
    Object.assign({service: s.service}, i));
  fill("services", table(instances, [
    ["service", r => r.service], ["instance", r => r.instance],
    ["health", r => r.health, r => r.health], ["breaker", r => r.breaker, r => r.breaker],
    ["req/s", r => r.rps], ["errors", r => r.error_rate], ["p99 ms", r => r.p99_ms]]));
  fill("routes", table(data.routes || [], [
    ["route", r => r.route], ["service", r => r.service], ["req/s", r => r.rps],
    ["errors", r => r.error_rate], ["p50", r => r.p50_ms], ["p99", r => r.p99_ms]]));
  fill("limited", table(data.rate_limited || [], [
    ["key", r => r.key], ["rejections", r => r.rejections]]));
  fill("alerts", table(data.alerts || [], [
    ["alert", r => r.name], ["state", r => r.state, r => r.state],
    ["severity", r => r.rule.severity, r => r.rule.severity], ["value", r => r.value]]));
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

async function poll() {
  try {
    const headers = token ? {"Authorization": "Bearer " + token} : {};
    const response = await fetch("dashboard", {cache: "no-store", headers: headers});
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      const refused = token !== null;
      setToken(null);
      askForToken(refused ? "token refused: " + (body.error || "HTTP " + response.status)
                          : "needs an admin token");
      return;  // polling resumes when a token is entered
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    document.getElementById("status").textContent = "live";
    if (!clusterPolling) { clusterPolling = true; pollCluster(); }
  } catch (e) {
    document.getElementById("status").textContent = "error: " + e.message;
  }
  setTimeout(poll, INTERVAL);
}
poll();
</script>
</body>
</html>
"""
