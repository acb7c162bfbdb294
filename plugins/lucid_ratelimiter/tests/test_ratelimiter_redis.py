"""Limits counted in Redis (a Redis ``[cluster]`` backend): the script decides exactly as
the in-memory algorithms do, limits count once across gateways, and a Redis that stops
answering degrades as ``on_backend_failure`` says. A private ``redis-server`` per test.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from lucid_ratelimiter.algorithms import ALGORITHMS
from lucid_ratelimiter.redis_store import MICRO, SharedLimits, state_key

from lucid.cluster import Cluster
from lucid.config import ClusterConfig
from lucid.testing import json_request, run_gateway, wait_until

ALGORITHM_CASES = [  # (algorithm, count, period, capacity)
    ("token_bucket", 5, 0.5, 8),
    ("fixed_window", 7, 0.5, 7),
    ("sliding_window", 6, 0.5, 6),
    ("sliding_log", 6, 0.5, 6),
    ("concurrency", 4, 0.0, 4),
]


@pytest.mark.parametrize(("algorithm", "count", "period", "capacity"), ALGORITHM_CASES)
async def test_the_script_decides_as_the_algorithm_in_memory(lucid_redis, algorithm, count,
                                                             period, capacity):
    """Random costs at random moments over some 2.5 periods: for every decision, Redis's
    answer (admitted or not, remaining, reset, retry after) equals the in-memory
    algorithm's for the same key, cost and Redis time (to 10 µs: the algorithm in
    memory counts in float seconds since the epoch, ~0.2 µs apart, Redis in µs)."""
    server = lucid_redis()
    cluster = Cluster(ClusterConfig(backend=server.url), "test")
    await cluster.start()
    shared = SharedLimits(cluster, lease_seconds=30.0)
    local = ALGORITHMS[algorithm](count, period, capacity, 1000)
    rng = random.Random(7)
    try:
        for _ in range(60):
            cost = rng.choice((1, 1, 1, 2, 3))
            lease = shared.lease_id(cost) if algorithm == "concurrency" else ""
            args = shared.params(algorithm, cost, count, period, capacity, lease, "rej", "k")
            reply = await shared.run([("d", args, ["lim:k"])])
            now, (refused, remaining, reset, retry) = reply[0] / MICRO, reply[1]
            expected = local.hit("k", cost, now)
            assert (refused == 0) == (expected >= 0), (now, cost)
            if expected >= 0:
                assert remaining == expected
                assert reset / MICRO == pytest.approx(local.reset, abs=1e-5)
            else:
                assert retry / MICRO == pytest.approx(local.retry_after, abs=1e-5)
                assert reset / MICRO == pytest.approx(local.reset, abs=1e-5)
            usage = await shared.run([("u", args, ["lim:k"])])
            used, left = usage[1]
            assert (used, left / MICRO) == pytest.approx(local.usage("k", usage[0] / MICRO),
                                                         abs=1e-5)
            if algorithm == "concurrency" and expected >= 0 and rng.random() < 0.5:
                await shared.run([("r", args, ["lim:k"])])
                local.release("k", cost)
            await asyncio.sleep(rng.random() * period / 12 if period else 0.001)
    finally:
        await cluster.close()


@pytest.mark.parametrize(("algorithm", "count", "period", "capacity"), [
    ("token_bucket", 20, 0.5, 30), ("fixed_window", 25, 0.5, 25)])
async def test_slices_are_counted_as_that_many_requests_and_given_back(
        lucid_redis, algorithm, count, period, capacity):
    """``sync = "lease"``'s script ops: a slice of ``n`` is ``n`` requests to the
    algorithm in memory at the same Redis time (so a slice never takes more than is
    left), at least the cost, at most ``want`` and what is left ÷ the divisor; a refusal
    has the in-memory retry after; giving ``u`` back is a refund of ``u``."""
    server = lucid_redis()
    cluster = Cluster(ClusterConfig(backend=server.url), "test")
    await cluster.start()
    shared = SharedLimits(cluster, lease_seconds=30.0)
    local = ALGORITHMS[algorithm](count, period, capacity, 1000)
    rng = random.Random(3)
    granted_total = refused = 0
    try:
        for _ in range(80):
            cost, want, divisor = rng.choice((1, 1, 2)), rng.choice((1, 4, 16)), rng.choice((1, 4))
            args = shared.params(algorithm, cost, count, period, capacity, f"{want}:{divisor}",
                                 "rej", "k")
            reply = await shared.run([("l", args, ["lim:{k}"])])
            now = reply[0] / MICRO
            granted, remaining, reset, retry, mark = reply[1]
            left = local.usage("k", now)
            avail = (capacity if algorithm == "token_bucket" else count) - left[0]
            if granted:
                assert granted == max(cost, min(want, avail // divisor)), (avail, want, divisor)
                assert local.hit("k", granted, now) == remaining >= 0
                assert reset / MICRO == pytest.approx(local.reset, abs=1e-5)
                granted_total += granted
                if algorithm == "fixed_window":
                    assert mark / MICRO == pytest.approx(local.window, abs=1e-5)
                unused = rng.choice((0, 0, granted // 2))
                if unused:
                    args[5] = f"{unused}:{mark}"
                    await shared.run([("g", args, ["lim:{k}"])])
                    local.refund("k", unused, now)
            else:
                refused += 1
                assert local.hit("k", cost, now) < 0, (now, cost)
                assert retry / MICRO == pytest.approx(local.retry_after, abs=1e-5)
            await asyncio.sleep(rng.random() * period / 15)
        assert granted_total and refused
    finally:
        await cluster.close()


async def test_what_a_share_admitted_during_an_outage_is_charged_to_redis(lucid_redis):
    """The ``c`` op (Redis is back): a token bucket's TAT moves at least as far ahead as
    the share's (never back), capped at a full bucket; a fixed window counts the
    share's admissions only in the window they were made in."""
    server = lucid_redis()
    cluster = Cluster(ClusterConfig(backend=server.url), "test")
    await cluster.start()
    shared = SharedLimits(cluster, lease_seconds=30.0)
    try:
        bucket = shared.params("token_bucket", 0, 10, 60.0, 10, "", "", "b")
        usage = [("u", bucket, ["lim:{b}"])]
        charge = [("c", [*bucket[:5], f"{30 * MICRO}:0", "", ""], ["lim:{b}"])]
        await shared.run(charge)  # 30 s ahead at 10/min: 5 used
        assert (await shared.run(usage))[1][0] == 5
        charge[0][1][5] = f"{6 * MICRO}:0"  # less than Redis has: no change
        await shared.run(charge)
        assert (await shared.run(usage))[1][0] == 5
        charge[0][1][5] = f"{3600 * MICRO}:0"  # more than a bucket: full, not beyond
        await shared.run(charge)
        assert (await shared.run(usage))[1][0] == 10

        window = shared.params("fixed_window", 0, 10, 3600.0, 10, "", "", "w")
        now = (await shared.run([]))[0]
        mark = now - now % (3600 * MICRO)
        charge = [("c", [*window[:5], f"3:{mark}", "", ""], ["lim:{w}"])]
        await shared.run(charge)
        await shared.run(charge)
        assert (await shared.run([("u", window, ["lim:{w}"])]))[1][0] == 6
        charge[0][1][5] = f"3:{mark - 3600 * MICRO}"  # the window before: not this one
        await shared.run(charge)
        assert (await shared.run([("u", window, ["lim:{w}"])]))[1][0] == 6
    finally:
        await cluster.close()


# ---------------------------------------------------------------------------
# through gateways: two on one Redis, against one counting in memory
# ---------------------------------------------------------------------------

STACKED = '''
[[ratelimiter.limits]]
id = "tenant"
rate = "1/m"
burst = 4
key = "header"
header = "x-tenant"

[[ratelimiter.limits]]
id = "log"
rate = "5/m"
algorithm = "sliding_log"
key = "header"
header = "x-tenant"

[[ratelimiter.limits]]
id = "daily"
rate = "9/day"
algorithm = "fixed_window"
'''


def gateway_config(upstream: str, limits: str, backend: str = "local",
                   extra: str = "", timeout: str = "1s") -> str:
    """A gateway; Redis calls may take ``timeout`` (the 50 ms default trips the breaker
    when this shared machine stalls, and these tests count exactly)."""
    return f'''
[cluster]
backend = "{backend}"
heartbeat = "200ms"
timeout = "{timeout}"

[gateway.services.svc]
instances = ["{upstream}"]

[[gateway.routes]]
id = "heavy"
prefix = "/heavy"
service = "svc"
plugins = {{ ratelimiter = {{ cost = 2 }} }}

[[gateway.routes]]
id = "main"
prefix = "/"
service = "svc"

[ratelimiter]
{extra}
{limits}
'''


async def call(gw, path: str, tenant: str) -> tuple[int, dict[str, str]]:
    async with gw.session.get(gw.proxy_url + path, headers={"x-tenant": tenant}) as r:
        await r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}


def timeless(headers: dict[str, str]) -> dict[str, str]:
    """The rate limit headers, without what depends on the moment (reset, retry)."""
    out = {k: v for k, v in headers.items()
           if k.startswith(("ratelimit", "x-ratelimit")) and k != "x-ratelimit-reset"}
    if "ratelimit" in out:
        out["ratelimit"] = out["ratelimit"].rsplit(";t=", 1)[0]
    return out


async def test_stacked_limits_costs_and_headers_as_in_memory_counted_once_for_two_gateways(
        lucid_redis, lucid_upstream, lucid_gateway):
    """The same requests, alternating between two gateways on one Redis, get exactly
    the statuses and headers one gateway counting in memory gives them: three stacked
    limits (token bucket, sliding log, fixed window), a route costing 2, two tenants."""
    server = lucid_redis()
    upstream = await lucid_upstream()
    local = await lucid_gateway(gateway_config(upstream.url, STACKED))
    a = await lucid_gateway(gateway_config(upstream.url, STACKED, server.url))
    b = await lucid_gateway(gateway_config(upstream.url, STACKED, server.url))
    plan = [("/x", "acme"), ("/heavy", "acme"), ("/x", "beta"), ("/x", "acme"),
            ("/heavy", "beta"), ("/x", "acme"), ("/x", "beta"), ("/heavy", "acme"),
            ("/x", "beta"), ("/x", "gamma"), ("/x", "gamma"), ("/heavy", "beta"),
            ("/x", "gamma")]
    statuses = []
    for n, (path, tenant) in enumerate(plan):
        expected = await call(local, path, tenant)
        got = await call((a, b)[n % 2], path, tenant)
        assert got[0] == expected[0], (n, path, tenant, got, expected)
        assert timeless(got[1]) == timeless(expected[1]), (n, path, tenant)
        if got[0] == 429:
            assert got[1]["retry-after"] == pytest.approx(expected[1]["retry-after"], abs=1)
        statuses.append(got[0])
    assert 200 in statuses and 429 in statuses
    # the usage report of either gateway: every key of every limit, as in memory
    reports = []
    for gw in (local, a, b):
        status, usage = await json_request(gw.session, "GET",
                                           gw.admin_url + "/ratelimiter/usage")
        assert status == 200
        reports.append(sorted((r["limit"], r["key"], r["used"], r["remaining"],
                               r["rejections"]) for r in usage["usage"]))
    assert reports[0] == reports[1] == reports[2]
    assert {row[0] for row in reports[0]} == {"tenant", "log", "daily"}
    status, answer = await json_request(a.session, "POST",
                                        a.admin_url + "/ratelimiter/usage/reset",
                                        json={"key": "127.0.0.1", "limit": "daily"})
    assert status == 200 and answer["limits"] == ["daily"]
    status, usage = await json_request(b.session, "GET",
                                       b.admin_url + "/ratelimiter/usage?limit=daily")
    assert usage["usage"] == []
    status, backend = await json_request(a.session, "GET", a.admin_url + "/ratelimiter/status")
    assert backend["backend"]["kind"] == "redis" and backend["backend"]["up"] is True
    assert backend["backend"]["decisions"] >= len(plan) // 2


async def test_concurrency_counts_cluster_wide_and_a_lost_lease_expires(
        lucid_redis, lucid_upstream, lucid_gateway):
    """Two requests held on gateway A fill max_in_flight = 2 for gateway B too; when
    they end, B admits. A lease nobody renews (its holder gone) expires by itself."""
    from aiohttp import web

    server = lucid_redis()
    gate = asyncio.Event()
    arrived = []

    async def held(request: web.Request) -> web.Response:
        arrived.append(request.path)
        await gate.wait()
        return web.json_response({"ok": True})

    upstream = await lucid_upstream(held)
    limits = '''
[[ratelimiter.limits]]
id = "conc"
algorithm = "concurrency"
max_in_flight = 2
key = "global"
'''
    a = await lucid_gateway(gateway_config(upstream.url, limits, server.url,
                                           'concurrency_lease = "1s"'))
    b = await lucid_gateway(gateway_config(upstream.url, limits, server.url,
                                           'concurrency_lease = "1s"'))
    first = [asyncio.create_task(call(a, "/x", "t")) for _ in range(2)]
    await wait_until(lambda: len(arrived) == 2, message="A's two requests upstream")
    status, headers = await call(b, "/x", "t")
    assert status == 429 and headers["retry-after"] == "1"
    # the slots outlive the 1 s lease while their requests run: A renews them
    await asyncio.sleep(1.5)
    assert (await call(b, "/x", "t"))[0] == 429
    gate.set()
    assert [s for s, _ in await asyncio.gather(*first)] == [200, 200]
    shared = a.plugin("ratelimiter").shared
    state = state_key(a.plugin("ratelimiter").current().limits["conc"].shared_prefix, "*")

    async def released() -> bool:  # releases travel in a later batch, unawaited
        args = shared.params("concurrency", 0, 2, 0, 2, "", "", "*")
        return (await shared.run([("u", args, [state])]))[1][0] == 0

    await wait_until(released, timeout=5, message="every slot given back")
    assert (await call(b, "/x", "t"))[0] == 200
    await wait_until(released, timeout=5, message="B's slot given back")
    # a lease taken by a holder that never renews nor releases it (a killed node)
    for _ in range(2):
        args = shared.params("concurrency", 1, 2, 0, 2, f"gone:{_}:1", "rej", "*")
        reply = await shared.run([("d", args, [state])])
        assert reply[1][0] == 0
    gate.clear()
    assert (await call(b, "/x", "t"))[0] == 429

    async def back() -> bool:
        return (await call(b, "/x", "t"))[0] != 429

    gate.set()
    await wait_until(back, timeout=5, message="the dead holder's slots back")


@pytest.mark.parametrize("mode", ["local", "open", "closed"])
async def test_a_stopped_redis_degrades_as_configured_and_counting_resumes(
        lucid_redis, lucid_upstream, lucid_gateway, mode):
    """Redis SIGSTOPped: the breaker opens, decisions follow on_backend_failure
    (local: limit ÷ the two live gateways each, starting from what Redis last said
    of the key; open: admit; closed: 503), each one counted in /ratelimiter/status;
    once Redis answers, what was admitted locally counts in it and counting is exact
    again: the cluster never admits the same allowance twice."""
    server = lucid_redis()
    upstream = await lucid_upstream()
    limits = '''
[[ratelimiter.limits]]
id = "daily"
rate = "20/day"
algorithm = "fixed_window"
key = "header"
header = "x-tenant"
'''
    extra = f'on_backend_failure = "{mode}"'
    a = await lucid_gateway(gateway_config(upstream.url, limits, server.url, extra, "250ms"))
    b = await lucid_gateway(gateway_config(upstream.url, limits, server.url, extra, "250ms"))
    tenant = f"t-{mode}"
    for gw in (a, b, a, b):
        assert (await call(gw, "/x", tenant))[0] == 200

    async def both_seen() -> bool:
        return a.plugin("ratelimiter").processes == 2 and b.plugin("ratelimiter").processes == 2

    await wait_until(both_seen, message="each gateway seeing two live processes")
    server.pause()
    try:
        async def degraded() -> bool:
            status, report = await json_request(a.session, "GET",
                                                a.admin_url + "/ratelimiter/status")
            return status == 200 and report["backend"]["up"] is False

        first = await call(a, "/x", tenant)  # the call that finds Redis stopped
        await wait_until(degraded, timeout=1, message="the breaker open within 1 s")
        statuses = [first[0]] + [(await call(gw, "/x", tenant))[0]
                                 for gw in (a, b) for _ in range(14)]
        if mode == "local":  # 20 // 2 each, of which Redis said 4 were used: 16
            assert statuses.count(200) == 16 and set(statuses) == {200, 429}
        elif mode == "open":
            assert set(statuses) == {200}
        else:
            assert set(statuses) == {503}
        status, report = await json_request(a.session, "GET",
                                            a.admin_url + "/ratelimiter/status")
        counted = report["backend"]["degraded"]
        assert counted[mode] >= 14 and sum(counted.values()) == counted[mode]
    finally:
        server.resume()

    async def exact_again() -> bool:
        return a.plugin("ratelimiter").shared.closed and b.plugin("ratelimiter").shared.closed

    await wait_until(exact_again, timeout=5, message="counting in Redis again")
    # Redis kept the 4 counted before the outage: 16 left, whichever gateway asks;
    # 15 if the decision sent as Redis stopped (answered locally after the timeout)
    # ran when it resumed: counted, never admitted twice. In local mode the 16
    # admitted meanwhile were charged to Redis on its return: none left.
    statuses = [(await call(gw, "/x", tenant))[0] for gw in (a, b) for _ in range(10)]
    if mode == "local":
        assert set(statuses) == {429}
    else:
        assert statuses.count(200) in (15, 16) and set(statuses) == {200, 429}


LEASED = '''
[[ratelimiter.limits]]
id = "bucket"
rate = "1/m"
burst = 12
key = "header"
header = "x-tenant"
sync = "lease"

[[ratelimiter.limits]]
id = "daily"
rate = "7/day"
algorithm = "fixed_window"
key = "header"
header = "x-day"
sync = "lease"
routes = ["heavy"]
'''


async def test_lease_slices_never_admit_beyond_the_limit_and_go_back_unspent(
        lucid_redis, lucid_upstream, lucid_gateway, tmp_path):
    """``sync = "lease"`` on two gateways: each spends slices of the allowance taken
    from Redis, so together they admit exactly the burst (never more) with fewer
    script calls than requests; a refusal's Retry-After is the limit's; the unspent
    part of a slice goes back to Redis when it expires (1 s), so the usage report
    counts only what was admitted; a gateway that stops gives its slices back."""
    server = lucid_redis()
    upstream = await lucid_upstream()
    # 5 s Redis timeouts: a stall of this shared machine must not open a breaker
    # (decisions would then be local shares, and these counts are exact)
    a = await lucid_gateway(gateway_config(upstream.url, LEASED, server.url, timeout="5s"))
    b = await lucid_gateway(gateway_config(upstream.url, LEASED, server.url, timeout="5s"))
    answers = [await call((a, b)[n % 2], "/x", "acme") for n in range(30)]
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == 12 and set(statuses) == {200, 429}
    refusal = next(headers for status, headers in answers if status == 429)
    assert 50 <= int(refusal["retry-after"]) <= 60
    assert refusal["x-ratelimit-remaining"] == "0"
    first = answers[0][1]  # what this worker holds plus what Redis had left
    assert first["ratelimit-policy"] == '"bucket";q=12;w=60'
    assert 0 <= int(first["x-ratelimit-remaining"]) <= 11
    # the fixed window costs 2 a request on /heavy: 3 admitted of 7, whoever asks
    heavy = [(await call((a, b)[n % 2], "/heavy", "beta"))[0] for n in range(6)]
    assert heavy.count(200) == 3, heavy
    calls = 0
    for gw in (a, b):
        status, report = await json_request(gw.session, "GET",
                                            gw.admin_url + "/ratelimiter/status")
        calls += report["backend"]["script_calls"]
    assert calls < len(statuses) + len(heavy)

    # one request takes a slice (more than itself) from a fresh key; within a
    # second the rest goes back, and Redis counts 1 used
    assert (await call(a, "/x", "gamma"))[0] == 200

    async def usage(key: str = "h:gamma") -> int:
        status, report = await json_request(
            b.session, "GET", b.admin_url + f"/ratelimiter/usage?limit=bucket&key={key}")
        return report["usage"][0]["used"] if report["usage"] else 0

    assert await usage() > 1  # the slice is counted in Redis while a holds it

    async def given_back() -> bool:
        return await usage() == 1

    await wait_until(given_back, timeout=10, message="the unspent slice back in Redis")
    # (an open breaker would drop slices rather than give them back)
    async with run_gateway(gateway_config(upstream.url, LEASED, server.url, timeout="5s"),
                           tmp_path / "c") as c:
        assert (await call(c, "/x", "delta"))[0] == 200
        assert await usage("h:delta") > 1
    assert await usage("h:delta") == 1


async def test_a_slice_still_being_taken_is_not_dropped_by_the_sweep(
        lucid_redis, lucid_upstream, lucid_gateway):
    """The worker's periodic give-back drops slices idle for a while; a slice made a
    moment ago, whose tokens Redis has not granted yet, looked idle to it. Dropped
    then, what Redis granted was held by nobody (not spent, not given back) until
    its window ended: two gateways admitted 8 of a burst of 12 on a loaded machine.
    Here Redis is stopped while the first request of a key waits for its slice, and
    the sweep runs meanwhile."""
    server = lucid_redis()
    upstream = await lucid_upstream()
    a = await lucid_gateway(gateway_config(upstream.url, LEASED, server.url, timeout="5s"))
    plugin = a.plugin("ratelimiter")
    bucket = plugin.current().limits["bucket"]
    server.pause()
    try:
        request = asyncio.ensure_future(call(a, "/x", "epsilon"))

        async def waiting_for_its_slice() -> bool:
            piece = bucket.slices.get("h:epsilon")
            return piece is not None and piece.taking > 0

        await wait_until(waiting_for_its_slice, message="the request waiting for Redis")
        plugin._give_back(plugin.current().limits.values())  # the watcher's sweep
        assert "h:epsilon" in bucket.slices
    finally:
        server.resume()
    status, headers = await request
    assert status == 200
    assert 0 <= int(headers["x-ratelimit-remaining"]) <= 11  # said from the slice
    held = bucket.slices["h:epsilon"].tokens
    assert held >= 1  # the rest of the slice, this worker's to spend

    async def usage() -> int:
        status, report = await json_request(
            a.session, "GET", a.admin_url + "/ratelimiter/usage?limit=bucket&key=h:epsilon")
        return report["usage"][0]["used"] if report["usage"] else 0

    assert await usage() == 1 + held

    async def given_back() -> bool:
        return await usage() == 1

    await wait_until(given_back, timeout=10, message="the unspent slice back in Redis")
