"""Every worker's metrics on worker 0's ``/metrics`` (``server.workers = N > 1``).

Each worker records its own requests in its own :class:`~lucid_monitoring.metrics.Recorder`
(the request path stays a dict lookup and a few additions: no shared memory, no
locks). Every worker but the first writes a snapshot of its cumulative tables to
``<data_dir>/monitoring-workers/<run>/<pid>.snap`` every ``SHARE_INTERVAL`` seconds
and when it stops; worker 0, which owns the admin listener, adds the latest snapshot
of every other worker to its own live tables when ``/metrics`` is scraped. It is the
design of prometheus_client's multiprocess mode (one file per process, summed at
scrape time) with the writes batched off the request path, where that mode does one
locked mmap write per sample.

* A worker that exits, or is killed, leaves its last snapshot in place, so what it
  counted stays in the totals: counters never go backwards while the gateway runs.
  Its in-flight gauge is dropped (what ``mark_process_dead`` does): a clean stop
  writes 0, and a snapshot older than ``STALE_AFTER`` seconds is a dead process's.
* ``<run>`` is drawn once per ``lucid serve``: the plugin is created before the
  workers fork, so they all inherit it. Worker 0 deletes other runs' directories when
  it starts, so a restarted gateway counts from zero, like any restarted exporter
  (Prometheus' ``rate()`` handles the reset).
* Totals are at most ``SHARE_INTERVAL`` behind the other workers' traffic.
* Worker 0's windows (JSON views, dashboard, alert rules) and rollups are computed
  from the same sum (:meth:`Recorder.view`), so alert rules judge the whole
  gateway's traffic.
* The log buffer: every other worker appends the requests its ring took since its
  last snapshot to ``<pid>.log`` (and replaces the file by its ring once it holds
  twice the ring); ``/monitoring/logs`` merges each worker's newest ``log_buffer``
  with worker 0's by time.
* Top clients (reports): each other worker's snapshot carries its client counts
  (``clients``), a table it starts again after each of worker 0's rollups, like
  worker 0 does, so each holds at most ``max_clients`` clients per rollup (then
  ``(other)``). Worker 0 counts its rollups in ``<run>/rollups``; a worker that sees
  the count move starts a new table (``clients_epoch`` + 1) and keeps the one it
  closed beside it (``clients_before``). Worker 0 takes, per worker, what grew since
  its last rollup: in the closed table, then in the new one. A worker starts at most
  one table between two rollups, so no count is lost or counted twice.
* Counters are summed; the reload counter takes the highest worker's (every worker
  reloads on SIGHUP); breaker states and instance health are worker 0's, completed
  with other workers' for instances worker 0 has not seen.
"""

from __future__ import annotations

import logging
import marshal
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lucid_monitoring.metrics import Recorder

SHARE_INTERVAL = 1.0
STALE_AFTER = 3 * SHARE_INTERVAL
REREAD_AFTER = 0.25  # one dashboard poll or alert evaluation reads the files once
FORMAT = 1

log = logging.getLogger("lucid.monitoring")

_SUMMED_TABLES = ("routes", "instances")
_SUMMED_COUNTS = ("upstream_errors", "retries", "breaker_transitions", "rejections",
                  "rejected_keys")


class WorkerShare:
    """One worker's side of the exchange: worker 0 reads, the others write."""

    def __init__(self, base: Path, run: str, worker: int):
        self.base = base
        self.directory = base / run
        self.worker = worker
        self.pid = os.getpid()
        self.path = self.directory / f"{self.pid}.snap"
        self.log_path = self.directory / f"{self.pid}.log"
        self._read_at = float("-inf")
        self._peers: list[dict[str, Any]] = []
        self._logged: tuple[Any, ...] | None = None  # the newest entry written
        self._log_lines = 0  # entries in this worker's log file
        # clients: this worker's table epoch, the table it closed last, and the count
        # of worker 0's rollups it last saw
        self._epoch = 0
        self._before: dict[tuple[str, str], int] = {}
        self._rollups_seen = 0
        # worker 0: its rollups, and per other worker (pid) the epoch and counts taken
        self.rollups_path = self.directory / "rollups"
        self._rollups = 0
        self._clients_taken: dict[int, tuple[int, dict[tuple[str, str], int]]] = {}

    # every worker but the first ---------------------------------------------------
    def write(self, recorder: Recorder, in_flight: int) -> None:
        """Replace this worker's snapshot (atomically: readers never see half a file)."""
        rollups = self._rollups_done()
        if rollups != self._rollups_seen:  # worker 0 took the counts: start another table
            self._rollups_seen = rollups
            self._before = recorder.take_clients()
            self._epoch += 1
        snapshot: dict[str, Any] = {
            "format": FORMAT, "pid": self.pid, "worker": self.worker, "at": time.time(),
            "width": recorder.width, "in_flight": int(in_flight), "reloads": recorder.reloads,
            "breakers": dict(recorder.breakers), "health": dict(recorder.health),
        }
        for name in _SUMMED_TABLES:
            snapshot[name] = {k: list(v) for k, v in list(getattr(recorder, name).items())}
        for name in _SUMMED_COUNTS:
            snapshot[name] = dict(getattr(recorder, name))
        snapshot["clients"] = dict(recorder.clients)
        snapshot["clients_epoch"] = self._epoch
        snapshot["clients_before"] = self._before
        self._replace(self.path, marshal.dumps(snapshot))

    def write_log(self, ring: deque[tuple[Any, ...]]) -> None:
        """Share the requests this worker's ring took since the last call: appended to
        ``<pid>.log`` (one frame: a 4-byte length, then the marshalled entries), so the
        cost follows the traffic, not the ring's size; once the file holds twice the
        ring, it is replaced by the ring (atomically)."""
        if not ring or ring[-1] is self._logged:
            return
        new: list[tuple[Any, ...]] = []
        for fields in reversed(ring):  # newest first, back to the last one shared
            if fields is self._logged:
                break
            new.append(fields)
        new.reverse()
        size = ring.maxlen or len(ring)
        if len(new) == len(ring) or self._log_lines + len(new) > 2 * size:
            self._replace(self.log_path, _frame(list(ring)))
            self._log_lines = len(ring)
        else:
            with open(self.log_path, "ab") as file:
                file.write(_frame(new))
            self._log_lines += len(new)
        self._logged = ring[-1]

    def _rollups_done(self) -> int:
        try:
            return int(self.rollups_path.read_text())
        except (OSError, ValueError):
            return 0

    def _replace(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    # worker 0 --------------------------------------------------------------------
    def start_run(self) -> None:
        """Forget earlier runs' workers; the current run's may already be writing."""
        if self.base.is_dir():
            for entry in self.base.iterdir():
                if entry != self.directory:
                    shutil.rmtree(entry, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)

    def snapshots(self) -> list[dict[str, Any]]:
        """The latest snapshot of every other worker of this run, dead ones included
        (read again at most every ``REREAD_AFTER`` seconds)."""
        now = time.monotonic()
        if now - self._read_at >= REREAD_AFTER:
            self._peers = list(self._read())
            self._read_at = now
        return self._peers

    def _read(self) -> Iterator[dict[str, Any]]:
        try:
            files = sorted(self.directory.glob("*.snap"))
        except OSError:
            return
        for path in files:
            if path == self.path:
                continue
            try:
                snapshot = marshal.loads(path.read_bytes())
            except (OSError, EOFError, ValueError, TypeError):
                continue  # replaced while read: the next scrape has it
            if isinstance(snapshot, dict) and snapshot.get("format") == FORMAT:
                yield snapshot

    def logs(self, keep: int) -> list[tuple[Any, ...]]:
        """Every other worker's ``keep`` most recent requests (a dead worker's last)."""
        entries: list[tuple[Any, ...]] = []
        try:
            files = sorted(self.directory.glob("*.log"))
        except OSError:
            return entries
        for path in files:
            if path == self.log_path:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            mine = list(_frames(data))
            entries.extend(mine[-keep:] if keep else ())
        return entries

    def take_clients(self) -> dict[tuple[str, str], int]:
        """The client counts the other workers made since the last call (rollups)."""
        self._peers = list(self._read())  # fresh: a rollup wants the latest counts
        self._read_at = time.monotonic()
        out: dict[tuple[str, str], int] = {}
        for snap in self._peers:
            pid, epoch = snap["pid"], snap.get("clients_epoch", 0)
            current: dict[tuple[str, str], int] = snap.get("clients", {})
            taken_epoch, taken = self._clients_taken.get(pid, (0, {}))
            if epoch != taken_epoch:  # the worker started a table since: end the old one
                before = snap.get("clients_before", {}) if epoch == taken_epoch + 1 else {}
                _add_counts(out, {k: n - taken.get(k, 0) for k, n in before.items()})
                taken = {}
            _add_counts(out, {k: n - taken.get(k, 0) for k, n in current.items()})
            self._clients_taken[pid] = (epoch, dict(current))
        self._rollups += 1
        self._replace(self.rollups_path, str(self._rollups).encode())
        return {k: n for k, n in out.items() if n > 0}

    def merged(self, local: Recorder, now: float | None = None) -> tuple[Recorder, int]:
        """A recorder holding ``local``'s counts plus every other worker's, and the
        other live workers' requests in flight."""
        now = time.time() if now is None else now
        out = Recorder(local.bounds, local.max_clients)
        for name in _SUMMED_TABLES:
            setattr(out, name, {k: list(v) for k, v in list(getattr(local, name).items())})
        for name in _SUMMED_COUNTS:
            setattr(out, name, dict(getattr(local, name)))
        out.breakers, out.health = {}, {}
        out.reloads = local.reloads
        in_flight = 0
        for snap in self.snapshots():
            if snap.get("width") != local.width:
                continue  # other buckets: cannot be added (never within one run)
            for name in _SUMMED_TABLES:
                _add_tables(getattr(out, name), snap[name])
            for name in _SUMMED_COUNTS:
                _add_counts(getattr(out, name), snap[name])
            out.reloads = max(out.reloads, snap["reloads"])
            out.breakers.update(snap["breakers"])
            out.health.update(snap["health"])
            if now - snap["at"] < STALE_AFTER:
                in_flight += snap["in_flight"]
        out.breakers.update(local.breakers)
        out.health.update(local.health)
        return out, in_flight

    def describe(self, local: Recorder, local_in_flight: int,
                 now: float | None = None) -> list[dict[str, Any]]:
        """Per worker: requests counted, in flight, snapshot age (for /monitoring/status)."""
        now = time.time() if now is None else now
        rows = [{"worker": self.worker, "pid": self.pid, "live": True,
                 "requests": int(sum(e[0] for e in list(local.routes.values()))),
                 "in_flight": local_in_flight, "snapshot_age_seconds": 0.0}]
        for snap in self.snapshots():
            age = now - snap["at"]
            live = age < STALE_AFTER
            rows.append({"worker": snap["worker"], "pid": snap["pid"], "live": live,
                         "requests": int(sum(e[0] for e in snap["routes"].values())),
                         "in_flight": snap["in_flight"] if live else 0,
                         "snapshot_age_seconds": round(age, 3)})
        return sorted(rows, key=lambda r: (r["worker"], r["pid"]))


def _frame(entries: list[tuple[Any, ...]]) -> bytes:
    try:
        data = marshal.dumps(entries)
    except ValueError:  # a plugin put an unmarshallable "sub" in the identity
        data = marshal.dumps([f[:13] + (str(f[13]),) + f[14:] for f in entries])
    return len(data).to_bytes(4, "big") + data


def _frames(data: bytes) -> Iterator[tuple[Any, ...]]:
    """The entries of a log file's whole frames (the last may be still being written)."""
    at = 0
    while at + 4 <= len(data):
        size = int.from_bytes(data[at:at + 4], "big")
        if at + 4 + size > len(data):
            return
        try:
            batch = marshal.loads(data[at + 4:at + 4 + size])
        except (EOFError, ValueError, TypeError):
            return
        at += 4 + size
        if isinstance(batch, list):
            yield from (e for e in batch if isinstance(e, tuple) and len(e) == 16)


def _add_tables(into: dict[Any, list[float]], other: dict[Any, list[float]]) -> None:
    for key, entry in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = list(entry)
        else:
            for i, value in enumerate(entry):
                mine[i] += value


def _add_counts(into: dict[Any, int], other: dict[Any, int]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value
