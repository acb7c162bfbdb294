"""The dashboard in a real headless browser (Debian's ``chromium``) against a live gateway,
with admin authentication on: the page takes a viewer token from its URL fragment."""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from lucid.admin import mint_admin_token
from lucid.model import Event
from lucid.testing_internal import debian_tool

SECRET = "s" * 48

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]


async def chromium(tmp_path, *args: str) -> str:
    binary = await asyncio.to_thread(debian_tool, "chromium", "chromium")
    proc = await asyncio.create_subprocess_exec(
        binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


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
            for path in ("/a", "/b", "/c", "/fail"):
                async with gw.session.get(gw.proxy_url + path) as r:
                    await r.read()
            await asyncio.sleep(0.02)

    load = asyncio.create_task(traffic())
    viewer = mint_admin_token(SECRET, "viewer", 600, "dashboard-test")
    try:
        page = gw.admin_url + "/monitoring/ui?interval=300"
        no_token = await chromium(tmp_path, "--virtual-time-budget=1500", "--dump-dom", page)
        url = f"{page}#token={viewer}"
        dom = await chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", url)
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
    polls = int(re.search(r'<body data-polls="(\d+)"', dom).group(1))
    assert polls >= 2
    assert ">live<" in dom
    assert '<form id="login" hidden="">' in dom
    assert re.search(r'id="rps-now">[\d.]+ req/s<', dom)
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
