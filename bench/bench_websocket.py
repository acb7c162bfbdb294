"""WebSocket proxying: Lucid (each engine) against a bare TCP relay, the floor.

One command starts a WebSocket echo upstream (aiohttp on uvloop, its own process),
the floor (a bare byte pump on uvloop in its own process: accept, connect to the
upstream, copy both ways with back-pressure; what any proxy hop costs at least) and
``lucid serve`` on the fast and on the Hypercorn engine, then drives each target in
turn, and the upstream directly as a reference, from this process:

- **chat**: ``--connections`` sessions, each sending a ``--size``-byte text message
  and waiting for its echo, for ``--duration`` seconds: round trips/s;
- **bulk**: one session echoing ``--bulk`` MiB in 1 MiB binary messages (all sent
  while the echoes are read): MiB/s each way.

A row "hypercorn echo" is an ASGI echo app on Hypercorn with no upstream at all: a
ceiling for Lucid on Hypercorn, which cannot reach the client's socket and so has to
take every message through Hypercorn's own framing and ASGI queue. (Measured on the
shared 2-core machine: Hypercorn alone about 0.64x the floor, Lucid on Hypercorn about
0.27x, Lucid on the fast engine 0.93-1.0x.)

Targets are measured in interleaved rounds (``--rounds``), the median kept, and each
Lucid row reported as a ratio to the floor measured in the same run.

    python bench/bench_websocket.py [--duration 5] [--connections 20] [--size 64]
                                    [--bulk 64] [--rounds 3]
                                    [--json bench/results/websocket.json]

All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import WSMsgType, web

from lucid.testing import GatewayProcess, write_config

MIB = 1024 * 1024


# -- the upstream and the floor, each run as ``--serve-upstream`` / ``--serve-floor``

async def serve_upstream(port: int) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def serve_hypercorn_echo(port: int) -> None:
    """An ASGI echo on Hypercorn, no upstream: the most Lucid on Hypercorn could do,
    since Hypercorn frames every client message itself (the bridge's ceiling)."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        while True:
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
            elif message["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": message.get("text"),
                            "bytes": message.get("bytes")})
            else:
                return

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.websocket_max_message_size = 64 * MIB
    await serve(app, config)  # type: ignore[arg-type]


class _Pump(asyncio.Protocol):
    """One side of the floor's relay: bytes to the peer, reading paused while the
    peer's write buffer is full."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.peer: _Pump | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


async def serve_floor(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()

    class Client(_Pump):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            loop.create_task(self.connect())

        async def connect(self) -> None:
            _, upstream = await loop.create_connection(_Pump, "127.0.0.1", upstream_port)
            upstream.peer, self.peer = self, upstream
            for data in self.early:
                upstream.transport.write(data)
            self.early.clear()

    server = await loop.create_server(Client, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


# -- the load

async def chat(url: str, connections: int, size: int, duration: float) -> float:
    """Round trips per second over ``connections`` sessions."""
    text = "x" * size
    counts = [0] * connections
    deadline = time.monotonic() + duration

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        async with session.ws_connect(url, compress=0) as ws:
            while time.monotonic() < deadline:
                await ws.send_str(text)
                message = await ws.receive()
                assert message.type == WSMsgType.TEXT, message
                counts[i] += 1

    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        await asyncio.gather(*(one(session, i) for i in range(connections)))
        return sum(counts) / (time.monotonic() - started)


async def bulk(url: str, mib: int) -> float:
    """MiB/s echoed through one session (each MiB goes both ways)."""
    payload = os.urandom(MIB)
    async with aiohttp.ClientSession() as session, session.ws_connect(
            url, max_msg_size=0, compress=0) as ws:
        started = time.monotonic()

        async def send() -> None:
            for _ in range(mib):
                await ws.send_bytes(payload)

        sender = asyncio.ensure_future(send())
        for _ in range(mib):
            message = await ws.receive()
            assert message.type == WSMsgType.BINARY and len(message.data) == MIB
        await sender
        return mib / (time.monotonic() - started)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout} s")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bulk", type=int, default=64, help="MiB echoed in the bulk test")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench/results/websocket.json")
    args = parser.parse_args(argv)

    upstream_port, floor_port, echo_port = free_port(), free_port(), free_port()
    me = [sys.executable, __file__]
    children = [subprocess.Popen([*me, "--serve-upstream", str(upstream_port)]),
                subprocess.Popen([*me, "--serve-floor", str(floor_port), str(upstream_port)]),
                subprocess.Popen([*me, "--serve-hypercorn-echo", str(echo_port)])]
    gateways: list[GatewayProcess] = []
    try:
        wait_port(upstream_port)
        wait_port(floor_port)
        wait_port(echo_port)
        targets = {"upstream (direct)": f"ws://127.0.0.1:{upstream_port}/ws",
                   "hypercorn echo": f"ws://127.0.0.1:{echo_port}/ws",
                   "floor (bare relay)": f"ws://127.0.0.1:{floor_port}/ws"}
        for engine in ("fast", "hypercorn"):
            directory = Path(tempfile.mkdtemp(prefix=f"lucid-ws-{engine}-"))
            config = f"""
[gateway.services.echo]
instances = ["http://127.0.0.1:{upstream_port}"]
[[gateway.routes]]
id = "ws"
prefix = "/ws"
service = "echo"
"""
            path = write_config(config, directory, engine=engine)
            gateway = GatewayProcess(path).wait_ready()
            gateways.append(gateway)
            targets[f"lucid {engine}"] = gateway.proxy_url.replace("http://", "ws://") + "/ws"
        results: dict[str, dict[str, list[float]]] = {
            name: {"chat": [], "bulk": []} for name in targets}
        for _ in range(args.rounds):
            for name, url in targets.items():
                results[name]["chat"].append(
                    await chat(url, args.connections, args.size, args.duration))
                results[name]["bulk"].append(await bulk(url, args.bulk))
    finally:
        for gateway in gateways:
            gateway.stop()
        for child in children:
            child.terminate()
            child.wait(10)

    floor = results["floor (bare relay)"]
    rows = []
    print(f"{'target':<20} {'chat round trips/s':>19} {'x floor':>8} "
          f"{'bulk MiB/s':>11} {'x floor':>8}")
    for name, result in results.items():
        chat_rate = statistics.median(result["chat"])
        bulk_rate = statistics.median(result["bulk"])
        chat_ratio = chat_rate / statistics.median(floor["chat"])
        bulk_ratio = bulk_rate / statistics.median(floor["bulk"])
        rows.append({"target": name, "chat_round_trips_per_s": chat_rate,
                     "chat_x_floor": chat_ratio, "bulk_mib_per_s": bulk_rate,
                     "bulk_x_floor": bulk_ratio, "rounds": result})
        print(f"{name:<20} {chat_rate:>19,.0f} {chat_ratio:>8.2f} "
              f"{bulk_rate:>11,.1f} {bulk_ratio:>8.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "websocket", "args": vars(args), "machine": platform.platform(),
        "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    uvloop.install()
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-upstream":
        asyncio.run(serve_upstream(int(sys.argv[2])))
    elif len(sys.argv) > 2 and sys.argv[1] == "--serve-hypercorn-echo":
        asyncio.run(serve_hypercorn_echo(int(sys.argv[2])))
    elif len(sys.argv) > 3 and sys.argv[1] == "--serve-floor":
        asyncio.run(serve_floor(int(sys.argv[2]), int(sys.argv[3])))
    else:
        sys.exit(asyncio.run(main()))
