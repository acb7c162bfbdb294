"""lucid-prefixrouter end to end, in place of Lucid's own router: a real gateway on
loopback (``lucid_gateway``), real upstreams (``lucid_upstream``), real HTTP requests.
Only Lucid's public test kit. Services come from the built-in registry."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
import tomli_w
from lucid.config import ConfigError


def config(users: str, orders: str, extra: str = "") -> str:
    return f"""
[plugins]
gateway = "prefixrouter"

[registry.services.users]
instances = ["{users}"]
[registry.services.orders]
instances = ["{orders}"]

[[prefixrouter.routes]]
prefix = "/"
service = "users"

[[prefixrouter.routes]]
id = "users"
prefix = "/api/users"
service = "users"
strip_prefix = true

[[prefixrouter.routes]]
id = "orders"
prefix = "/api/users/orders/"
service = "orders"
max_body_size = 16
{extra}
"""


async def get(gw: Any, path: str, **kw: Any) -> tuple[int, Any]:
    async with gw.session.request(kw.pop("method", "GET"), gw.proxy_url + path, **kw) as r:
        return r.status, await r.json()


async def test_the_longest_prefix_wins_in_whole_segments(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    users, orders = await lucid_upstream(), await lucid_upstream()
    gw = await lucid_gateway(config(users.url, orders.url))
    assert "gateway" not in {p.name for p in gw.runtime.plugin_set.plugins}
    status, echo = await get(gw, "/api/users/orders/7")
    assert (status, echo["port"], echo["path"]) == (200, orders.port, "/api/users/orders/7")
    status, echo = await get(gw, "/api/users/42")
    assert (status, echo["port"], echo["path"]) == (200, users.port, "/42")  # stripped
    status, echo = await get(gw, "/api/users")
    assert (status, echo["path"]) == (200, "/")
    status, echo = await get(gw, "/api/usersx")  # not a whole segment: the "/" route
    assert (status, echo["path"]) == (200, "/api/usersx")


async def test_nothing_matching_is_answered_404_json(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(f"""
[plugins]
gateway = "prefixrouter"
[registry.services.users]
instances = ["{upstream.url}"]
[[prefixrouter.routes]]
prefix = "/api"
service = "users"
""")
    for path in ("/", "/apix", "/other/api"):
        async with gw.session.get(gw.proxy_url + path) as r:
            assert r.status == 404
            body = await r.json()
        assert body["status"] == 404 and body["request_id"] == r.headers["X-Request-ID"]
    assert upstream.requests == []


async def test_the_route_policy_and_overrides_reach_the_core_and_the_other_plugins(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    users, orders = await lucid_upstream(), await lucid_upstream()
    gw = await lucid_gateway(config(users.url, orders.url, """
[[prefixrouter.routes]]
id = "free"
prefix = "/free"
service = "users"
plugins = { ratelimiter = { enabled = false } }

[[ratelimiter.limits]]
id = "users-only"
rate = "1/m"
routes = ["users"]
"""))
    # the policy: the core enforces the route's body limit
    status, _ = await get(gw, "/api/users/orders/1", method="POST", data=b"x" * 17)
    assert status == 413
    # generation.routes: the rate limiter counts the route named by id ...
    assert [(await get(gw, "/api/users/1"))[0] for _ in range(2)] == [200, 429]
    # ... and overrides: a route that switches the limiter off is not limited
    limited = gw.runtime.generation.routes
    assert [r.id for r in limited] == ["/", "users", "orders", "free"]
    assert (await get(gw, "/free"))[0] == 200


async def test_a_reload_swaps_the_routes_in(lucid_gateway: Any, lucid_upstream: Any) -> None:
    users, orders = await lucid_upstream(), await lucid_upstream()
    gw = await lucid_gateway(config(users.url, orders.url))
    assert (await get(gw, "/v2/x"))[1]["port"] == users.port  # the "/" route
    data = tomllib.loads(gw.config_path.read_text())  # as the kit wrote it: ports filled in
    data["prefixrouter"]["routes"].append({"prefix": "/v2", "service": "orders"})
    gw.config_path.write_text(tomli_w.dumps(data))
    async with gw.session.post(gw.admin_url + "/gateway/config/reload") as r:
        assert r.status == 200, await r.text()
    assert (await get(gw, "/v2/x"))[1]["port"] == orders.port


@pytest.mark.parametrize(("routes", "problem"), [
    ('{ prefix = "/a", service = "s", plugins = { nope = {} } }',
     "prefixrouter.routes[0].plugins.nope"),
    ('{ prefix = "/a", service = "s", plugins = { ratelimiter = { cost = 0 } } }',
     "prefixrouter.routes[0].plugins.ratelimiter.cost"),
    ('{ prefix = "a", service = "s" }', "prefixrouter.routes[0].prefix"),
    ('{ prefix = "/a", service = "s" }, { prefix = "/a/", service = "t" }',
     "prefixrouter.routes"),
])
async def test_bad_routes_are_refused_naming_the_key(
    lucid_gateway: Any, routes: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        await lucid_gateway(f'[plugins]\ngateway = "prefixrouter"\n'
                            f'[prefixrouter]\nroutes = [{routes}]\n')
    assert problem in str(raised.value)
