"""The admin API: all seven endpoints, changes applying to the next request, bad
input (422 naming the field, nothing half-applied), static pools, persistence across
kill -9 (the affinity key included)."""

from __future__ import annotations

import signal
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from aiohttp import web

from lucid.testing import PluginAdmin, json_request, wait_until
from lucid.testing_internal import two_services


def named(name: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=name)
    return handler


STATIC = """
[loadbalancer.pools.fixed]
service = "other"
algorithm = "least_request"
"""


class Admin(PluginAdmin):
    def __init__(self, gw: Any):
        super().__init__(gw, "/loadbalancer")

    async def text(self, path: str = "/x", **kw: Any) -> str:
        async with self.gw.session.get(self.gw.proxy_url + path, **kw) as r:
            assert r.status == 200
            return await r.text()


@pytest.fixture
async def setup(lucid_upstream: Any, lucid_gateway: Any) -> tuple[Admin, list[Any]]:
    ups = [await lucid_upstream(named(n)) for n in "abc"]
    gw = await lucid_gateway(two_services(ups[0].url, STATIC))
    return Admin(gw), ups


async def test_crud_applies_on_the_next_request(setup: tuple[Admin, list[Any]]) -> None:
    admin, ups = setup
    assert await admin.text() == "a"
    code, body = await admin("POST", "/pools", {
        "id": "p", "service": "svc", "algorithm": "round_robin",
        "instances": [{"url": ups[1].url}]})
    assert code == 201, body
    assert body["source"] == "api" and body["effective"]["algorithm"] == "round_robin"
    assert await admin.text() == "b"  # the very next request
    code, body = await admin("GET", "/pools/p/instances")
    assert code == 200 and [(i["url"], i["picks"]) for i in body["instances"]] == [
        (ups[1].url, 1)]
    code, body = await admin("PUT", "/pools/p", {
        "service": "svc", "algorithm": "weighted_round_robin",
        "instances": [{"url": ups[1].url, "weight": 1}, {"url": ups[2].url, "weight": 3}]})
    assert code == 200, body
    assert sorted([await admin.text() for _ in range(8)]) == ["b"] * 2 + ["c"] * 6
    code, listing = await admin("GET", "/pools")
    assert {(p["id"], p["source"]) for p in listing["pools"]} == {("fixed", "static"),
                                                                  ("p", "api")}
    code, status = await admin("GET", "/status")
    pool = next(p for p in status["pools"] if p["id"] == "p")
    assert pool["algorithm"] == "weighted_round_robin" and pool["panic"] is False
    assert {i["url"]: i["picks"] for i in pool["instances"]} == {ups[1].url: 3,
                                                                 ups[2].url: 6}
    assert all(i["in_flight"] == 0 for i in pool["instances"]) and pool["ejected"] == []
    code, health = await admin("GET", "/health")
    assert code == 200 and health["status"] == "ok" and health["pools"] == 2
    code, body = await admin("DELETE", "/pools/p")
    assert code == 200 and body == {"deleted": "p"}
    assert await admin.text() == "a"  # back to the service's own instance
    assert (await admin("DELETE", "/pools/p"))[0] == 404
    assert (await admin("GET", "/pools/p/instances"))[0] == 404


async def test_a_pool_over_the_services_own_instances(setup: tuple[Admin, list[Any]]) -> None:
    admin, ups = setup
    code, body = await admin("POST", "/pools", {
        "id": "hashing", "service": "svc", "algorithm": "maglev",
        "hash_key": "header:x-user", "bounded_load": 1.25})
    assert code == 201, body
    assert {await admin.text(headers={"x-user": "alice"}) for _ in range(5)} == {"a"}
    code, body = await admin("GET", "/pools/hashing/instances")
    assert body["instances"][0]["picks"] == 5


BAD_INPUT = [
    ({"id": "x", "service": "svc", "algorithm": "fastest"}, "algorithm"),
    ({"id": "x", "service": "svc", "instances": [{"url": "http://127.0.0.1:1", "weight": 0}]},
     "instances[0].weight"),
    ({"id": "x", "service": "svc", "instances": []}, "instances"),
    ({"id": "x", "service": "nope"}, "service"),
    ({"id": "x", "service": "svc", "algorithm": "ring_hash", "hash_key": "header:"},
     "hash_key"),
    ({"id": "x", "service": "svc", "algorithm": "maglev", "table_size": 1000}, "table_size"),
    ({"id": "bad id!", "service": "svc"}, "id"),
    ({"service": "svc"}, "id"),
]


async def test_bad_input_is_422_naming_the_field(setup: tuple[Admin, list[Any]]) -> None:
    admin, _ = setup
    for payload, field in BAD_INPUT:
        code, body = await admin("POST", "/pools", payload)
        assert code == 422, (payload, body)
        assert field in [f["field"] for f in body["fields"]], body
        _, listing = await admin("GET", "/pools")
        assert [p["id"] for p in listing["pools"]] == ["fixed"]  # nothing half-applied


async def test_conflicts_and_static_pools(setup: tuple[Admin, list[Any]]) -> None:
    admin, ups = setup
    assert (await admin("POST", "/pools", {"id": "fixed", "service": "svc"}))[0] == 409
    code, body = await admin("POST", "/pools", {"id": "y", "service": "other"})
    assert code == 409 and body["field"] == "service"
    assert (await admin("PUT", "/pools/fixed", {"service": "other"}))[0] == 409
    assert (await admin("DELETE", "/pools/fixed"))[0] == 409
    assert (await admin("PUT", "/pools/ghost", {"service": "svc"}))[0] == 404
    code, body = await admin("PUT", "/pools/ghost", {"service": "svc", "algorithm": "x"})
    assert code == 422
    async with admin.gw.session.post(admin.gw.admin_url + "/loadbalancer/pools",
                                     data=b"{not json",
                                     headers={"content-type": "application/json"}) as r:
        assert r.status == 422


async def test_pools_and_affinity_key_survive_kill_9(
    lucid_upstream: Any, lucid_process: Any, tmp_path: Path
) -> None:
    ups = [await lucid_upstream(named(n)) for n in "abc"]
    data_dir = str(tmp_path / "shared-data")
    first = lucid_process(two_services(ups[0].url), data_dir=data_dir)
    pool = {"id": "sticky", "service": "svc", "algorithm": "round_robin",
            "affinity": {"cookie": "lb"}, "instances": [{"url": u.url} for u in ups]}
    async with aiohttp.ClientSession() as session:
        code, _ = await json_request(session, "POST", first.admin_url + "/loadbalancer/pools",
                             json=pool)
        assert code == 201
        async with session.get(first.proxy_url + "/x") as r:
            pinned = await r.text()
            cookie = r.headers["set-cookie"].split(";")[0]
    first.signal(signal.SIGKILL)
    first.wait()
    second = lucid_process(two_services(ups[0].url), data_dir=data_dir)
    async with aiohttp.ClientSession() as session:
        code, listing = await json_request(session, "GET", second.admin_url + "/loadbalancer/pools")
        assert [p["id"] for p in listing["pools"]] == ["sticky"]
        for _ in range(5):  # the cookie issued before the crash still pins
            async with session.get(second.proxy_url + "/x", headers={"cookie": cookie}) as r:
                assert await r.text() == pinned
                assert "set-cookie" not in r.headers


async def test_reload_applies_a_changed_static_pool(setup: tuple[Admin, list[Any]]) -> None:
    admin, ups = setup
    gw = admin.gw
    data = tomllib.loads(gw.config_path.read_text())
    data["loadbalancer"]["pools"]["main"] = {"service": "svc",
                                             "instances": [{"url": ups[2].url}]}
    gw.config_path.write_text(tomli_w.dumps(data))
    async with gw.session.post(gw.admin_url + "/gateway/config/reload") as r:
        assert r.status == 200, await r.text()
    assert await admin.text() == "c"  # the next request after the reload
    code, listing = await admin("GET", "/pools")
    assert {p["id"]: p["source"] for p in listing["pools"]} == {"fixed": "static",
                                                                "main": "static"}


async def test_several_workers_share_pools_and_the_affinity_key(
    lucid_upstream: Any, lucid_process: Any
) -> None:
    """Two workers: a TOML pool with affinity works in both (one key, made once in
    loadbalancer.db), and a pool written through the admin API (worker 0) reaches the
    other worker through the core's definitions store. (It used to be refused with
    409: a write reached one worker only.)"""
    ups = [await lucid_upstream(named(n)) for n in "abc"]
    listed = ", ".join(f'{{ url = "{u.url}" }}' for u in ups)
    process = lucid_process(two_services(ups[0].url) + f"""
[[gateway.routes]]
prefix = "/other"
service = "other"
retries = {{ attempts = 1 }}

[loadbalancer.pools.sticky]
service = "svc"
instances = [{listed}]
affinity = {{}}
""", workers=2)
    async with aiohttp.ClientSession() as session:
        code, body = await json_request(
            session, "POST", process.admin_url + "/loadbalancer/pools",
            json={"id": "x", "service": "other", "instances": [{"url": ups[2].url}]})
        assert code == 201, body
        async with session.get(process.proxy_url + "/x") as r:
            pinned = await r.text()
            cookie = r.headers["set-cookie"].split(";")[0]

    async def fresh_get(path: str, **kw: Any) -> tuple[str, aiohttp.typedefs.LooseHeaders]:
        async with aiohttp.ClientSession() as session:  # a new connection: either worker
            async with session.get(process.proxy_url + path, **kw) as r:
                return await r.text(), r.headers

    async def both_follow() -> bool:
        return all([(await fresh_get("/other"))[0] == "c" for _ in range(12)])

    await wait_until(both_follow, message="every worker to balance 'other' by pool x")
    for _ in range(12):
        text, headers = await fresh_get("/x", headers={"cookie": cookie})
        assert text == pinned and "set-cookie" not in headers


async def test_a_pool_write_can_be_made_conditional(setup: tuple[Admin, list[Any]]) -> None:
    """Reads show each pool's revision (0 for the config file's); ``If-Match`` names
    the revision a replace or a delete expects, and a stale one is refused with 412."""
    admin, ups = setup
    pool = {"service": "svc", "instances": [{"url": ups[1].url}]}
    code, body = await admin("POST", "/pools", {"id": "p", **pool})
    assert code == 201, body
    first = body["revision"]
    assert first > 0
    _, listing = await admin("GET", "/pools")
    assert {p["id"]: p["revision"] for p in listing["pools"]} == {"fixed": 0, "p": first}
    code, body = await admin("PUT", "/pools/p", {**pool, "algorithm": "random"},
                             headers={"If-Match": str(first + 1)})
    assert code == 412 and body["revision"] == first, body
    _, listing = await admin("GET", "/pools")
    assert [p["effective"]["algorithm"] for p in listing["pools"] if p["id"] == "p"] == [
        "round_robin"]  # nothing changed
    code, body = await admin("PUT", "/pools/p", {**pool, "algorithm": "random"},
                             headers={"If-Match": f'"{first}"'})
    assert code == 200 and body["revision"] > first, body
    assert (await admin("DELETE", "/pools/p", headers={"If-Match": str(first)}))[0] == 412
    code, _ = await admin("DELETE", "/pools/p", headers={"If-Match": str(body["revision"])})
    assert code == 200
    assert await admin.text() == "a"


async def test_pools_an_older_lucid_kept_are_imported_once(
        lucid_upstream: Any, lucid_gateway: Any, tmp_path: Path) -> None:
    """Upgrading: pools an older Lucid stored in loadbalancer.db move to the core's
    definitions store on the first start and are served, listed and deletable; the
    affinity key stays in loadbalancer.db, so cookies issued before still pin."""
    import base64
    import hashlib
    import hmac
    import json
    import sqlite3

    ups = [await lucid_upstream(named(n)) for n in "ab"]
    data_dir = tmp_path / "old-data"
    data_dir.mkdir()
    key = bytes(range(32))
    with sqlite3.connect(data_dir / "loadbalancer.db") as conn:  # the older schema
        conn.execute("CREATE TABLE pools (id TEXT PRIMARY KEY, spec TEXT NOT NULL, "
                     "updated REAL NOT NULL)")
        conn.execute("CREATE TABLE secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO secrets VALUES ('affinity', ?)", (key.hex(),))
        conn.execute("INSERT INTO pools VALUES (?, ?, 0)", ("old", json.dumps({
            "service": "svc", "instances": [{"url": ups[1].url}],
            "affinity": {"cookie": "lb"}})))
    gw = await lucid_gateway(two_services(ups[0].url), data_dir=str(data_dir))
    admin = Admin(gw)
    async with gw.session.get(gw.proxy_url + "/x") as r:
        assert await r.text() == "b"
        cookie = r.headers["set-cookie"].split(";")[0]
    mac = hmac.new(key, f"old\n{ups[1].url}".encode(), hashlib.sha256).digest()[:18]
    assert cookie == "lb=" + base64.urlsafe_b64encode(mac).decode()  # the older key signs
    _, listing = await admin("GET", "/pools")
    assert [(p["id"], p["source"], p["revision"]) for p in listing["pools"]] == [
        ("old", "api", 1)]
    with sqlite3.connect(data_dir / "definitions.db") as conn:
        assert conn.execute("SELECT kind, id FROM definitions").fetchall() == [("pool", "old")]
    assert (await admin("DELETE", "/pools/old"))[0] == 200
    again = Admin(await lucid_gateway(two_services(ups[0].url), data_dir=str(data_dir)))
    _, listing = await again("GET", "/pools")
    assert listing["pools"] == []  # imported once: the deletion holds
    assert await again.text() == "a"
