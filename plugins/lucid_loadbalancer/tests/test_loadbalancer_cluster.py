"""Load balancing across three ``lucid serve`` nodes on a private Redis: pools written
on one node balance on every node, ring hash and Maglev send each key to the same
instance whichever node it comes through, and an affinity cookie minted by one node
is honoured by the others (one key, made once in Redis)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from lucid.testing import GatewayProcess, json_request, wait_until
from lucid.testing_internal import cluster_node_config

KEYS = [f"user-{n}" for n in range(1000)]


def node_config(backend: str, upstreams: list[str]) -> str:
    instances = ", ".join(f'"{u}"' for u in upstreams)
    services = "\n".join(f"[gateway.services.{name}]\ninstances = [{instances}]\n"
                         for name in ("ring", "mag", "sticky"))
    routes = "\n".join(f'[[gateway.routes]]\nprefix = "/{name}"\nservice = "{name}"\n'
                       for name in ("ring", "mag", "sticky"))
    return cluster_node_config(backend, extra=f"{services}\n{routes}")


def named(name: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text=name)

    return handler


POOLS = [
    {"id": "ring", "service": "ring", "algorithm": "ring_hash", "hash_key": "header:x-key"},
    {"id": "mag", "service": "mag", "algorithm": "maglev", "hash_key": "header:x-key"},
    {"id": "sticky", "service": "sticky", "affinity": {}},
]


async def where(session: aiohttp.ClientSession, node: GatewayProcess, prefix: str,
                keys: list[str]) -> list[str]:
    """The instance each key went to through ``node``."""
    limit = asyncio.Semaphore(16)

    async def one(key: str) -> str:
        async with limit, session.get(node.proxy_url + prefix,
                                      headers={"x-key": key}) as response:
            assert response.status == 200
            return await response.text()

    return list(await asyncio.gather(*(one(k) for k in keys)))


async def test_hashing_and_affinity_agree_on_every_node(
        lucid_redis: Any, lucid_upstream: Any, lucid_process: Any) -> None:
    server = lucid_redis()
    upstreams = [await lucid_upstream(named(f"up{n}")) for n in range(3)]
    config = node_config(server.url, [u.url for u in upstreams])
    started = [lucid_process(config, env={"LUCID_CLUSTER__NODE_ID": f"node-{n}"},
                             wait=False) for n in "abc"]
    a, b, c = nodes = [node.wait_ready(timeout=60) for node in started]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        # pools written on A (the definitions layer) balance on B and C
        for pool in POOLS:
            status, body = await json_request(session, "POST",
                                              a.admin_url + "/loadbalancer/pools", json=pool)
            assert status == 201, body

        async def pools_everywhere() -> bool:
            for node in (b, c):
                _, listed = await json_request(session, "GET",
                                               node.admin_url + "/loadbalancer/pools")
                if sorted(p["id"] for p in listed["pools"]) != ["mag", "ring", "sticky"]:
                    return False
            return True

        await wait_until(pools_everywhere, timeout=10, message="pools on B and C")

        # the same 1,000 keys through each node: the same instance for each key
        # (all six streams at once: the nodes are separate processes)
        ring_a, ring_b, ring_c, mag_a, mag_b, mag_c = await asyncio.gather(*(
            where(session, node, prefix, KEYS) for prefix in ("/ring", "/mag")
            for node in nodes))
        assert ring_a == ring_b == ring_c and mag_a == mag_b == mag_c
        assert set(ring_a) == set(mag_a) == {"up0", "up1", "up2"}  # spread over all three

        # an affinity cookie minted by any node pins the client on every node
        for minter in nodes:
            for _ in range(3):  # round robin: three different first picks
                async with session.get(minter.proxy_url + "/sticky") as first:
                    pinned = await first.text()
                    cookie = first.cookies["lucid_affinity"].value
                for node in nodes:
                    for _ in range(4):
                        async with session.get(node.proxy_url + "/sticky",
                                               headers={"cookie": f"lucid_affinity={cookie}"}
                                               ) as again:
                            assert await again.text() == pinned
