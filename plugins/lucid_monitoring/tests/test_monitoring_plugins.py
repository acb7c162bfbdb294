"""With the real registry and rate limiter: their events reach the metrics, the
services view and the dashboard."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from lucid.testing import wait_until


async def test_registry_and_rate_limiter_events_are_monitored(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(f"""
[[gateway.routes]]
id = "api"
prefix = "/"
service = "users"

[registry.services.users]
instances = [{{ id = "u1", url = "{upstream.url}" }}]

[[ratelimiter.limits]]
id = "per-ip"
rate = "1/m"
key = "ip"
""")
    statuses = []
    for _ in range(3):
        async with gw.session.get(gw.proxy_url + "/x") as r:
            statuses.append(r.status)
    assert statuses == [200, 429, 429]

    async def scrape() -> dict:
        async with gw.session.get(gw.admin_url + "/metrics") as r:
            text = await r.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    async def rejected() -> bool:
        return (await scrape()).get(("lucid_ratelimit_rejections_total",
                                     (("limit", "per-ip"),))) == 2

    await wait_until(rejected, message="two rejections counted")
    got = await scrape()
    assert got[("lucid_requests_total", (("code", "4xx"), ("method", "GET"), ("route", "api"),
                                         ("service", "users")))] == 2
    async with gw.session.get(gw.admin_url + "/monitoring/services") as r:
        services = {s["service"]: s for s in (await r.json())["services"]}
    plugin = gw.runtime.plugin_set.pm.get_plugin("monitoring")
    assert services, (plugin.recorder.health, plugin.recorder.breakers)
    (instance,) = services["users"]["instances"]
    assert instance["instance"] == "u1" and instance["health"] == "passing"
    async with gw.session.get(gw.admin_url + "/monitoring/dashboard") as r:
        board = await r.json()
    assert board["rejections"] == {"per-ip": 2}
    assert board["rate_limited"][0]["rejections"] == 2
    assert "127.0.0.1" in board["rate_limited"][0]["key"]
