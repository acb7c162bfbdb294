"""Access log: JSON lines to a rotating file, and the ring buffer behind /monitoring/logs."""

from __future__ import annotations

import json
import time

from aiohttp import web

from lucid.testing import wait_until


def config(upstream_url: str, monitoring: str) -> str:
    return f"""
[[gateway.routes]]
id = "api"
prefix = "/api"
service = "svc"

[[gateway.routes]]
id = "quiet"
prefix = "/quiet"
service = "svc"
plugins = {{ monitoring = {{ access_log = false }} }}

[gateway.services.svc]
instances = ["{upstream_url}"]

[monitoring]
{monitoring}
"""


async def handler(request: web.Request) -> web.Response:
    return web.Response(status=int(request.query.get("status", "200")), text="hello")


async def test_json_lines_go_to_a_rotating_file(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url, """
[monitoring.access_log]
enabled = true
target = "file"
path = "logs/access.log"
max_bytes = "2KiB"
backups = 3
"""))
    for i in range(12):
        async with gw.session.get(gw.proxy_url + f"/api/{i}", headers={
                "x-request-id": f"req-{i:04d}"}) as r:
            assert r.status == 200
    async with gw.session.get(gw.proxy_url + "/quiet/x") as r:
        assert r.status == 200
    path = gw.runtime.data_dir / "logs" / "access.log"

    def lines() -> list[dict]:
        found = []
        for candidate in sorted(path.parent.glob("access.log*"), reverse=True):
            found += [json.loads(line) for line in candidate.read_text().splitlines()]
        return found

    await wait_until(lambda: len(lines()) == 12, message="12 access-log lines")
    assert (path.parent / "access.log.1").exists()  # 12 lines of ~400 bytes rotated at 2 KiB
    records = sorted(lines(), key=lambda r: r["request_id"])
    first = records[0]
    assert first["request_id"] == "req-0000"
    assert first["route"] == "api" and first["service"] == "svc"
    assert first["method"] == "GET" and first["path"] == "/api/0" and first["status"] == 200
    assert first["instance"].startswith("http://127.0.0.1:")
    assert first["bytes_out"] == 5 and first["client_ip"] == "127.0.0.1"
    assert first["duration_ms"] >= first["upstream_ms"] > 0
    assert set(first) >= {"time", "subject", "attempts", "error", "bytes_in"}
    assert all(r["route"] != "quiet" for r in records)


async def test_logs_endpoint_filters_the_ring_buffer(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url, "log_buffer = 5"))
    before = time.time()
    for status in (200, 404, 500, 503, 200, 201):
        async with gw.session.get(gw.proxy_url + f"/api/s?status={status}",
                                  headers={"x-request-id": f"id-{status}"}) as r:
            assert r.status == status
    async with gw.session.get(gw.proxy_url + "/nowhere") as r:
        assert r.status == 404

    async def get(query: str) -> list[dict]:
        async with gw.session.get(gw.admin_url + "/monitoring/logs" + query) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["logs"]

    everything = await get("")
    assert len(everything) == 5  # bounded: the oldest two fell out
    assert [e["status"] for e in everything] == [404, 201, 200, 503, 500]
    assert everything[0]["route"] == "" and everything[0]["path"] == "/nowhere"
    assert [e["status"] for e in await get("?status=5xx")] == [503, 500]
    assert [e["request_id"] for e in await get("?status=503")] == ["id-503"]
    assert [e["status"] for e in await get("?route=api&limit=2")] == [201, 200]
    assert [e["status"] for e in await get("?request_id=id-500")] == [500]
    assert len(await get(f"?since={before}")) == 5
    assert await get(f"?until={before}") == []
    assert len(await get("?since=2020-01-01T00:00:00Z")) == 5
    for bad in ("?status=99", "?since=yesterday", "?limit=0", "?colour=red"):
        async with gw.session.get(gw.admin_url + "/monitoring/logs" + bad) as r:
            assert r.status == 422, bad


async def test_access_log_to_stdout(lucid_upstream, lucid_gateway, capsys):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url, "access_log = { enabled = true }"))
    async with gw.session.get(gw.proxy_url + "/api/out", headers={"x-request-id": "out-1"}):
        pass
    captured: list[str] = []

    def seen() -> bool:
        captured.extend(capsys.readouterr().out.splitlines())
        return any('"request_id":"out-1"' in line for line in captured)

    await wait_until(seen, message="the access-log line on stdout")
    line = next(json.loads(x) for x in captured if '"out-1"' in x)
    assert line["path"] == "/api/out" and line["status"] == 200
