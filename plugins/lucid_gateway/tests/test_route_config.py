"""The route model refuses what could never work, naming what was wrong."""

from __future__ import annotations

import pytest
from lucid_gateway.config import GatewayConfig, Route
from pydantic import ValidationError


@pytest.mark.parametrize("field,value,message", [
    ("prefix", "api", "must start with '/'"),
    ("path", "/a//b", "write it normalised, as '/a/b'"),
    ("path", "/a/./b", "write it normalised, as '/a/b'"),
    ("prefix", "/a/../b", "write it normalised, as '/b'"),
    ("pattern", "/users", "needs at least one {param}"),
    ("pattern", "/users/x{id}", "must be a whole '{name}'"),
    ("pattern", "/a/{id}/b/{id}", "appears twice"),
])
def test_bad_paths_are_refused(field, value, message):
    with pytest.raises(ValidationError, match=message.replace("{", r"\{").replace("(", r"\(")):
        Route(service="svc", **{field: value})


def test_a_trailing_slash_is_allowed():
    assert Route(service="svc", prefix="/api/").prefix == "/api/"


@pytest.mark.parametrize("kwargs,message", [
    ({"path": "/a", "prefix": "/a"}, "exactly one of"),
    ({}, "exactly one of"),
    ({"path": "/a", "strip_prefix": True}, "'prefix' routes only"),
    ({"prefix": "/a", "strip_prefix": True, "rewrite": "/b"}, "not both"),
    ({"prefix": "/a", "rewrite": "/b/{id}"}, "does not capture"),
    ({"pattern": "/u/{id}", "rewrite": "/v/{name}"}, "does not capture"),
    ({"path": "/a", "methods": ["FETCH"]}, "not an HTTP method"),
    ({"path": "/a", "hosts": ["bad host"]}, "not a host name"),
    ({"path": "/a", "id": "routes[3]"}, "should match pattern"),
    ({"path": "/a", "retries": {"on_status": [404]}}, "not a retryable status"),
    ({"path": "/a", "timeouts": {"read": "0s"}}, "greater than 0"),
])
def test_inconsistent_routes_are_refused(kwargs, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("{", r"\{")):
        Route(service="svc", **kwargs)


def test_values_are_normalised():
    route = Route(service="svc", path="/a", methods=["get"], hosts=["API.Example.com"],
                  headers={"X-Tenant": "a"}, timeouts={"connect": "250ms"},
                  max_body_size="1KiB")
    assert route.methods == ["GET"]
    assert route.hosts == ["api.example.com"]
    assert route.headers == {"x-tenant": "a"}
    assert route.timeouts.connect == 0.25
    assert route.max_body_size == 1024


def test_route_ids_are_unique_and_services_accept_plain_urls():
    with pytest.raises(ValidationError, match="used twice"):
        GatewayConfig(routes=[Route(id="a", service="s", path="/a"),
                              Route(id="a", service="s", path="/b")])
    config = GatewayConfig(services={"s": {"instances": ["http://h:1", {"url": "http://h:2",
                                                                       "weight": 3}]}})
    assert [i.weight for i in config.services["s"].instances] == [1, 3]
    with pytest.raises(ValidationError, match="scheme must be http or https"):
        GatewayConfig(services={"s": {"instances": ["ftp://h:1"]}})
    with pytest.raises(ValidationError, match="give scheme, host and port only"):
        GatewayConfig(services={"s": {"instances": ["http://h:1/path"]}})
