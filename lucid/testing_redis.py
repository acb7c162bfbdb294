"""A private ``redis-server`` for cluster tests, on a free loopback port.

Fault tests (``SIGSTOP``, ``kill -9``, restart) must never touch a Redis that other
tests or other people share, so each test gets its own server process, with no
persistence unless it asks for ``appendonly``. The pytest fixture is
``lucid_redis``: ``server = lucid_redis(appendonly=True)``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lucid.testing_internal import debian_tool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` on ``127.0.0.1:<port>`` with its files in ``directory``.

    ``appendonly`` turns on the append-only file with ``appendfsync always``: every
    write a client saw acknowledged is on disk, so it survives ``kill -9``."""

    def __init__(self, directory: Path, appendonly: bool = False, port: int | None = None):
        self.directory = directory
        self.appendonly = appendonly
        self.port = port or free_port()
        self.binary = debian_tool("redis-server", "redis-server")
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it (again, on the same port and files) and wait until it answers."""
        persistence = (["--appendonly", "yes", "--appendfsync", "always"]
                       if self.appendonly else ["--appendonly", "no"])
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", *persistence, "--dir", str(self.directory),
             "--daemonize", "no", "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.paused = False
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log")
                raise AssertionError(f"redis-server exited {self.proc.returncode}:\n"
                                     + (log.read_text() if log.exists() else ""))
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        """Whether it answers PING now (a plain socket: no client library needed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """``kill -9``: no shutdown, no final save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.paused = False

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


try:
    import pytest
except ImportError:  # pragma: no cover - the server above works without pytest
    pass
else:

    @pytest.fixture
    def lucid_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
        """Factory: ``lucid_redis(appendonly=False)`` starts a private ``redis-server``
        on a free port; every one started is stopped after the test."""
        started: list[RedisServer] = []

        def factory(appendonly: bool = False) -> RedisServer:
            server = RedisServer(tmp_path / f"redis{len(started)}", appendonly)
            started.append(server)
            return server.start()

        yield factory
        for server in started:
            server.stop()
