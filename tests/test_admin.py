"""The admin app: JSON everywhere, validation that names each field, an OpenAPI document."""

from __future__ import annotations

from lucid.config import ServerConfig

CONFIG = """
[gateway.services.svc]
instances = ["http://127.0.0.1:9"]

[[gateway.routes]]
id = "users"
pattern = "/users/{id}"
rewrite = "/u/{id}"
service = "svc"

[[gateway.routes]]
prefix = "/static"
strip_prefix = true
methods = ["GET"]
service = "svc"
"""


def test_the_admin_listener_defaults_to_loopback():
    assert ServerConfig().admin.startswith("127.0.0.1:")


async def test_openapi_document_lists_the_admin_endpoints(lucid_gateway):
    gw = await lucid_gateway(CONFIG)
    async with gw.session.get(f"{gw.admin_url}/openapi.json") as r:
        assert r.status == 200
        document = await r.json()
    assert document["info"]["title"] == "Lucid admin API"
    for path in ("/gateway/health", "/gateway/status", "/gateway/routes",
                 "/gateway/routes/match", "/gateway/config/reload"):
        assert path in document["paths"], path
    schema = document["paths"]["/gateway/routes/match"]["post"]["requestBody"]
    assert schema["content"]["application/json"]["schema"]


async def test_status_and_routes(lucid_gateway):
    gw = await lucid_gateway(CONFIG)
    async with gw.session.get(f"{gw.admin_url}/gateway/status") as r:
        status = await r.json()
    assert status["generation"] == 1
    assert {"name": "gateway", "capability": "gateway"} in status["plugins"]
    assert status["listeners"]["proxy"] == gw.proxy_url.removeprefix("http://")
    async with gw.session.get(f"{gw.admin_url}/gateway/routes") as r:
        routes = (await r.json())["routes"]
    assert [(r["id"], r["kind"]) for r in routes] == [("users", "pattern"),
                                                        ("routes[1]", "prefix")]


async def test_route_match_explains_a_request(lucid_gateway):
    gw = await lucid_gateway(CONFIG)
    payload = {"method": "get", "path": "/static/../users/7"}
    async with gw.session.post(f"{gw.admin_url}/gateway/routes/match", json=payload) as r:
        assert r.status == 200
        assert await r.json() == {
            "route_id": "users", "service": "svc", "normalised_path": "/users/7",
            "upstream_path": "/u/7", "params": {"id": "7"},
        }
    payload = {"method": "POST", "path": "/static/a.css"}
    async with gw.session.post(f"{gw.admin_url}/gateway/routes/match", json=payload) as r:
        assert r.status == 404
        assert (await r.json())["error"] == "no route matches"


async def test_bad_payloads_get_422_naming_each_field(lucid_gateway):
    gw = await lucid_gateway(CONFIG)
    url = f"{gw.admin_url}/gateway/routes/match"
    bad = {"method": "FETCH", "path": "relative", "headers": {"a": 1}, "colour": "red"}
    async with gw.session.post(url, json=bad) as r:
        assert r.status == 422
        body = await r.json()
    fields = {f["field"] for f in body["fields"]}
    assert fields == {"method", "path", "headers.a", "colour"}
    assert body["error"] == "validation failed"

    async with gw.session.post(url, data=b"{not json",
                               headers={"Content-Type": "application/json"}) as r:
        assert r.status == 422
        assert (await r.json())["fields"][0]["field"] == "body"

    async with gw.session.post(url, json={"method": "GET"}) as r:
        assert r.status == 422
        assert (await r.json())["fields"][0] == {
            "field": "path", "message": "Field required", "type": "missing"}


async def test_unknown_paths_and_methods_answer_json(lucid_gateway):
    gw = await lucid_gateway(CONFIG)
    async with gw.session.get(f"{gw.admin_url}/nope") as r:
        assert r.status == 404
        assert (await r.json())["status"] == 404
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    async with gw.session.delete(f"{gw.admin_url}/gateway/health") as r:
        assert r.status == 405
        assert (await r.json())["status"] == 405
