'''The dashboard page served at ``/monitoring/ui``: one self-contained HTML document.

Inline CSS and JS, no CDN, so it works on an air-gapped admin network. It polls
``/monitoring/dashboard`` (every 2 s, or ``?interval=<ms>``) and draws its charts on
``<canvas>``; each chart writes how many points it drew into ``data-points`` and the
time labels of its x axis into ``data-time-labels``, and the page counts the table
cells it would cut off into ``<body data-clipped>``, so a headless browser test can
check the charts show data and the tables can be read.

Numbers go through one ``fmt`` object, so every view rounds alike: req/s to one
decimal, error rates as percentages, latencies in ms (two decimals under 10 ms, one
under 100, none above), chart times as HH:MM:SS. Tables wrap long names and scroll
sideways in their own box when still too wide; nothing is clipped.

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
  .table { overflow-x:auto; max-width:100%; }
  section h2 { font-size:.95em; margin:0 0 6px; color:var(--muted); font-weight:600; }
  canvas { width:100%; height:180px; display:block; }
  .big { font-size:1.6em; font-weight:600; }
  table { width:100%; border-collapse:collapse; font-size:.9em; }
  td, th { text-align:left; padding:3px 6px; border-bottom:1px solid #263040;
           vertical-align:top; overflow-wrap:break-word; }
  td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
  td.num { white-space:nowrap; }
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
</main>
<script>
"use strict";
const params = new URLSearchParams(location.search);
const INTERVAL = Math.max(200, Number(params.get("interval")) || 2000);
const MAX_POINTS = 300;
const TOKEN_KEY = "lucid-admin-token";
const points = [];
let seeded = false;
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

// Every number the page shows goes through fmt: one rounding rule per kind of figure.
const fmt = {
  rps(v) { return v == null ? "-" : Number(v).toFixed(1); },
  // an error rate (0..1) as a percentage: two decimals under 1 %, one above
  pct(v) {
    if (v == null) return "-";
    const p = Number(v) * 100;
    if (p === 0) return "0%";
    return (p < 1 ? p.toFixed(2) : p < 100 ? p.toFixed(1) : "100") + "%";
  },
  // milliseconds: two decimals under 10 ms, one under 100 ms, whole ms above
  ms(v) {
    if (v == null) return "-";
    const n = Number(v);
    return n < 10 ? n.toFixed(2) : n < 100 ? n.toFixed(1) : n.toFixed(0);
  },
  count(v) { return v == null ? "-" : String(Math.round(Number(v))); },
  // an alert's value, in the unit of its rule's metric
  alert(metric, v) {
    if (v == null) return "-";
    if (metric === "error_rate" || metric === "healthy_instance_share") return fmt.pct(v);
    if (/_latency$/.test(metric)) return fmt.ms(v * 1000) + " ms";
    if (/_rate$/.test(metric)) return fmt.rps(v) + "/s";
    return String(Math.round(Number(v) * 100) / 100);
  },
  pad(n) { return String(n).padStart(2, "0"); },
  // unix seconds as local HH:MM:SS (chart time axes)
  time(t) {
    const d = new Date(t * 1000);
    return fmt.pad(d.getHours()) + ":" + fmt.pad(d.getMinutes()) + ":" + fmt.pad(d.getSeconds());
  },
};

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",
    '"':"&quot;","'":"&#39;"}[c]));
}

// Long names (URLs, route ids, keys) may wrap after / . : - _ and the like, so a
// table column needs not be as wide as its longest name; short words stay whole.
function breakable(s) {
  const text = String(s);
  if (text.length <= 12) return esc(text);
  return text.split(/(?<=[\/.:_\-@?=,])/).map(esc).join("<wbr>");
}

function draw(id, series, colors, format, times) {
  const canvas = document.getElementById(id);
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 360, h = canvas.clientHeight || 180;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, w, h);
  const pad = {l: 48, r: 8, t: 8, b: 20};
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
  // time labels under the points they name: the last one, then from the first on,
  // each where it overlaps no other and says another time than its neighbour
  const labels = [];
  if (times && times.length) {
    const gap = 10, right = w - pad.r;
    const at = i => pad.l + (right - pad.l) * (times.length <= 1 ? 1 : i / (times.length - 1));
    const box = i => {
      const text = fmt.time(times[i]), tw = ctx.measureText(text).width;
      const x = Math.min(Math.max(at(i) - tw / 2, pad.l), right - tw);
      return {text: text, x: x, end: x + tw};
    };
    const last = box(times.length - 1);
    const placed = [];
    let end = -Infinity, previous = null;
    for (let i = 0; i < times.length - 1; i++) {
      const b = box(i);
      if (b.x < end + gap || b.end > last.x - gap || b.text === previous) continue;
      placed.push(b);
      end = b.end;
      previous = b.text;
    }
    if (last.text === previous) placed.pop();  // the same second: name the newest point
    placed.push(last);
    ctx.fillStyle = "#8a98a8";
    for (const b of placed) { ctx.fillText(b.text, b.x, h - 5); labels.push(b.text); }
  }
  canvas.dataset.timeLabels = labels.join(" ");
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

// columns: [heading, value, class of the cell (optional)]; a column whose value is
// a number formatted by fmt is aligned right and never wrapped (class "num")
function table(rows, columns) {
  if (!rows.length) return '<span class="empty">none</span>';
  let html = '<div class="table"><table><tr>' + columns.map(c =>
    "<th" + (c[3] ? ' class="num"' : "") + ">" + esc(c[0]) + "</th>").join("") + "</tr>";
  for (const r of rows) {
    html += "<tr>" + columns.map(c => {
      const v = c[1](r);
      const cls = [c[2] ? c[2](r) : "", c[3] ? "num" : ""].filter(Boolean).join(" ");
      return "<td" + (cls ? ' class="' + esc(cls) + '"' : "") + ">" +
        (v == null ? "-" : c[3] ? esc(v) : breakable(v)) + "</td>";
    }).join("") + "</tr>";
  }
  return html + "</table></div>";
}

// Table cells whose text the page cuts off: a cell that hides its overflow, or a
// table wider than a box that cannot scroll (the dashboard test expects none).
function clipped() {
  let n = 0;
  for (const cell of document.querySelectorAll("td, th")) {
    const style = getComputedStyle(cell);
    if (/hidden|clip/.test(style.overflowX) && cell.scrollWidth > cell.clientWidth + 1) n++;
  }
  for (const table of document.querySelectorAll("table")) {
    let box = table.parentElement;
    while (box && box !== document.body) {
      if (!/auto|scroll/.test(getComputedStyle(box).overflowX) &&
          table.getBoundingClientRect().right > box.getBoundingClientRect().right + 1) n++;
      if (/auto|scroll/.test(getComputedStyle(box).overflowX)) break;
      box = box.parentElement;
    }
  }
  return n;
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
  document.getElementById("updated").textContent = fmt.time(data.time);
  if (data.now) {
    document.getElementById("rps-now").textContent = fmt.rps(data.now.rps) + " req/s";
    document.getElementById("errors-now").textContent = fmt.pct(data.now.error_rate);
  }
  const times = points.map(p => p.t);
  draw("chart-rps", [points.map(p => p.rps)], ["#58a6ff"], fmt.rps, times);
  draw("chart-errors", [points.map(p => p.err)], ["#f85149"], v => fmt.pct(v / 100), times);
  draw("chart-latency", [points.map(p => p.p50), points.map(p => p.p95),
       points.map(p => p.p99)], ["#58a6ff", "#bc8cff", "#f0883e"], fmt.ms, times);
  const instances = [];
  for (const s of data.services || []) for (const i of s.instances) instances.push(
    Object.assign({service: s.service}, i));
  fill("services", table(instances, [
    ["service", r => r.service], ["instance", r => r.instance],
    ["health", r => r.health, r => r.health], ["breaker", r => r.breaker, r => r.breaker],
    ["req/s", r => fmt.rps(r.rps), null, true],
    ["errors", r => fmt.pct(r.error_rate), null, true],
    ["p99 ms", r => fmt.ms(r.p99_ms), null, true]]));
  fill("routes", table(data.routes || [], [
    ["route", r => r.route], ["service", r => r.service],
    ["req/s", r => fmt.rps(r.rps), null, true],
    ["errors", r => fmt.pct(r.error_rate), null, true],
    ["p50 ms", r => fmt.ms(r.p50_ms), null, true], ["p99 ms", r => fmt.ms(r.p99_ms), null, true]]));
  fill("limited", table(data.rate_limited || [], [
    ["key", r => r.key], ["rejections", r => fmt.count(r.rejections), null, true]]));
  fill("alerts", table(data.alerts || [], [
    ["alert", r => r.name], ["state", r => r.state, r => r.state],
    ["severity", r => r.rule.severity, r => r.rule.severity],
    ["value", r => fmt.alert(r.rule.metric, r.value), null, true]]));
  document.body.dataset.clipped = String(clipped());
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
