"""Tiers chosen by a claim of a real JWT: the gateway plugin verifies the token (HS256)
and sets the identity; the limiter picks each request's tier from it. Tokens are signed
with joserfc, as in the gateway's own auth tests.
"""

from __future__ import annotations

import time
from typing import Any

from joserfc import jwt as jose_jwt
from joserfc.jwk import OctKey
from lucid_ratelimiter import RateLimiterPlugin

from lucid.testing import wait_until

SECRET = "tier-secret-" + "x" * 32
T0 = 1_800_000_000.0


def token(sub: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": "https://issuer.test", "aud": "api", "sub": sub, "iat": now,
               "exp": now + 300, **claims}
    return jose_jwt.encode({"alg": "HS256", "typ": "JWT"}, payload,
                           OctKey.import_key(SECRET), algorithms=["HS256"])


def config(url: str) -> str:
    return f'''
[gateway.services.svc]
instances = ["{url}"]

[gateway.auth.issuers.main]
issuer = "https://issuer.test"
audiences = ["api"]
algorithms = ["HS256"]
secret = "{SECRET}"

[[gateway.routes]]
id = "api"
prefix = "/api"
service = "svc"
auth = {{}}

[[gateway.routes]]
id = "open"
prefix = "/open"
service = "svc"

[ratelimiter]
tier_claim = "plan"
default_tier = "free"

[[ratelimiter.limits]]
id = "free"
rate = "2/minute"
algorithm = "fixed_window"
key = "user"
tiers = ["free"]

[[ratelimiter.limits]]
id = "pro"
rate = "5/minute"
algorithm = "fixed_window"
key = "user"
tiers = ["pro"]

[[ratelimiter.limits]]
id = "pro-in-flight"
algorithm = "concurrency"
max_in_flight = 10
key = "user"
tiers = ["pro"]
'''


async def test_each_tier_of_a_verified_token_gets_its_own_limit(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url))
    limiter: RateLimiterPlugin = gw.plugin("ratelimiter")
    limiter.clock = lambda: T0 - T0 % 60  # one fixed window for the whole test

    async def call(path: str, bearer: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        async with gw.session.get(gw.proxy_url + path, headers=headers) as r:
            await r.read()
            return r.status, r.headers

    async def burst(path: str, bearer: str | None, n: int) -> list[int]:
        return [(await call(path, bearer))[0] for _ in range(n)]

    pro, free, plain = token("alice", plan="pro"), token("bob", plan="free"), token("carol")
    assert await burst("/api/x", pro, 6) == [200] * 5 + [429]
    assert await burst("/api/x", free, 3) == [200] * 2 + [429]
    assert await burst("/api/x", plain, 3) == [200] * 2 + [429]  # no claim: default tier
    # a second pro user has a pro allowance of their own (key = "user": the JWT's sub)
    status, headers = await call("/api/x", token("dave", plan="pro"))
    assert status == 200
    assert headers["RateLimit-Policy"] == '"pro";q=5;w=60'
    assert headers["X-RateLimit-Remaining"] == "4"
    status, headers = await call("/api/x", pro)
    assert status == 429 and headers["RateLimit"].startswith('"pro";r=0')
    # a forged tier claim is refused by the auth plugin before the limiter counts it
    forged = token("erin", plan="pro")[:-4] + "AAAA"
    assert (await call("/api/x", forged))[0] == 401
    # anonymous requests on a route without auth: the default tier, keyed by IP
    assert await burst("/open/x", None, 3) == [200] * 2 + [429]

    async with gw.session.get(gw.admin_url + "/ratelimiter/usage") as r:
        rows = {(row["limit"], row["key"]): row for row in (await r.json())["usage"]}
    assert rows[("pro", "sub:alice")]["used"] == 5
    assert rows[("pro", "sub:alice")]["rejections"] == 2
    assert rows[("pro", "sub:dave")]["used"] == 1
    assert rows[("free", "sub:bob")]["used"] == 2
    assert rows[("free", "sub:carol")]["used"] == 2
    assert rows[("free", "ip:127.0.0.1")]["used"] == 2
    assert ("free", "sub:erin") not in rows and ("pro", "sub:erin") not in rows
    # every admitted pro request gave its in-flight slot back
    slots = limiter.current().limits["pro-in-flight"].limiter
    await wait_until(lambda: slots.in_flight == {}, message="the pro slots to be given back")
