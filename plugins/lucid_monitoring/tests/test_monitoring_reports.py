"""Reports from per-minute rollups persisted in SQLite."""

from __future__ import annotations

import csv
import io
import json
import signal
import time

import aiohttp

from lucid.testing import wait_until


def config(upstream_url: str, extra: str = "") -> str:
    return f"""
[[gateway.routes]]
id = "api"
prefix = "/api"
service = "svc"

[[gateway.routes]]
id = "admin"
prefix = "/internal"
service = "svc"

[gateway.services.svc]
instances = ["{upstream_url}"]

[monitoring]
rollup_interval = "1h"
{extra}
"""


async def test_reports_by_hour_in_json_and_csv_survive_a_restart(
        lucid_upstream, lucid_process, tmp_path):
    upstream = await lucid_upstream()
    data_dir = str(tmp_path / "data")
    text = config(upstream.url)
    gw = lucid_process(text, data_dir=data_dir)
    async with aiohttp.ClientSession() as session:
        for path in ["/api/a"] * 4 + ["/internal/b"] * 2:
            async with session.get(gw.proxy_url + path) as r:
                assert r.status == 200
    gw.signal(signal.SIGTERM)  # a clean stop writes the minute in progress
    assert gw.wait() == 0
    again = lucid_process(text, data_dir=data_dir)
    async with aiohttp.ClientSession() as session:
        async with session.get(again.proxy_url + "/api/c") as r:
            assert r.status == 200
        async with session.get(again.admin_url + "/monitoring/reports?period=hour") as r:
            assert r.status == 200, await r.text()
            hours = (await r.json())["report"]
        assert hours and all(h["end"] - h["start"] == 3600 for h in hours)
        assert sum(h["services"]["svc"]["requests"] for h in hours if h["services"]) == 7
        # one day holds the whole test (unless it runs across midnight UTC)
        async with session.get(again.admin_url + "/monitoring/reports?period=day") as r:
            body = await r.json()
        assert body["period"] == "day"
        (hour,) = [p for p in body["report"] if p["services"]]
        svc = hour["services"]["svc"]
        assert svc["requests"] == 7 and svc["error_rate"] == 0
        assert svc["routes"]["api"]["requests"] == 5
        assert svc["routes"]["admin"]["requests"] == 2
        assert svc["p50_ms"] is not None and svc["p50_ms"] <= svc["p99_ms"]
        assert svc["top_clients"] == [{"client": "127.0.0.1", "requests": 7}]
        assert hour["availability"] == 1.0
        assert hour["end"] - hour["start"] == 86400
        async with session.get(again.admin_url + "/monitoring/reports?period=day&format=csv"
                               ) as r:
            assert r.headers["content-type"].startswith("text/csv")
            rows = list(csv.DictReader(io.StringIO(await r.text())))
        by_route = {row["route"]: row for row in rows}
        assert by_route["*"]["requests"] == "7" and by_route["api"]["requests"] == "5"
        assert by_route["*"]["top_clients"] == "127.0.0.1=7"
        now = time.time()
        async with session.get(again.admin_url + "/monitoring/reports",
                               params={"from": str(now + 3600), "to": str(now + 7200)}) as r:
            assert (await r.json())["report"] == []
        for bad in ("?period=week", "?format=xml", "?from=soon",
                    f"?from={now}&to={now - 10}"):
            async with session.get(again.admin_url + "/monitoring/reports" + bad) as r:
                assert r.status == 422, bad


async def test_availability_counts_minutes_with_firing_alerts_and_old_rollups_are_pruned(
        lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url, """
retention = "2h"
evaluation_interval = "20ms"

[[monitoring.alerts]]
name = "AnyTraffic"
metric = "request_rate"
threshold = 0
"""))
    plugin = gw.runtime.plugin_set.pm.get_plugin("monitoring")
    store = plugin.store
    hour = time.time() // 3600 * 3600
    old = hour - 5 * 3600
    empty = json.dumps([0] * plugin.recorder.nb)
    await store.add_rollups([(old, "", "*", 0, 0, 0.0, empty, "{}", 0)], old - 1)
    async with gw.session.get(gw.proxy_url + "/api/x") as r:
        assert r.status == 200
    await wait_until(lambda: plugin.engine.alerts["AnyTraffic"].state == "firing",
                     message="the alert to fire")
    # Two more minutes of this hour: one quiet, one with the alert firing (above).
    await store.add_rollups([(hour, "", "*", 0, 0, 0.0, empty, "{}", 0)], old - 1)
    async with gw.session.get(gw.admin_url + "/monitoring/reports",
                              params={"from": str(hour)}) as r:
        (current,) = (await r.json())["report"]
    assert current["minutes"] == 2 and current["availability"] == 0.5
    assert await store.rollups(old, old + 1) == []  # older than retention: pruned
