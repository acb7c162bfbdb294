"""Idle keep-alive connections held by ``lucid serve``, and what each one costs.

Starts a gateway (``--engine``) in front of a small upstream, opens ``--connections``
client connections that each make one request and then stay open idle, and prints
the gateway's RSS before and after, per connection, and whether a new request is
still answered while they are held.

    python bench/bench_connections.py --connections 10000 [--engine fast|hypercorn]

Each side needs a file descriptor per connection: the open-files limit
(``ulimit -n``) of this shell must exceed ``--connections`` (the gateway inherits
it).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil

from lucid.testing import GatewayProcess, write_config
from lucid.testing_http import RawUpstream, answer_ok, read_response


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--engine", default="fast", choices=("fast", "hypercorn"))
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 200
    if hard < need:
        sys.exit(f"the open-files limit is {hard}; {need} are needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    upstream = await RawUpstream(answer_ok).start()
    with tempfile.TemporaryDirectory() as tmp:
        config = f"""
[gateway.services.svc]
instances = ["{upstream.url}"]
[[gateway.routes]]
id = "main"
prefix = "/"
service = "svc"
"""
        path = write_config(config, Path(tmp), engine=args.engine)
        gateway = GatewayProcess(path).wait_ready()
        try:
            return await measure(gateway, args.connections)
        finally:
            gateway.stop()
            await upstream.close()


async def measure(gateway: GatewayProcess, count: int) -> int:
    host, _, port = gateway.proxy_url.removeprefix("http://").rpartition(":")
    process = psutil.Process(gateway.proc.pid)
    request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        response = await asyncio.wait_for(read_response(reader, None), 60)
        assert response.status == 200, response.raw
        return reader, writer

    await one()  # warm: the upstream connection and the first request's allocations
    before = process.memory_info().rss
    started = time.monotonic()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for start in range(0, count, 500):  # in waves, within the listen backlog
        held += await asyncio.gather(*(one() for _ in range(min(500, count - start))))
    opened = time.monotonic() - started
    await asyncio.sleep(1)
    after = process.memory_info().rss
    probe = time.monotonic()
    reader, writer = await one()
    answered = time.monotonic() - probe
    writer.close()
    print(f"{count} idle keep-alive connections held, opened (and one request each) in "
          f"{opened:.1f}s")
    print(f"gateway RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB: "
          f"{(after - before) / count / 1024:.1f} KiB per idle connection")
    print(f"a new connection's request answered in {answered * 1000:.1f} ms meanwhile")
    for _, w in held:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
