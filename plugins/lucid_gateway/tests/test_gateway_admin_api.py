"""Admin API security (tokens, roles, audit, loopback rule) and the gateway endpoints:
runtime routes, effective config, services, metrics, config export."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
from joserfc import jwt as jose_jwt
from joserfc.jwk import OctKey

from lucid.testing import wait_until

ADMIN_SECRET = "a" * 48


def admin_token(role: str, secret: str = ADMIN_SECRET, ttl: int = 3600, sub: str = "ops-1"
                ) -> str:
    now = int(time.time())
    return jose_jwt.encode({"alg": "HS256"}, {"iss": "lucid-admin", "sub": sub, "role": role,
                                              "iat": now, "exp": now + ttl},
                           OctKey.import_key(secret))


def base_config(upstream: str = "http://127.0.0.1:9", secret: bool = True) -> str:
    server = f'[server]\nadmin_secret = "{ADMIN_SECRET}"\n' if secret else ""
    return f"""{server}
[gateway.services.svc]
instances = ["{upstream}"]

[gateway.auth.issuers.main]
algorithms = ["HS256"]
secret = "{'k' * 40}"

[[gateway.routes]]
id = "static"
prefix = "/static"
service = "svc"
"""


async def req(gw: Any, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kw.pop("headers", {}))
    async with gw.session.request(method, gw.admin_url + path, headers=headers, **kw) as r:
        return r.status, r.headers, await r.json(content_type=None)


async def test_reads_need_viewer_and_writes_need_admin(lucid_gateway: Any) -> None:
    gw = await lucid_gateway(base_config())
    viewer, admin = admin_token("viewer"), admin_token("admin")
    status, headers, body = await req(gw, "GET", "/gateway/status")
    assert status == 401 and headers["WWW-Authenticate"].startswith('Bearer realm="lucid-admin"')
    assert (await req(gw, "GET", "/gateway/status", viewer))[0] == 200
    assert (await req(gw, "GET", "/gateway/status", admin))[0] == 200
    status, _, body = await req(gw, "POST", "/gateway/config/reload", viewer)
    assert status == 403 and "admin role" in body["error"]
    assert (await req(gw, "POST", "/gateway/config/reload", admin))[0] == 200
    expired = admin_token("admin", ttl=-60)
    assert (await req(gw, "GET", "/gateway/status", expired))[0] == 401
    forged = admin_token("admin", secret="b" * 48)
    assert (await req(gw, "POST", "/gateway/config/reload", forged))[0] == 401
    # probes and the schema stay open
    assert (await req(gw, "GET", "/gateway/health"))[0] == 200
    assert (await req(gw, "GET", "/openapi.json"))[0] == 200


async def test_security_headers_on_admin_responses(lucid_gateway: Any) -> None:
    gw = await lucid_gateway(base_config())
    for path in ("/gateway/health", "/gateway/status", "/nowhere"):
        _, headers, body = await req(gw, "GET", path)
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert "Traceback" not in str(body)


async def test_lucid_token_mints_usable_tokens(lucid_gateway: Any) -> None:
    gw = await lucid_gateway(base_config())
    result = subprocess.run(
        [sys.executable, "-m", "lucid", "token", "--config", str(gw.config_path),
         "--role", "admin", "--ttl", "1h", "--subject", "cli-user"],
        capture_output=True, text=True, timeout=60, check=True)
    token = result.stdout.strip()
    assert (await req(gw, "POST", "/gateway/config/reload", token))[0] == 200
    status, _, body = await req(gw, "GET", "/gateway/audit?subject=cli-user", token)
    assert status == 200 and body["entries"][0]["path"] == "/gateway/config/reload"


def test_non_loopback_admin_without_auth_refuses_to_start(lucid_process: Any) -> None:
    process = lucid_process(base_config(secret=False), wait=False, admin="0.0.0.0:0")
    assert process.wait() == 2
    assert "server.admin = '0.0.0.0:0'" in process.output
    assert "admin_secret" in process.output
    check = subprocess.run([sys.executable, "-m", "lucid", "check", "--config",
                            str(process.config_path)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 2 and "server.admin = '0.0.0.0:0'" in check.stderr


async def test_every_admin_write_is_audited_reads_are_not(lucid_gateway: Any) -> None:
    gw = await lucid_gateway(base_config())
    admin, viewer = admin_token("admin"), admin_token("viewer", sub="watcher")
    await req(gw, "GET", "/gateway/status", admin)
    await req(gw, "POST", "/gateway/config/reload", admin)
    await req(gw, "POST", "/gateway/route", viewer, json={"id": "x"})  # refused: 403
    await req(gw, "POST", "/gateway/route", admin, json={
        "id": "r1", "prefix": "/r1", "service": "svc",
        "auth": {"issuers": ["main"]}})
    await req(gw, "POST", "/gateway/route", admin, json={"id": "r2", "prefix": "nope",
                                                         "service": "svc"})
    status, _, body = await req(gw, "GET", "/gateway/audit", viewer)
    assert status == 200
    rows = [(e["subject"], e["method"], e["path"], e["status"]) for e in body["entries"]]
    assert rows == [
        ("ops-1", "POST", "/gateway/route", 422),
        ("ops-1", "POST", "/gateway/route", 201),
        ("watcher", "POST", "/gateway/route", 403),
        ("ops-1", "POST", "/gateway/config/reload", 200),
    ]
    assert '"id":"r1"' in body["entries"][1]["summary"]
    status, _, body = await req(gw, "GET", "/gateway/audit?subject=watcher", viewer)
    assert [e["status"] for e in body["entries"]] == [403]
    status, _, body = await req(gw, "GET", "/gateway/audit?status=201&limit=5", viewer)
    assert [e["status"] for e in body["entries"]] == [201]
    # any plugin's endpoint, and a refused anonymous attempt, are audited too
    await req(gw, "POST", "/ratelimiter/anything", admin, json={"password": "hunter2"})
    await req(gw, "DELETE", "/gateway/route/r1")
    status, _, body = await req(gw, "GET", "/gateway/audit?path=/ratelimiter", viewer)
    assert [(e["subject"], e["method"]) for e in body["entries"]] == [("ops-1", "POST")]
    assert "hunter2" not in body["entries"][0]["summary"]
    status, _, body = await req(gw, "GET", "/gateway/audit?subject=anonymous", viewer)
    assert [(e["method"], e["status"]) for e in body["entries"]] == [("DELETE", 401)]
    status, _, body = await req(gw, "GET", "/gateway/audit?limit=0&bogus=1", viewer)
    assert status == 422 and {f["field"] for f in body["fields"]} == {"limit", "bogus"}


async def test_runtime_routes_are_validated_applied_and_deleted(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(base_config(upstream.url, secret=False))

    async def proxied(path: str) -> int:
        async with gw.session.get(gw.proxy_url + path) as r:
            return r.status

    assert await proxied("/dyn/a") == 404
    before = gw.runtime.generation.number
    status, _, body = await req(gw, "POST", "/gateway/route", json={
        "id": "dyn", "prefix": "/dyn", "service": "svc", "strip_prefix": True})
    assert status == 201 and body["created"] is True
    assert gw.runtime.generation.number == before + 1
    assert await proxied("/dyn/a") == 200
    assert upstream.requests[-1].path == "/a"
    # replace it: now it requires a token
    status, _, body = await req(gw, "POST", "/gateway/route", json={
        "id": "dyn", "prefix": "/dyn", "service": "svc", "auth": {}})
    assert status == 200 and body["created"] is False
    assert await proxied("/dyn/a") == 401
    # rejected payloads change nothing
    generation = gw.runtime.generation.number
    status, _, body = await req(gw, "POST", "/gateway/route", json={
        "id": "dyn", "prefix": "/dyn", "service": "svc", "timeouts": {"read": -1}})
    assert status == 422 and body["fields"][0]["field"] == "timeouts.read"
    status, _, body = await req(gw, "POST", "/gateway/route", json={
        "id": "dyn", "prefix": "/dyn", "service": "svc", "plugins": {"nosuch": {}}})
    assert status == 422 and "per-route settings named 'nosuch'" in body["problems"][0]
    status, _, body = await req(gw, "POST", "/gateway/route", json={
        "id": "dyn", "prefix": "/dyn", "service": "svc", "auth": {"issuers": ["nope"]}})
    assert status == 422 and "no such issuer" in body["problems"][0]
    status, _, body = await req(gw, "POST", "/gateway/route", json={
        "id": "static", "prefix": "/x", "service": "svc"})
    assert status == 409 and "config file" in body["error"]
    assert gw.runtime.generation.number == generation
    assert await proxied("/dyn/a") == 401
    status, _, body = await req(gw, "GET", "/gateway/route")
    assert [r["id"] for r in body["routes"]] == ["dyn"]
    status, _, body = await req(gw, "GET", "/gateway/routes")
    assert [r["id"] for r in body["routes"]] == ["static", "dyn"]
    assert (await req(gw, "DELETE", "/gateway/route/static"))[0] == 409
    assert (await req(gw, "DELETE", "/gateway/route/dyn"))[0] == 200
    assert (await req(gw, "DELETE", "/gateway/route/dyn"))[0] == 404
    assert await proxied("/dyn/a") == 404


def test_runtime_routes_survive_kill_9_and_are_exported(
        lucid_process: Any, tmp_path: Path) -> None:
    import asyncio

    data_dir = tmp_path / "shared-data"
    config = base_config(secret=False)
    first = lucid_process(config, data_dir=str(data_dir))

    async def add() -> None:
        async with aiohttp.ClientSession() as s, s.post(
                first.admin_url + "/gateway/route",
                json={"id": "kept", "path": "/kept", "service": "svc"}) as r:
            assert r.status == 201

    asyncio.run(add())
    first.signal(signal.SIGKILL)
    first.wait()
    second = lucid_process(config, data_dir=str(data_dir))

    async def listed() -> list[str]:
        async with aiohttp.ClientSession() as s, s.get(second.admin_url + "/gateway/route") as r:
            return [x["id"] for x in (await r.json())["routes"]]

    assert asyncio.run(listed()) == ["kept"]
    second.stop()
    config_path = next((tmp_path / "process1").glob("cluster.toml"))
    result = subprocess.run(
        [sys.executable, "-m", "lucid", "config", "export", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, check=True)
    exported = tomllib.loads(result.stdout)
    assert [r["id"] for r in exported["gateway"]["routes"]] == ["static", "kept"]
    assert exported["gateway"]["auth"]["issuers"]["main"]["secret"] == "***"


async def test_config_services_and_metrics(lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(base_config(upstream.url))
    viewer = admin_token("viewer")
    for _ in range(3):
        async with gw.session.get(gw.proxy_url + "/static/x") as r:
            assert r.status == 200
    status, _, body = await req(gw, "GET", "/gateway/config", viewer)
    assert status == 200
    assert body["config"]["server"]["admin_secret"] == "***"
    assert body["config"]["gateway"]["auth"]["issuers"]["main"]["secret"] == "***"
    assert ADMIN_SECRET not in str(body) and "k" * 40 not in str(body)
    status, _, body = await req(gw, "GET", "/gateway/services", viewer)
    assert body["services"] == [{
        "name": "svc", "routes": ["static"], "instance_count": 1, "healthy": 1, "status": "up",
        "instances": [{"id": upstream.url, "url": upstream.url, "zone": "", "weight": 1,
                       "status": "passing"}]}]

    async def counted() -> Any:
        return (await req(gw, "GET", "/gateway/metrics", viewer))[2]["requests"] >= 3

    await wait_until(counted, message="the requests to be counted")
    status, _, body = await req(gw, "GET", "/gateway/metrics", viewer)
    assert body["error_rate"] == 0.0 and body["latency_ms"]["p50"] is not None
    assert body["requests_per_second"] > 0


async def test_header_count_and_size_limits(lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(base_config(upstream.url, secret=False)
                             + "\n[gateway.limits]\nmax_header_count = 20\n"
                               'max_header_size = "1KiB"\n')
    async with gw.session.get(gw.proxy_url + "/static/x") as r:
        assert r.status == 200
    many = {f"x-h{i}": "1" for i in range(30)}
    async with gw.session.get(gw.proxy_url + "/static/x", headers=many) as r:
        assert r.status == 431
    async with gw.session.get(gw.proxy_url + "/static/x", headers={"x-big": "v" * 2000}) as r:
        assert r.status == 431
        assert (await r.json())["error"] == "request header x-big is too large"


def test_every_worker_picks_up_runtime_routes(lucid_process: Any) -> None:
    import asyncio

    process = lucid_process(base_config(secret=False), workers=2)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(process.admin_url + "/gateway/route",
                              json={"id": "w", "prefix": "/static2", "service": "svc"}) as r:
                assert r.status == 201

            async def all_workers_route_it() -> bool:
                # 40 fresh connections spread over both workers; the upstream is
                # unreachable, so a routed request answers 502/503, an unrouted one 404.
                for _ in range(40):
                    async with aiohttp.ClientSession() as fresh, fresh.get(
                            process.proxy_url + "/static2/x") as r:
                        if r.status == 404:
                            return False
                return True

            await wait_until(all_workers_route_it, timeout=20,
                             message="both workers to route /static2")

    asyncio.run(scenario())


async def test_runtime_routes_an_older_lucid_kept_are_imported_once(
        lucid_upstream: Any, lucid_gateway: Any, tmp_path: Path) -> None:
    """Upgrading: routes an older Lucid stored in gateway.db move to the core's
    definitions store on the first start, and are served, listed and deletable."""
    import json
    import sqlite3

    upstream = await lucid_upstream()
    data_dir = tmp_path / "old-data"
    data_dir.mkdir()
    with sqlite3.connect(data_dir / "gateway.db") as conn:  # the older schema
        conn.execute("CREATE TABLE routes (id TEXT PRIMARY KEY, definition TEXT NOT NULL, "
                     "updated_at REAL NOT NULL)")
        conn.execute("INSERT INTO routes VALUES (?, ?, 0)", (
            "old", json.dumps({"id": "old", "prefix": "/old", "service": "svc",
                               "strip_prefix": True})))
    gw = await lucid_gateway(base_config(upstream.url, secret=False), data_dir=str(data_dir))
    async with gw.session.get(gw.proxy_url + "/old/x") as r:
        assert r.status == 200
    assert upstream.requests[-1].path == "/x"
    status, _, body = await req(gw, "GET", "/gateway/route")
    assert [(r["id"], r["revision"]) for r in body["routes"]] == [("old", 1)]
    with sqlite3.connect(data_dir / "definitions.db") as conn:
        assert conn.execute("SELECT kind, id FROM definitions").fetchall() == [("route", "old")]
    assert (await req(gw, "DELETE", "/gateway/route/old"))[0] == 200


async def test_a_route_write_can_be_made_conditional(lucid_upstream: Any,
                                                     lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(base_config(upstream.url, secret=False))
    route = {"id": "dyn", "prefix": "/dyn", "service": "svc"}
    status, _, body = await req(gw, "POST", "/gateway/route", json=route)
    assert status == 201
    revision = body["revision"]
    status, _, body = await req(gw, "POST", "/gateway/route", json=route,
                                headers={"If-Match": str(revision + 1)})
    assert status == 412 and body["revision"] == revision
    status, _, body = await req(gw, "POST", "/gateway/route", json=route,
                                headers={"If-Match": "not-a-revision"})
    assert status == 412
    status, _, body = await req(gw, "DELETE", "/gateway/route/dyn",
                                headers={"If-Match": f'"{revision}"'})
    assert status == 200
