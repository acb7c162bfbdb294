"""Access log: one JSON line per request, and a ring buffer of recent requests.

The request path appends one tuple to a list (and to the bounded ring buffer). Every
``FLUSH_INTERVAL`` an asyncio task pickles the whole list and writes it to a writer
process (:mod:`lucid_monitoring.logwriter`), which turns it into JSON lines and writes
them in chunks (stdout or a :class:`~logging.handlers.RotatingFileHandler`). Nothing is
formatted on the request path, nor anywhere in the gateway's process: a writer thread
holds the GIL while it formats, which is time the event loop does not get.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import select
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from itertools import repeat
from operator import add, mul, sub, truediv
from pathlib import Path
from typing import Any

import orjson

from lucid_monitoring.config import AccessLog

log = logging.getLogger("lucid.monitoring")

FIELDS = ("time", "request_id", "route", "service", "instance", "method", "path", "status",
          "duration_ms", "upstream_ms", "bytes_in", "bytes_out", "client_ip", "subject",
          "attempts", "error")


def entry(ex: Any, at: float) -> tuple[Any, ...]:
    """The fields of one exchange, unformatted (cheap: called per request)."""
    identity = ex.identity
    instance = ex.instance
    return (at, ex.request_id, ex.route_id, ex.service, instance.id if instance else "",
            ex.method, ex.path, ex.status, ex.duration, ex.upstream_duration, ex.bytes_in,
            ex.bytes_out, ex.client_ip,
            (identity.get("sub") or identity.get("subject") or "") if identity else "",
            ex.attempts, ex.error)


def records(batch: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """The documented JSON objects of a batch of entries, in :data:`FIELDS` order.

    Converted column by column with ``map()`` over C functions, so no Python bytecode
    runs per line: about four times faster than building each line's dict in Python.
    The writer process shares the machine's cores with the gateway."""
    if not batch:
        return []
    columns: list[Any] = list(zip(*batch, strict=True))
    columns[0] = _times(columns[0])
    columns[8] = _milliseconds(columns[8])
    columns[9] = _milliseconds(columns[9])
    columns[13] = map(str, columns[13])
    return list(map(dict, map(zip, repeat(FIELDS), zip(*columns, strict=True))))


def _times(times: Sequence[float]) -> Iterator[str]:
    """ISO 8601 UTC to the millisecond (truncated), like ``isoformat(timespec=
    "milliseconds")``: each distinct second is formatted once per batch."""
    seconds = list(map(int, times))
    prefix = {s: datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S")
              for s in set(seconds)}
    millis = map(int, map(mul, map(sub, times, seconds), repeat(1000)))
    return map("%s.%03d+00:00".__mod__, zip(map(prefix.__getitem__, seconds), millis,
                                                strict=True))


def _milliseconds(durations: Iterable[float]) -> Iterator[float]:
    """Seconds as milliseconds to the microsecond: ``int(s * 1e6 + 0.5) / 1000``, which
    orjson prints with at most three decimals (``round()`` costs a dtoa per value)."""
    return map(truediv, map(int, map(add, map(mul, durations, repeat(1e6)), repeat(0.5))),
               repeat(1000))


def lines(batch: Sequence[tuple[Any, ...]]) -> bytes:
    """A batch of entries as JSON lines (UTF-8, each ending in a newline), made by one
    ``orjson.dumps`` of the whole list. Splitting its ``[{...},{...}]`` at
    ``},{"time":`` is safe: inside a JSON string every ``"`` is escaped, so an
    unescaped ``{"time":`` only ever starts an object."""
    objects = records(batch)
    if not objects:
        return b""
    try:
        blob = orjson.dumps(objects)
    except TypeError:  # a string orjson refuses (a lone surrogate): line by line
        return b"".join(map(_line, objects))
    return blob[1:-1].replace(b'},{"time":', b'}\n{"time":') + b"\n"


def _line(record: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(record) + b"\n"
    except TypeError:
        return json.dumps(record, ensure_ascii=True).encode() + b"\n"


FLUSH_INTERVAL = 0.2  # seconds between hand-overs to the writer process
MAX_BEHIND = 64 * 2**20  # bytes handed over but not yet read by the writer process


def frame(batch: list[tuple[Any, ...]]) -> bytes:
    """One batch as the writer process reads it: a 4-byte length, then the pickle."""
    try:
        data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - a plugin put an unpicklable "sub" in the identity
        data = pickle.dumps([f[:13] + (str(f[13]),) + f[14:] for f in batch],
                            protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "big") + data


class AccessLogWriter:
    """The access log of one gateway process.

    The request path appends each entry to a list; every ``FLUSH_INTERVAL``
    :meth:`flush` pickles the list and writes it to the stdin of a writer process
    (``python -m lucid_monitoring.logwriter``), which formats the JSON lines and
    writes them to stdout or a rotating file. The gateway's event loop spends about
    0.2 µs per line on the hand-over instead of 2.5 µs formatting and writing it
    under the GIL, and the formatting runs on another core.

    The writer process ignores SIGINT and SIGTERM and exits when its stdin closes:
    after :meth:`stop`, or when the gateway dies, ``kill -9`` included, so what already
    sits in the pipe is still written. If it dies, the next flush starts another."""

    def __init__(self, config: AccessLog, data_dir: Path):
        # stdout may be a pipe that other processes (the other workers' writers) write
        # to as well: writes of up to PIPE_BUF bytes are atomic there, so lines never
        # interleave. A file is opened for appending, where every write is.
        chunk = select.PIPE_BUF
        self.path: Path | None = None
        if config.target == "file":
            chunk = max(1, min(64 * 1024, config.max_bytes // 4))
            path = Path(config.path)
            if not path.is_absolute():
                path = data_dir / path
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path = path
        self.args = json.dumps({"target": config.target, "path": str(self.path or ""),
                                "max_bytes": config.max_bytes, "backups": config.backups,
                                "chunk": chunk})
        self.pending: list[tuple[Any, ...]] = []
        self.put = self.pending.append  # the request path's only call
        self.proc: asyncio.subprocess.Process | None = None
        self.dropped = 0  # lines not handed over: the writer process fell too far behind
        self.restarts = 0
        self.max_behind = MAX_BEHIND

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lucid_monitoring.logwriter", self.args,
            stdin=asyncio.subprocess.PIPE)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def flush(self) -> None:
        """Hand what the request path collected to the writer process."""
        if not self.pending:
            return
        batch = self.pending[:]
        del self.pending[:len(batch)]
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None \
                or proc.stdin.is_closing():
            if proc is not None:
                self.restarts += 1
                if proc.returncode is None:  # alive, but its stdin broke
                    proc.kill()
                log.warning("monitoring: the access-log writer (pid %s) exited with %s; "
                            "starting another", proc.pid, await proc.wait())
            await self.start()
            proc = self.proc
            assert proc is not None and proc.stdin is not None
        if proc.stdin.transport.get_write_buffer_size() > self.max_behind:
            if not self.dropped:
                log.warning("monitoring: the access-log writer is more than %d bytes behind; "
                            "dropping lines until it catches up", self.max_behind)
            self.dropped += len(batch)
            return
        proc.stdin.write(frame(batch))

    async def stop(self, timeout: float = 10.0) -> None:
        """Hand over the rest, close the writer's stdin and wait for it to finish."""
        await self.flush()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
            with contextlib.suppress(ConnectionError):
                await proc.stdin.wait_closed()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("monitoring: the access-log writer did not finish in %s s", timeout)
            proc.kill()
            await proc.wait()


def query(buffer: Iterable[tuple[Any, ...]], *, status: int | None = None,
          status_class: int | None = None, route: str | None = None,
          request_id: str | None = None, since: float | None = None,
          until: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Newest first, filtered."""
    out: list[tuple[Any, ...]] = []
    for fields in reversed(list(buffer)):
        if status is not None and fields[7] != status:
            continue
        if status_class is not None and fields[7] // 100 != status_class:
            continue
        if route is not None and fields[2] != route:
            continue
        if request_id is not None and fields[1] != request_id:
            continue
        if since is not None and fields[0] < since:
            continue
        if until is not None and fields[0] > until:
            continue
        out.append(fields)
        if len(out) >= limit:
            break
    return records(out)


def ring(size: int) -> deque[tuple[Any, ...]]:
    return deque(maxlen=size)
