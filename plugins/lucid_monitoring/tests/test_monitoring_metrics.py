"""Metrics end to end: traffic through a real gateway, read back as Prometheus text
and as JSON; labels stay bounded."""

from __future__ import annotations

import subprocess

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from lucid.model import Event
from lucid.testing_internal import debian_tool


def config(upstream_url: str, extra: str = "") -> str:
    return f"""
[[gateway.routes]]
id = "api"
prefix = "/api"
service = "svc"

[[gateway.routes]]
id = "boom"
path = "/boom"
service = "svc"

[gateway.services.svc]
instances = ["{upstream_url}"]
{extra}
"""


async def handler(request: web.Request) -> web.StreamResponse:
    if request.path == "/boom":
        return web.Response(status=500, text="boom")
    return web.Response(text="ok" * 10)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def traffic(gw, paths: list[str]) -> None:
    for path in paths:
        async with gw.session.get(gw.proxy_url + path) as r:
            await r.read()


async def test_prometheus_text_counts_requests_by_route_and_bounds_labels(
        lucid_upstream, lucid_gateway, tmp_path):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url))
    await traffic(gw, ["/api/a", "/api/b", "/api/c", "/boom",
                       "/nowhere/1", "/nowhere/2", "/secret-token-in-path"])
    async with gw.session.get(gw.admin_url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = await r.text()
    got = samples(text)
    key = ("lucid_requests_total", (("code", "2xx"), ("method", "GET"), ("route", "api"),
                                    ("service", "svc")))
    assert got[key] == 3
    assert got[("lucid_requests_total", (("code", "5xx"), ("method", "GET"),
                                         ("route", "boom"), ("service", "svc")))] == 1
    assert got[("lucid_requests_total", (("code", "4xx"), ("method", "GET"),
                                         ("route", "(unmatched)"), ("service", "")))] == 3
    assert "nowhere" not in text and "secret-token" not in text
    assert got[("lucid_request_duration_seconds_count",
                (("route", "api"), ("service", "svc")))] == 3
    assert got[("lucid_upstream_duration_seconds_count",
                (("route", "api"), ("service", "svc")))] == 3
    assert got[("lucid_response_bytes_total", (("route", "api"), ("service", "svc")))] == 60
    assert got[("lucid_instances", (("health", "passing"), ("service", "svc")))] == 1
    # promtool (Debian package "prometheus") is the reference linter.
    promtool = debian_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_json_metrics_give_rates_error_rates_and_percentiles(
        lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url))
    await traffic(gw, ["/api/x"] * 6 + ["/boom"] * 2)
    async with gw.session.get(gw.admin_url + "/monitoring/metrics") as r:
        assert r.status == 200
        body = await r.json()
    assert set(body["windows"]) == {"1m", "5m", "1h"}
    one = body["windows"]["1m"]
    assert one["total"]["requests"] == 8
    assert one["total"]["error_rate"] == 0.25
    assert one["total"]["status"] == {"2xx": 6, "5xx": 2}
    routes = {r["route"]: r for r in one["routes"]}
    assert routes["api"]["requests"] == 6 and routes["api"]["error_rate"] == 0
    assert routes["boom"]["error_rate"] == 1.0
    assert routes["api"]["rps"] > 0
    assert 0 < routes["api"]["p50_ms"] <= routes["api"]["p95_ms"] <= routes["api"]["p99_ms"]
    (instance,) = one["instances"]
    assert instance["service"] == "svc" and instance["requests"] == 8
    async with gw.session.get(gw.admin_url + "/monitoring/metrics?window=5m") as r:
        assert list((await r.json())["windows"]) == ["5m"]
    async with gw.session.get(gw.admin_url + "/monitoring/metrics?window=2m") as r:
        assert r.status == 422
        assert (await r.json())["fields"][0]["field"] == "window"


async def test_events_feed_breaker_limit_health_and_reload_metrics(
        lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url))
    rt = gw.runtime
    instance = rt.instances("svc")[0].id
    plugin = rt.plugin_set.pm.get_plugin("monitoring")
    rt.emit(Event("breaker_transition", {"service": "svc", "instance": instance,
                                         "from": "closed", "to": "open"}))
    rt.emit(Event("limit_rejected", {"limit": "per-ip", "key": "10.0.0.1"}))
    rt.emit(Event("instance_health_changed", {"service": "svc", "instance": instance,
                                              "status": "critical"}))
    await rt.reload()
    from lucid.testing import wait_until
    await wait_until(lambda: plugin.recorder.reloads == 1 and plugin.recorder.rejections,
                     message="events to be recorded")
    async with gw.session.get(gw.admin_url + "/metrics") as r:
        got = samples(await r.text())
    assert got[("lucid_breaker_state", (("instance", instance), ("service", "svc"),
                                        ("state", "open")))] == 1
    assert got[("lucid_breaker_transitions_total", (("from", "closed"), ("service", "svc"),
                                                    ("to", "open")))] == 1
    assert got[("lucid_ratelimit_rejections_total", (("limit", "per-ip"),))] == 1
    assert got[("lucid_instances", (("health", "critical"), ("service", "svc")))] == 1
    assert got[("lucid_config_reloads_total", ())] == 1
    assert got[("lucid_config_generation", ())] == 2
    async with gw.session.get(gw.admin_url + "/monitoring/services") as r:
        (svc,) = (await r.json())["services"]
    assert svc["service"] == "svc" and svc["healthy_share"] == 0 and svc["breakers_open"] == 1
    assert svc["instances"][0]["breaker"] == "open"


async def test_metrics_can_be_switched_off(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url, "[monitoring]\nmetrics = false\n"))
    await traffic(gw, ["/api/x"])
    plugin = gw.runtime.plugin_set.pm.get_plugin("monitoring")
    assert plugin.recorder is None
    async with gw.session.get(gw.admin_url + "/monitoring/metrics") as r:
        assert r.status == 409
    async with gw.session.get(gw.admin_url + "/metrics") as r:
        assert r.status == 200
        assert "lucid_requests_total" not in await r.text()


async def test_with_admin_auth_metrics_need_a_viewer_token_unless_public(
        lucid_upstream, lucid_gateway):
    from lucid.admin import mint_admin_token

    secret = "m" * 48
    upstream = await lucid_upstream(handler)
    text = config(upstream.url, "") + f'\n[server]\nadmin_secret = "{secret}"\n'
    gw = await lucid_gateway(text)
    await traffic(gw, ["/api/a", "/api/b"])
    viewer = {"Authorization": "Bearer " + mint_admin_token(secret, "viewer", 600, "prom")}
    forged = {"Authorization": "Bearer " + mint_admin_token("x" * 48, "viewer", 600, "prom")}
    for headers, expected in (({}, 401), (forged, 401), (viewer, 200)):
        async with gw.session.get(gw.admin_url + "/metrics", headers=headers) as r:
            assert r.status == expected, (headers, r.status)
            body = await r.text()
    assert samples(body)[("lucid_requests_total", (("code", "2xx"), ("method", "GET"),
                                                   ("route", "api"), ("service", "svc")))] == 2
    async with gw.session.get(gw.admin_url + "/metrics") as r:
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with gw.session.get(gw.admin_url + "/monitoring/dashboard") as r:
        assert r.status == 401
    # The dashboard page itself carries no data: a browser opens it without a token.
    async with gw.session.get(gw.admin_url + "/monitoring/ui") as r:
        assert r.status == 200 and "<canvas" in await r.text()
        assert "connect-src 'self'" in r.headers["content-security-policy"]

    public = await lucid_gateway(text + "\n[monitoring]\nmetrics_public = true\n")
    await traffic(public, ["/api/a"])
    async with public.session.get(public.admin_url + "/metrics") as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
        assert "lucid_requests_total" in await r.text()
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/monitoring/metrics", "/monitoring/dashboard", "/gateway/status"):
        async with public.session.get(public.admin_url + path) as r:
            assert r.status == 401, path  # only /metrics is opened
    async with public.session.post(public.admin_url + "/metrics") as r:
        assert r.status in (401, 405)
