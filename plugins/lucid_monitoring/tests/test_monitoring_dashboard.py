"""The dashboard in a real headless browser (Debian's ``chromium``) against a live gateway,
with admin authentication on: the page takes a viewer token from its URL fragment. Its
figures are rounded for reading, its charts carry time labels, and its tables clip
nothing, even in a narrow window with long names."""

from __future__ import annotations

import asyncio
import re
from html import unescape

from aiohttp import web
from lucid_monitoring.testing import chromium

from lucid.admin import mint_admin_token
from lucid.model import Event

SECRET = "s" * 48
LONG = "a-route-whose-name-is-much-longer-than-any-column-of-the-routes-table-is-wide"
TIME = r"\d{2}:\d{2}:\d{2}"


def table_rows(dom: str, element: str) -> list[dict[str, str]]:
    """The rows of the table the page drew in ``<div id=element>``, by heading."""
    html = dom.split(f'id="{element}"', 1)[1].split("</table>", 1)[0]
    rows = [[unescape(re.sub(r"<[^>]+>", "", c)) for c in
             re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", html, re.S)]
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


async def test_dashboard_draws_live_charts_in_a_real_browser(
        lucid_upstream, lucid_gateway, tmp_path):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=500 if request.path == "/fail" else 200, text="ok")

    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(f"""
[server]
admin_secret = "{SECRET}"

[[gateway.routes]]
id = "api"
prefix = "/"
service = "svc"

[[gateway.routes]]
id = "{LONG}"
prefix = "/long"
service = "svc"

[gateway.services.svc]
instances = ["{upstream.url}"]

[monitoring]
evaluation_interval = "20ms"

[[monitoring.alerts]]
name = "Errors"
metric = "error_rate"
threshold = 0.01
severity = "critical"
""")
    rt = gw.runtime
    instance = rt.instances("svc")[0].id
    rt.emit(Event("limit_rejected", {"limit": "per-ip", "key": "203.0.113.9"}))
    rt.emit(Event("breaker_transition", {"service": "svc", "instance": instance,
                                         "from": "closed", "to": "half_open"}))
    stop = asyncio.Event()

    async def traffic() -> None:  # keeps flowing while the browser polls
        while not stop.is_set():
            for path in ("/a", "/b", "/c", "/fail", "/long/x"):
                async with gw.session.get(gw.proxy_url + path) as r:
                    await r.read()
            await asyncio.sleep(0.02)

    load = asyncio.create_task(traffic())
    viewer = mint_admin_token(SECRET, "viewer", 600, "dashboard-test")
    try:
        page = gw.admin_url + "/monitoring/ui?interval=300"
        no_token = await chromium(tmp_path, "--virtual-time-budget=1500", "--dump-dom", page)
        url = f"{page}#token={viewer}"
        dom = await chromium(tmp_path, "--virtual-time-budget=3000", "--window-size=600,900",
                             "--dump-dom", url)
        shot = tmp_path / "dashboard.png"
        await chromium(tmp_path, "--virtual-time-budget=3000", "--window-size=1366,900",
                       f"--screenshot={shot}", url)
    finally:
        stop.set()
        await load
    # Without a token the page loads, polls once, is refused and asks for one.
    assert 'id="status">needs an admin token<' in no_token
    assert '<form id="login">' in no_token  # no longer hidden
    assert 'data-points="0"' in no_token and "data-polls" not in no_token
    points = {m.group(1): int(m.group(2)) for m in re.finditer(
        r'<canvas id="chart-(\w+)" data-points="(\d+)"', dom)}
    assert set(points) == {"rps", "errors", "latency"}
    assert points["rps"] >= 2 and points["errors"] >= 2
    assert points["latency"] >= 6  # three percentiles, at least two polls each
    polls = int(re.search(r'<body[^>]* data-polls="(\d+)"', dom).group(1))
    assert polls >= 2
    assert ">live<" in dom
    assert '<form id="login" hidden="">' in dom
    assert re.search(r'id="rps-now">\d+\.\d req/s<', dom)
    assert re.search(r'id="errors-now">\d+(\.\d{1,2})?%<', dom)
    # figures rounded for reading: req/s to one decimal, error rates as %, ms
    routes = {row["route"]: row for row in table_rows(dom, "routes")}
    assert set(routes) == {"api", LONG}
    for row in routes.values():
        assert re.fullmatch(r"\d+\.\d", row["req/s"]), row
        assert re.fullmatch(r"(0|\d+\.\d{1,2}|100)%", row["errors"]), row
        for column in ("p50 ms", "p99 ms"):
            assert re.fullmatch(r"\d+\.\d{1,2}|\d{2,}\.\d|\d{3,}", row[column]), row
    assert routes["api"]["errors"] != "0%"  # a quarter of its requests fail
    (instance,) = table_rows(dom, "services")
    assert re.fullmatch(r"\d+\.\d", instance["req/s"]) and instance["errors"].endswith("%")
    (alert,) = table_rows(dom, "alerts")
    assert re.fullmatch(r"\d+(\.\d{1,2})?%", alert["value"]), alert  # an error rate
    # each chart labels its time axis (local HH:MM:SS), each second once, in order (the
    # browser polls for about a second here: one label or a few)
    labels = dict(re.findall(r'<canvas id="chart-(\w+)"[^>]*data-time-labels="([^"]*)"', dom))
    assert set(labels) == {"rps", "errors", "latency"}
    for chart, text in labels.items():
        assert re.fullmatch(rf"{TIME}( {TIME})*", text), (chart, text)
        shown = text.split()
        assert len(set(shown)) == len(shown), (chart, text)
        assert shown == sorted(shown) or "00:00:0" in text, (chart, text)  # midnight
    # a 600 px window and a long route name: the tables wrap or scroll, nothing is cut
    assert 'data-clipped="0"' in dom
    assert "203.0.113.9" in dom  # top rate-limited keys
    assert 'class="half_open">half_open<' in dom  # breaker state per instance
    assert '<td class="firing">firing</td>' in dom and ">Errors<" in dom  # active alert
    assert shot.exists() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_dashboard_page_is_self_contained(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(f"""
[[gateway.routes]]
id = "api"
prefix = "/"
service = "svc"

[gateway.services.svc]
instances = ["{upstream.url}"]
""")
    async with gw.session.get(gw.admin_url + "/monitoring/ui") as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/html")
        page = await r.text()
    assert "<canvas" in page
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from the network
    async with gw.session.get(gw.admin_url + "/monitoring/dashboard") as r:
        body = await r.json()
    assert set(body) >= {"now", "series", "services", "alerts", "rate_limited", "routes"}
