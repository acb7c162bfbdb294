"""Cluster mode on a private Redis: definitions shared by every node through the
Redis backend, membership, and what a node does while Redis is paused, killed or
not there at all. Real ``redis-server`` and ``lucid serve`` processes on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from lucid.cluster import Cluster, RedisBackend, redact_url
from lucid.config import ClusterConfig, ConfigError
from lucid.definitions import BackendUnavailable, Conflict, PreconditionFailed, Write
from lucid.testing import json_request, run_lucid, wait_until, write_config


def node_config(backend: str, upstream: str, extra: str = "") -> str:
    return f"""
[cluster]
backend = "{backend}"

[gateway.services.svc]
instances = ["{upstream}"]

[[gateway.routes]]
id = "static"
prefix = "/static"
service = "svc"
retries = {{ attempts = 1 }}

[monitoring]
{extra}
"""


async def get(session: aiohttp.ClientSession, url: str, **kw: object) -> tuple[int, object]:
    return await json_request(session, "GET", url, **kw)


# ---------------------------------------------------------------------------
# the Redis backend itself, in this process
# ---------------------------------------------------------------------------

async def backend_on(url: str, prefix: str = "lucid:") -> tuple[Cluster, RedisBackend]:
    cluster = Cluster(ClusterConfig(backend=url, key_prefix=prefix), "test")
    await cluster.start()
    return cluster, RedisBackend(cluster)


async def test_commits_bump_one_revision_and_refuse_what_moved_on(lucid_redis):
    server = lucid_redis()
    (c1, one), (c2, two) = await backend_on(server.url), await backend_on(server.url)
    try:
        assert (await one.load()).revision == 0
        first = await one.commit([Write("limit", "a", {"rate": "1/s"})], 0,
                                 {("limit", "a"): None})
        assert first.revision == 1 and first.get("limit", "a").revision == 1
        # the other node validated against revision 0: refused, it must look again
        with pytest.raises(PreconditionFailed):
            await two.commit([Write("limit", "b", {"rate": "2/s"})], 0, {})
        seen = await two.load()
        assert seen.revision == 1 and seen.get("limit", "a").body == {"rate": "1/s"}
        second = await two.commit([Write("limit", "a", {"rate": "3/s"})], 1,
                                  {("limit", "a"): 1})
        assert second.revision == 2 and second.get("limit", "a").revision == 2
        with pytest.raises(PreconditionFailed):  # If-Match on the old revision
            await one.commit([Write("limit", "a", {"rate": "4/s"})], 2, {("limit", "a"): 1})
        with pytest.raises(Conflict):
            await one.commit([Write("limit", "a", {"rate": "4/s"})], 2, {("limit", "a"): None})
        gone = await one.commit([Write("limit", "a", None)], 2, {("limit", "a"): 2})
        assert gone.revision == 3 and gone.get("limit", "a") is None
        assert await two.revision() == 3 and not (await two.load()).items
    finally:
        await c1.close()
        await c2.close()


async def test_key_prefixes_keep_clusters_apart_and_a_dead_redis_is_a_503(lucid_redis):
    server = lucid_redis()
    (ca, a), (cb, b) = (await backend_on(server.url, "one:"),
                        await backend_on(server.url, "two:"))
    try:
        await a.commit([Write("route", "r", {"prefix": "/"})], 0, {})
        assert (await b.load()).revision == 0
        assert ca.key("nodes") == "one:nodes"
        server.kill()
        with pytest.raises(BackendUnavailable) as refused:
            await a.commit([Write("route", "s", {"prefix": "/s"})], 1, {})
        assert refused.value.status == 503 and server.url.rsplit("/", 1)[0] in \
            refused.value.message
        assert not ca.up
    finally:
        await ca.close()
        await cb.close()


def test_the_backend_url_is_checked_and_its_password_never_shown(tmp_path):
    with pytest.raises(ValueError):
        ClusterConfig(backend="http://127.0.0.1:6379")
    assert redact_url("rediss://lucid:s3cret-pw@redis.example:6380/0") == \
        "rediss://lucid:***@redis.example:6380/0"
    assert redact_url(":s3cret-pw@x") == ":s3cret-pw@x"  # not a URL: as it is
    path = write_config("", tmp_path)
    secret_url = "redis://lucid:s3cret-pw@127.0.0.1:1/0"
    exported = run_lucid("config", "export", "--config", str(path),
                         LUCID_CLUSTER__BACKEND=secret_url)
    assert exported.returncode == 0, exported.stderr
    assert "s3cret-pw" not in exported.stdout
    assert 'backend = "redis://lucid:***@127.0.0.1:1/0"' in exported.stdout
    bad = run_lucid("check", "--config", str(path),
                    LUCID_CLUSTER__BACKEND="redis://lucid:s3cret-pw@127.0.0.1:99999/0")
    assert bad.returncode == 2 and "cluster.backend" in bad.stderr
    assert "s3cret-pw" not in bad.stderr and "LUCID_CLUSTER__BACKEND" in bad.stderr
