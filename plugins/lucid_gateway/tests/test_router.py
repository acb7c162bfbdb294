"""The route matcher: kinds, precedence, filters, upstream paths, and a big table."""

from __future__ import annotations

from typing import Any

import pytest
from lucid_gateway.config import Route
from lucid_gateway.router import Match, Router


def route(**fields: Any) -> Route:
    fields.setdefault("service", "svc")
    return Route(**fields)


def match(
    router: Router,
    path: str,
    *,
    method: str = "GET",
    host: str = "example.com",
    headers: dict[str, str] | None = None,
) -> Match | None:
    return router.match(method, host, path, headers or {})


def matched_id(router: Router, path: str, **kwargs: Any) -> str | None:
    m = match(router, path, **kwargs)
    return None if m is None else m.route_id


# --- exact paths ----------------------------------------------------------------


def test_exact_path_matches_only_itself() -> None:
    router = Router([route(path="/health")])
    m = match(router, "/health")
    assert m is not None
    assert (m.index, m.route_id, m.params, m.upstream_path) == (0, "routes[0]", {}, "/health")
    assert match(router, "/health/x") is None
    assert match(router, "/healthz") is None
    assert match(router, "/") is None


def test_exact_path_trailing_slash_is_significant() -> None:
    router = Router([route(id="bare", path="/a"), route(id="slash", path="/b/")])
    assert matched_id(router, "/a") == "bare"
    assert matched_id(router, "/a/") is None
    assert matched_id(router, "/b/") == "slash"
    assert matched_id(router, "/b") is None


def test_route_id_defaults_to_position() -> None:
    router = Router([route(id="named", path="/a"), route(path="/b")])
    assert matched_id(router, "/a") == "named"
    assert matched_id(router, "/b") == "routes[1]"


def test_match_carries_the_route_object() -> None:
    r = route(path="/a", service="billing")
    m = match(Router([r]), "/a")
    assert m is not None and m.route is r and m.route.service == "billing"


# --- prefixes -------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/api", "/api/"])
@pytest.mark.parametrize("path", ["/api", "/api/", "/api/x", "/api/x/y"])
def test_prefix_matches_whole_segments(prefix: str, path: str) -> None:
    assert match(Router([route(prefix=prefix)]), path) is not None


@pytest.mark.parametrize("path", ["/apix", "/apix/y", "/ap", "/", "/v1/api"])
def test_prefix_does_not_match_part_of_a_segment(path: str) -> None:
    assert match(Router([route(prefix="/api")]), path) is None


@pytest.mark.parametrize("path", ["/", "/x", "/x/y/z", "/x/"])
def test_root_prefix_matches_everything(path: str) -> None:
    assert matched_id(Router([route(id="all", prefix="/")]), path) == "all"


def test_longest_prefix_wins_regardless_of_order_or_priority() -> None:
    router = Router(
        [
            route(id="root", prefix="/", priority=100),
            route(id="api", prefix="/api", priority=50),
            route(id="v1", prefix="/api/v1"),
        ]
    )
    assert matched_id(router, "/api/v1/users") == "v1"
    assert matched_id(router, "/api/v1") == "v1"
    assert matched_id(router, "/api/v2") == "api"
    assert matched_id(router, "/api/v1x") == "api"
    assert matched_id(router, "/other") == "root"


def test_multi_segment_prefix_without_intermediate_routes() -> None:
    router = Router([route(id="deep", prefix="/a/b/c")])
    assert matched_id(router, "/a/b/c/d") == "deep"
    assert matched_id(router, "/a/b") is None
    assert matched_id(router, "/a/b/cd") is None


def test_prefix_with_and_without_trailing_slash_share_one_node() -> None:
    router = Router(
        [route(id="bare", prefix="/api"), route(id="slash", prefix="/api/", priority=1)]
    )
    assert matched_id(router, "/api/x") == "slash"


# --- patterns -------------------------------------------------------------------


def test_pattern_extracts_params() -> None:
    router = Router([route(pattern="/users/{id}/orders/{oid}")])
    m = match(router, "/users/42/orders/7")
    assert m is not None
    assert m.params == {"id": "42", "oid": "7"}
    assert m.upstream_path == "/users/42/orders/7"


@pytest.mark.parametrize(
    "path", ["/users", "/users/", "/users/42/orders", "/users/42/orders/7/x", "/users/42/x/7"]
)
def test_pattern_needs_every_segment(path: str) -> None:
    assert match(Router([route(pattern="/users/{id}/orders/{oid}")]), path) is None


def test_pattern_param_is_one_whole_segment() -> None:
    router = Router([route(pattern="/files/{name}")])
    m = match(router, "/files/a.txt")
    assert m is not None and m.params == {"name": "a.txt"}
    assert match(router, "/files/a/b") is None


def test_pattern_ignores_one_trailing_slash() -> None:
    router = Router([route(pattern="/users/{id}")])
    m = match(router, "/users/1/")
    assert m is not None and m.params == {"id": "1"}
    assert m.upstream_path == "/users/1/"  # without a rewrite the path goes up unchanged


def test_pattern_defined_with_trailing_slash() -> None:
    router = Router([route(pattern="/users/{id}/")])
    assert match(router, "/users/1") is not None
    assert match(router, "/users/1/") is not None


def test_pattern_param_at_the_start() -> None:
    router = Router([route(pattern="/{tenant}/status")])
    m = match(router, "/acme/status")
    assert m is not None and m.params == {"tenant": "acme"}
    assert match(router, "/acme/other") is None


def test_literal_segment_beats_param_at_the_same_depth() -> None:
    router = Router(
        [
            route(id="any", pattern="/users/{id}/{section}", priority=5),
            route(id="profile", pattern="/users/{id}/profile"),
        ]
    )
    # Shape decides before priority or order: "profile" is literal at depth 3.
    assert matched_id(router, "/users/1/profile") == "profile"
    assert matched_id(router, "/users/1/orders") == "any"


def test_literal_branch_backtracks_to_param_branch() -> None:
    router = Router(
        [
            route(id="me", pattern="/users/me/settings/{key}"),
            route(id="user", pattern="/users/{id}/orders/{oid}"),
        ]
    )
    assert matched_id(router, "/users/me/settings/theme") == "me"
    # "me" takes the literal branch first, which dead-ends at "orders".
    m = match(router, "/users/me/orders/9")
    assert m is not None
    assert (m.route_id, m.params) == ("user", {"id": "me", "oid": "9"})


def test_param_values_do_not_leak_from_a_failed_branch() -> None:
    router = Router(
        [
            route(id="literal", pattern="/a/{x}/stop"),
            route(id="params", pattern="/{p}/{q}/go"),
        ]
    )
    # The literal branch binds x=1, then fails at "go"; its value must be dropped.
    m = match(router, "/a/1/go")
    assert m is not None and m.route_id == "params" and m.params == {"p": "a", "q": "1"}
    m = match(router, "/a/1/stop")
    assert m is not None and m.route_id == "literal" and m.params == {"x": "1"}


def test_filter_failure_backtracks_into_other_pattern_branches() -> None:
    router = Router(
        [
            route(id="literal-post", pattern="/users/me/{x}", methods=["POST"]),
            route(id="param-get", pattern="/users/{id}/{x}"),
        ]
    )
    assert matched_id(router, "/users/me/a", method="POST") == "literal-post"
    m = match(router, "/users/me/a", method="GET")
    assert m is not None and m.route_id == "param-get" and m.params == {"id": "me", "x": "a"}


def test_same_shape_different_names_share_a_node() -> None:
    router = Router(
        [
            route(id="get", pattern="/items/{id}", methods=["GET"]),
            route(id="put", pattern="/items/{item}", methods=["PUT"]),
        ]
    )
    m = match(router, "/items/5", method="PUT")
    assert m is not None and m.route_id == "put" and m.params == {"item": "5"}
    m = match(router, "/items/5", method="GET")
    assert m is not None and m.route_id == "get" and m.params == {"id": "5"}


# --- precedence between kinds ----------------------------------------------------


def test_exact_beats_prefix_beats_pattern() -> None:
    routes = [
        route(id="pattern", pattern="/users/{id}", priority=100),
        route(id="prefix", prefix="/users", priority=10),
        route(id="exact", path="/users/me"),
    ]
    router = Router(routes)
    assert matched_id(router, "/users/me") == "exact"
    assert matched_id(router, "/users/1") == "prefix"
    assert matched_id(Router(routes[:1]), "/users/1") == "pattern"


def test_root_prefix_beats_pattern() -> None:
    router = Router([route(id="pattern", pattern="/users/{id}"), route(id="root", prefix="/")])
    assert matched_id(router, "/users/1") == "root"


def test_priority_then_index_within_one_exact_path() -> None:
    router = Router(
        [
            route(id="first", path="/a"),
            route(id="second", path="/a"),
            route(id="high", path="/b"),
            route(id="low", path="/b", priority=-1),
            route(id="higher", path="/b", priority=5),
        ]
    )
    assert matched_id(router, "/a") == "first"
    assert matched_id(router, "/b") == "higher"


def test_priority_then_index_within_one_prefix() -> None:
    router = Router(
        [
            route(id="first", prefix="/api"),
            route(id="second", prefix="/api"),
            route(id="boosted", prefix="/api/", priority=1),
        ]
    )
    assert matched_id(router, "/api/x") == "boosted"
    assert matched_id(Router(router.routes[:2]), "/api/x") == "first"


def test_priority_then_index_within_one_pattern_shape() -> None:
    router = Router(
        [
            route(id="first", pattern="/u/{a}"),
            route(id="second", pattern="/u/{b}"),
        ]
    )
    assert matched_id(router, "/u/1") == "first"
    router = Router([*router.routes, route(id="boosted", pattern="/u/{c}", priority=2)])
    assert matched_id(router, "/u/1") == "boosted"


def test_priority_does_not_cross_path_length() -> None:
    router = Router([route(id="short", prefix="/a", priority=99), route(id="long", prefix="/a/b")])
    assert matched_id(router, "/a/b/c") == "long"


def test_host_specific_route_wins_a_tie_before_index() -> None:
    router = Router(
        [
            route(id="any", prefix="/api"),
            route(id="tenant", prefix="/api", hosts=["tenant.example.com"]),
            route(id="boosted", prefix="/api", priority=1, hosts=["other.example.com"]),
        ]
    )
    assert matched_id(router, "/api/x", host="tenant.example.com") == "tenant"
    assert matched_id(router, "/api/x", host="example.com") == "any"
    assert matched_id(router, "/api/x", host="other.example.com") == "boosted"


# --- filters ----------------------------------------------------------------------


def test_methods_filter() -> None:
    router = Router([route(path="/a", methods=["get", "POST"])])
    assert match(router, "/a", method="GET") is not None
    assert match(router, "/a", method="POST") is not None
    assert match(router, "/a", method="DELETE") is None


def test_empty_methods_accept_every_method() -> None:
    router = Router([route(path="/a")])
    assert all(match(router, "/a", method=m) for m in ("GET", "PATCH", "OPTIONS"))


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("api.example.com", True),
        ("API.Example.COM", True),
        ("api.example.com:8443", True),
        ("api.example.com.", True),
        ("example.com", False),
        ("www.api.example.com", False),
        ("api.example.org", False),
        ("", False),
    ],
)
def test_exact_host_filter(host: str, ok: bool) -> None:
    router = Router([route(path="/a", hosts=["api.example.com"])])
    assert (match(router, "/a", host=host) is not None) is ok


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("A.B.Example.Com:80", True),
        ("example.com", False),
        ("badexample.com", False),
        ("a.example.com.evil", False),
        ("a.example.org", False),
    ],
)
def test_wildcard_host_filter(host: str, ok: bool) -> None:
    router = Router([route(prefix="/", hosts=["*.example.com"])])
    assert (match(router, "/x", host=host) is not None) is ok


def test_host_list_mixes_exact_and_wildcard() -> None:
    router = Router([route(path="/a", hosts=["Example.com", "*.example.net"])])
    assert match(router, "/a", host="example.com") is not None
    assert match(router, "/a", host="x.example.net") is not None
    assert match(router, "/a", host="example.net") is None


def test_ipv6_host_with_port() -> None:
    router = Router([route(path="/a", hosts=["localhost"]), route(id="v6", path="/b")])
    assert match(router, "/a", host="localhost:8080") is not None
    assert match(router, "/a", host="[::1]:8080") is None
    assert matched_id(router, "/b", host="[::1]:8080") == "v6"


def test_headers_filter_requires_every_header_exactly() -> None:
    router = Router([route(path="/a", headers={"X-Version": "2", "x-tenant": "acme"})])
    assert match(router, "/a", headers={"x-version": "2", "x-tenant": "acme", "x": "y"})
    assert match(router, "/a", headers={"x-version": "2"}) is None
    assert match(router, "/a", headers={"x-version": "3", "x-tenant": "acme"}) is None
    assert match(router, "/a", headers={"x-version": "2", "x-tenant": "ACME"}) is None
    assert match(router, "/a") is None


def test_all_filters_together() -> None:
    router = Router(
        [route(path="/a", methods=["PUT"], hosts=["*.example.com"], headers={"x-k": "v"})]
    )
    ok: dict[str, Any] = {"method": "PUT", "host": "a.example.com", "headers": {"x-k": "v"}}
    assert match(router, "/a", **ok) is not None
    assert match(router, "/a", **{**ok, "method": "GET"}) is None
    assert match(router, "/a", **{**ok, "host": "example.com"}) is None
    assert match(router, "/a", **{**ok, "headers": {}}) is None


def test_filter_failure_tries_next_candidate_at_the_same_node() -> None:
    router = Router(
        [
            route(id="v2", path="/a", headers={"x-version": "2"}, priority=1),
            route(id="post", path="/a", methods=["POST"]),
            route(id="fallback", path="/a"),
        ]
    )
    assert matched_id(router, "/a", headers={"x-version": "2"}) == "v2"
    assert matched_id(router, "/a", method="POST") == "post"
    assert matched_id(router, "/a") == "fallback"


def test_filter_failure_falls_back_exact_to_prefix_to_shorter_prefix() -> None:
    router = Router(
        [
            route(id="exact", path="/api/v1/users", methods=["POST"]),
            route(id="v1", prefix="/api/v1", hosts=["v1.example.com"]),
            route(id="api", prefix="/api", headers={"x-api": "1"}),
            route(id="root", prefix="/", methods=["GET"]),
        ]
    )
    path = "/api/v1/users"
    assert matched_id(router, path, method="POST") == "exact"
    assert matched_id(router, path, host="v1.example.com") == "v1"
    assert matched_id(router, path, headers={"x-api": "1"}) == "api"
    assert matched_id(router, path) == "root"
    assert matched_id(router, path, method="DELETE") is None


def test_filter_failure_falls_back_from_prefix_to_pattern() -> None:
    router = Router(
        [
            route(id="prefix", prefix="/users", methods=["POST"]),
            route(id="pattern", pattern="/users/{id}"),
        ]
    )
    assert matched_id(router, "/users/1", method="POST") == "prefix"
    assert matched_id(router, "/users/1", method="GET") == "pattern"


def test_many_host_specific_routes_on_one_path_are_indexed() -> None:
    tenants = [
        route(id=f"t{i}", prefix="/app", hosts=[f"t{i}.example.com", f"alias{i}.example.com"])
        for i in range(50)
    ]
    router = Router(
        [
            route(id="wild", prefix="/app", hosts=["*.wild.example.com"]),
            *tenants,
            route(id="any-post", prefix="/app", methods=["POST"]),
            route(id="boosted", prefix="/app", priority=1, headers={"x-b": "1"}),
            route(id="t7-late", prefix="/app", hosts=["t7.example.com"]),
            route(id="exact-t3", path="/app/x", hosts=["t3.example.com"]),
            *[route(id=f"e{i}", path="/app/x", hosts=[f"e{i}.example.com"]) for i in range(20)],
        ]
    )
    assert matched_id(router, "/app/x", host="T12.example.com:443") == "t12"
    assert matched_id(router, "/app/x", host="alias12.example.com") == "t12"
    assert matched_id(router, "/app", host="t7.example.com") == "t7"
    assert matched_id(router, "/app", host="t7.example.com", headers={"x-b": "1"}) == "boosted"
    assert matched_id(router, "/app", host="a.wild.example.com") == "wild"
    assert matched_id(router, "/app", host="nobody.example.com", method="POST") == "any-post"
    assert matched_id(router, "/app", host="nobody.example.com") is None
    assert matched_id(router, "/app/x", host="t3.example.com") == "exact-t3"
    assert matched_id(router, "/app/x", host="e19.example.com") == "e19"
    assert matched_id(router, "/app/x", host="e20.example.com") is None
    m = match(router, "/app/x", host="e20.example.com", method="POST")
    assert m is not None and m.route_id == "any-post"


def reference_match(routes: list[Route], method: str, host: str, path: str) -> int | None:
    """The rules of the router written as a scan over every route, for comparison."""
    host = host.split(":")[0].lower()
    segments = path[1:].split("/")
    trimmed = segments[:-1] if len(segments) > 1 and segments[-1] == "" else segments
    best: tuple[Any, ...] | None = None
    for index, r in enumerate(routes):
        if r.methods and method not in r.methods:
            continue
        if r.hosts and not any(
            host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in r.hosts
        ):
            continue
        if r.path is not None:
            if path != r.path:
                continue
            key: tuple[Any, ...] = (0, ())
        elif r.prefix is not None:
            parts = [p for p in r.prefix.strip("/").split("/") if p]
            if segments[: len(parts)] != parts:
                continue
            key = (1, (-len(parts),))
        else:
            assert r.pattern is not None
            parts = r.pattern.strip("/").split("/")
            if len(parts) != len(trimmed) or not all(
                (p.startswith("{") and s) or p == s for p, s in zip(parts, trimmed, strict=True)
            ):
                continue
            key = (2, tuple(1 if p.startswith("{") else 0 for p in parts))
        key += (-r.priority, 0 if r.hosts else 1, index)
        if best is None or key < best:
            best = key
    return None if best is None else best[-1]


def test_router_agrees_with_a_reference_scan() -> None:
    import random

    rng = random.Random(1234)
    words = ["a", "b", "c", "users", "1"]
    hosts = ["x.com", "y.x.com", "z.com"]

    def some_path(depth: int, params: bool = False) -> str:
        parts = [
            f"{{p{i}}}" if params and rng.random() < 0.5 else rng.choice(words)
            for i in range(depth)
        ]
        if params and not any(p.startswith("{") for p in parts):
            parts[rng.randrange(depth)] = "{p0x}"
        return "/" + "/".join(parts)

    for _ in range(30):
        routes = []
        for _ in range(rng.randint(1, 40)):
            kind = rng.choice(["path", "prefix", "pattern"])
            depth = rng.randint(0 if kind == "prefix" else 1, 3)
            fields: dict[str, Any] = {kind: some_path(depth, params=kind == "pattern")}
            if rng.random() < 0.3:
                fields["methods"] = [rng.choice(["GET", "POST"])]
            if rng.random() < 0.3:
                fields["hosts"] = rng.sample(["x.com", "*.x.com", "z.com"], rng.randint(1, 2))
            if rng.random() < 0.3:
                fields["priority"] = rng.randint(-1, 1)
            routes.append(route(**fields))
        # Enough exact-host routes at one node to switch on the host index there.
        kind = rng.choice(["path", "prefix", "pattern"])
        shared = some_path(rng.randint(1, 2), params=kind == "pattern")
        for i in range(rng.randint(8, 12)):
            tenant = [f"t{i}.x.com", rng.choice(["x.com", "z.com", "y.x.com"])]
            fields = {kind: shared, "hosts": tenant, "priority": rng.randint(-1, 1)}
            routes.insert(rng.randrange(len(routes) + 1), route(**fields))
        router = Router(routes)
        for _ in range(200):
            path = some_path(rng.randint(0, 4)) + rng.choice(["", "/"])
            path = path.replace("//", "/")
            method, host = rng.choice(["GET", "POST"]), rng.choice(hosts)
            m = router.match(method, host, path, {})
            expected = reference_match(routes, method, host, path)
            assert (None if m is None else m.index) == expected, (routes, method, host, path)


# --- upstream path -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "upstream"),
    [
        ("/api", "/api/users", "/users"),
        ("/api", "/api/users/1/", "/users/1/"),
        ("/api", "/api", "/"),
        ("/api", "/api/", "/"),
        ("/api/", "/api/users", "/users"),
        ("/api/v1", "/api/v1/x", "/x"),
        ("/", "/x/y", "/x/y"),
        ("/", "/", "/"),
    ],
)
def test_strip_prefix(prefix: str, path: str, upstream: str) -> None:
    m = match(Router([route(prefix=prefix, strip_prefix=True)]), path)
    assert m is not None and m.upstream_path == upstream


@pytest.mark.parametrize(
    ("prefix", "rewrite", "path", "upstream"),
    [
        ("/api", "/v2", "/api/users", "/v2/users"),
        ("/api", "/v2/", "/api/users", "/v2/users"),
        ("/api/", "/v2/", "/api/users", "/v2/users"),
        ("/api", "/v2", "/api", "/v2"),
        ("/api", "/v2/", "/api", "/v2/"),
        ("/api", "/v2", "/api/", "/v2/"),
        ("/api", "/", "/api/users", "/users"),
        ("/api", "/", "/api", "/"),
        ("/", "/v2", "/users", "/v2/users"),
        ("/old/path", "/new", "/old/path/a/b", "/new/a/b"),
    ],
)
def test_prefix_rewrite(prefix: str, rewrite: str, path: str, upstream: str) -> None:
    m = match(Router([route(prefix=prefix, rewrite=rewrite)]), path)
    assert m is not None and m.upstream_path == upstream
    assert "//" not in m.upstream_path


def test_prefix_without_rewrite_keeps_the_path() -> None:
    m = match(Router([route(prefix="/api")]), "/api/users")
    assert m is not None and m.upstream_path == "/api/users"


def test_exact_rewrite_replaces_the_whole_path() -> None:
    m = match(Router([route(path="/health", rewrite="/internal/status")]), "/health")
    assert m is not None and m.upstream_path == "/internal/status"


def test_pattern_rewrite_fills_params() -> None:
    router = Router([route(pattern="/users/{id}/orders/{oid}", rewrite="/o/{oid}/by/{id}")])
    m = match(router, "/users/7/orders/9")
    assert m is not None and m.upstream_path == "/o/9/by/7"


def test_pattern_rewrite_may_repeat_or_omit_params() -> None:
    router = Router([route(pattern="/u/{id}/{tab}", rewrite="/u/{id}/profile/{id}")])
    m = match(router, "/u/5/x")
    assert m is not None and m.upstream_path == "/u/5/profile/5"
    assert m.params == {"id": "5", "tab": "x"}


def test_pattern_rewrite_param_values_are_not_reinterpreted() -> None:
    m = match(Router([route(pattern="/u/{id}", rewrite="/p/{id}")]), "/u/{oops}")
    assert m is not None and m.upstream_path == "/p/{oops}"


def test_params_are_a_fresh_dict_per_match() -> None:
    router = Router([route(path="/a"), route(pattern="/u/{id}")])
    first, second = match(router, "/a"), match(router, "/a")
    assert first is not None and second is not None
    first.params["x"] = "y"
    assert second.params == {}
    m1, m2 = match(router, "/u/1"), match(router, "/u/2")
    assert m1 is not None and m2 is not None and m1.params == {"id": "1"}


# --- misses and edge cases -----------------------------------------------------------


def test_empty_router_matches_nothing() -> None:
    assert match(Router([]), "/") is None
    assert match(Router([]), "/a/b") is None


def test_no_match_returns_none() -> None:
    router = Router([route(path="/a"), route(prefix="/b"), route(pattern="/c/{x}")])
    for path in ("/", "/x", "/a/", "/bb", "/c", "/c/", "/c/1/2"):
        assert match(router, path) is None, path


# --- a large table ---------------------------------------------------------------------


def big_table(n: int = 10_000) -> list[Route]:
    routes: list[Route] = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            routes.append(route(id=f"exact{i}", path=f"/svc{i}/health"))
        elif kind == 1:
            routes.append(route(id=f"prefix{i}", prefix=f"/svc{i}", strip_prefix=True))
        elif kind == 2:
            routes.append(route(id=f"pattern{i}", pattern=f"/svc{i}/items/{{id}}"))
        elif kind == 3:
            routes.append(route(id=f"host{i}", prefix=f"/shared/p{i}", hosts=[f"h{i}.example.com"]))
        else:
            routes.append(
                route(id=f"method{i}", pattern=f"/shared/{{tenant}}/r{i}", methods=["POST"])
            )
    return routes


def test_ten_thousand_routes_match_correctly() -> None:
    routes = big_table()
    router = Router(routes)
    for i in range(len(routes)):
        kind = i % 5
        if kind == 0:
            m = match(router, f"/svc{i}/health")
            assert m is not None and m.index == i
        elif kind == 1:
            m = match(router, f"/svc{i}/a/b")
            assert m is not None and (m.index, m.upstream_path) == (i, "/a/b")
        elif kind == 2:
            m = match(router, f"/svc{i}/items/x{i}")
            assert m is not None and (m.index, m.params) == (i, {"id": f"x{i}"})
            assert match(router, f"/svc{i}/items") is None
        elif kind == 3:
            m = match(router, f"/shared/p{i}/z", host=f"h{i}.example.com")
            assert m is not None and m.index == i
            assert match(router, f"/shared/p{i}/z", host=f"h{i + 1}.example.com") is None
        else:
            m = match(router, f"/shared/acme/r{i}", method="POST")
            assert m is not None and (m.index, m.params) == (i, {"tenant": "acme"})
            assert match(router, f"/shared/acme/r{i}", method="GET") is None
    assert match(router, "/svc0/unknown") is None
    assert match(router, "/nowhere") is None
    # The shorter prefix behind a deeper exact path still answers.
    m = match(router, "/svc1/health")
    assert m is not None and m.route_id == "prefix1"


def test_ten_thousand_routes_keep_precedence() -> None:
    routes = [
        *big_table(),
        route(id="catch-all", prefix="/"),
        route(id="late-exact", path="/svc1/x"),
    ]
    router = Router(routes)
    assert matched_id(router, "/svc1/x") == "late-exact"
    assert matched_id(router, "/svc2/items/1") == "catch-all"  # any prefix beats a pattern
    assert matched_id(router, "/svc3/anything") == "catch-all"
    assert matched_id(router, "/svc5/health") == "exact5"
