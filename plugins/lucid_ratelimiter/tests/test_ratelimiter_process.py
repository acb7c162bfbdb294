"""Quotas and dynamic limits (a concurrency limit among them) survive ``kill -9``;
several workers are refused."""

from __future__ import annotations

import json
import urllib.request

import aiohttp

from lucid.testing import wait_until

CONFIG = '''
[gateway.services.svc]
instances = ["{url}"]

[[gateway.routes]]
id = "main"
prefix = "/"
service = "svc"

[ratelimiter]
flush_interval = "200ms"

[[ratelimiter.limits]]
id = "daily"
rate = "10/day"
algorithm = "fixed_window"
'''


async def statuses(session, url, n, headers=None):
    out = []
    for _ in range(n):
        async with session.get(url + "/x", headers=headers or {}) as r:
            await r.read()
            out.append(r.status)
    return out


async def test_quota_counters_survive_kill_9(lucid_upstream, lucid_process, tmp_path):
    upstream = await lucid_upstream()
    text = CONFIG.format(url=upstream.url)
    first = lucid_process(text)
    async with aiohttp.ClientSession() as session:
        async with session.post(first.admin_url + "/ratelimiter/limits", json={
            "id": "hourly", "rate": "8/hour", "key": "api_key"}) as r:
            assert r.status == 201
        async with session.post(first.admin_url + "/ratelimiter/limits", json={
            "id": "in-flight", "algorithm": "concurrency", "max_in_flight": 2,
            "key": "api_key"}) as r:
            assert r.status == 201
        assert await statuses(session, first.proxy_url, 4, {"X-API-Key": "k"}) == [200] * 4

        async def flushed():
            async with session.get(first.admin_url + "/ratelimiter/status") as r:
                quota = (await r.json())["quota"]
            return quota["pending"] == 0 and quota["flushed_rows"] >= 2

        await wait_until(flushed, message="the quota counters to be flushed")
        first.proc.kill()
        assert first.wait() == -9

        second = lucid_process(text, data_dir=str(tmp_path / "process0" / "data"))
        async with session.get(second.admin_url + "/ratelimiter/limits") as r:
            limits = {x["id"]: x for x in (await r.json())["limits"]}
        assert list(limits) == ["daily", "hourly", "in-flight"]
        assert (limits["in-flight"]["algorithm"], limits["in-flight"]["max_in_flight"]) == (
            "concurrency", 2)
        async with session.get(second.admin_url + "/ratelimiter/usage?key=h:k") as r:
            usage = {u["limit"]: u["used"] for u in (await r.json())["usage"]}
        assert usage["hourly"] == 4
        # 4 of 8 used per hour: 4 more; 4 of 10 used per day (daily is keyed by IP)
        assert await statuses(session, second.proxy_url, 5, {"X-API-Key": "k"}) == [
            200, 200, 200, 200, 429]
        assert await statuses(session, second.proxy_url, 3) == [200, 200, 429]


def test_several_workers_are_refused_while_limits_are_in_memory(lucid_process):
    process = lucid_process(CONFIG.format(url="http://127.0.0.1:9"), wait=False, workers=2)
    assert process.wait() != 0
    assert "would admit 2x every limit" in process.output


def test_api_created_limits_also_refuse_several_workers(lucid_upstream, lucid_process, tmp_path):
    text = CONFIG.replace('[[ratelimiter.limits]]\nid = "daily"\nrate = "10/day"\n'
                          'algorithm = "fixed_window"\n', "").format(url="http://127.0.0.1:9")
    first = lucid_process(text)
    request = urllib.request.Request(
        first.admin_url + "/ratelimiter/limits", method="POST",
        data=json.dumps({"id": "api", "rate": "5/s"}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        assert r.status == 201
    first.stop()
    second = lucid_process(text, wait=False, workers=2,
                           data_dir=str(tmp_path / "process0" / "data"))
    assert second.wait() != 0
    assert "would admit 2x every limit" in second.output


async def test_the_api_refuses_limits_on_a_multi_worker_gateway(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(CONFIG.split("[ratelimiter]")[0].format(url=upstream.url),
                             workers=2)
    async with gw.session.post(gw.admin_url + "/ratelimiter/limits",
                               json={"id": "a", "rate": "1/s"}) as r:
        assert r.status == 409
        assert "multiplying the limit" in (await r.json())["error"]


def test_limits_an_older_lucid_stored_also_refuse_several_workers(lucid_process, tmp_path):
    """Before the first start imports them, limits in an older ratelimiter.db count."""
    import sqlite3

    data_dir = tmp_path / "old-data"
    data_dir.mkdir()
    with sqlite3.connect(data_dir / "ratelimiter.db") as conn:
        conn.execute("CREATE TABLE limits (id TEXT PRIMARY KEY, body TEXT NOT NULL, "
                     "updated_at REAL NOT NULL)")
        conn.execute("INSERT INTO limits VALUES ('api', ?, 0)",
                     (json.dumps({"id": "api", "rate": "5/s"}),))
    text = CONFIG.split("[ratelimiter]")[0].format(url="http://127.0.0.1:9")
    process = lucid_process(text, wait=False, workers=2, data_dir=str(data_dir))
    assert process.wait() != 0
    assert "would admit 2x every limit" in process.output


def test_lease_sync_on_another_algorithm_is_a_config_error(lucid_process):
    """``sync = "lease"`` takes slices of a token bucket or fixed window only: on a
    sliding log it is refused at startup, naming the file, the key and what fits."""
    text = CONFIG.format(url="http://127.0.0.1:9").replace(
        'algorithm = "fixed_window"', 'algorithm = "sliding_log"\nsync = "lease"').replace(
        'rate = "10/day"', 'rate = "10/m"')
    process = lucid_process(text, wait=False)
    assert process.wait() == 2
    assert "ratelimiter.limits[0].sync" in process.output
    assert "'token_bucket' or 'fixed_window' only, not 'sliding_log'" in process.output
    assert ".toml" in process.output
