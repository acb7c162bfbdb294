"""Lucid's own tests use the same fixtures plugin authors get from ``lucid.testing``."""

import os
from typing import Any

import pytest

ENGINES = ["fast", "hypercorn"]  # [server] engine: the default first


@pytest.fixture(params=ENGINES)
def engine_gateway(request: pytest.FixtureRequest, lucid_gateway: Any) -> Any:
    """The kit's ``lucid_gateway`` factory on each proxy engine in turn: a test that
    asks for it runs once per engine."""

    async def factory(text: Any, *, plugins: Any = (), **server: Any) -> Any:
        server.setdefault("engine", request.param)
        return await lucid_gateway(text, plugins=plugins, **server)

    return factory


@pytest.fixture(params=ENGINES)
def engine_process(request: pytest.FixtureRequest, lucid_process: Any) -> Any:
    """The kit's ``lucid_process`` factory (``lucid serve``) on each proxy engine."""

    def factory(text: Any, env: Any = None, wait: bool = True, **server: Any) -> Any:
        server.setdefault("engine", request.param)
        return lucid_process(text, env, wait, **server)

    return factory


@pytest.fixture
def tls_files(tmp_path: Any) -> Any:
    """A CA made for this test, a server certificate for localhost/127.0.0.1 and a
    client certificate (``lucid.testing_internal.make_tls``): HTTPS, WSS, mTLS."""
    from lucid.testing_internal import make_tls

    return make_tls(tmp_path / "tls")


@pytest.fixture(autouse=True)
def no_lucid_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LUCID_*`` overrides from the shell running the tests must not leak into them
    (gateway subprocesses inherit the environment)."""
    for name in list(os.environ):
        if name.upper().startswith("LUCID_"):
            monkeypatch.delenv(name)


# Every built-in plugin configured, the admin API behind a secret, and one object of
# each kind the API can create: for tests that walk (or fuzz) every admin endpoint.
ADMIN_SECRET = "a" * 48
EVERY_PLUGIN = f"""
[server]
admin_secret = "{ADMIN_SECRET}"

[gateway.services.svc]
instances = ["http://127.0.0.1:9"]

[gateway.services.svc2]
instances = ["http://127.0.0.1:9"]

[gateway.auth.issuers.main]
algorithms = ["HS256"]
secret = "{'k' * 40}"

[[gateway.routes]]
id = "static"
prefix = "/static"
service = "svc"

[registry.services.billing]
instances = ["http://127.0.0.1:9101"]

[circuitbreaker.circuits.payments]
service = "svc"

[loadbalancer.pools.users]
service = "svc"

[[ratelimiter.limits]]
id = "per-ip"
rate = "1000/s"

[monitoring]
[[monitoring.alerts]]
name = "HighErrorRate"
metric = "error_rate"
threshold = 0.05
"""
# (path, body) that create the objects; the path parameters naming them
CREATED = [
    ("/gateway/route", {"id": "rt", "prefix": "/rt", "service": "svc"}),
    ("/circuitbreaker/circuits", {"id": "cb", "service": "svc2"}),
    ("/loadbalancer/pools", {"id": "lb", "service": "svc2"}),
    ("/ratelimiter/limits", {"id": "rl", "rate": "10/s"}),
    ("/monitoring/alerts", {"name": "al", "metric": "error_rate", "threshold": 0.5}),
    ("/registry/services", {"id": "rs", "instances": [{"id": "i1",
                                                       "url": "http://127.0.0.1:9"}]}),
]
PATH_PARAMETERS = {"route_id": "rt", "circuit_id": "cb", "pool_id": "lb", "limit_id": "rl",
                   "name": "al", "service_id": "rs", "instance_id": "i1"}


def admin_token(role: str = "admin", ttl: int = 3600) -> str:
    import time

    from joserfc import jwt
    from joserfc.jwk import OctKey

    now = int(time.time())
    return jwt.encode({"alg": "HS256"}, {"iss": "lucid-admin", "sub": "tests", "role": role,
                                         "iat": now, "exp": now + ttl},
                      OctKey.import_key(ADMIN_SECRET))


@pytest.fixture
def every_plugin() -> Any:
    """``(config text, admin token, objects to create, path parameters naming them)``."""
    return EVERY_PLUGIN, admin_token(), CREATED, PATH_PARAMETERS
