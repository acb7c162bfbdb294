"""Monitoring's persistent state: alert history and per-minute report rollups, in
``<data_dir>/monitoring.db``.

Alert rules created through the API are definitions (kind ``alert_rule``) in the
core's store; an older Lucid kept them here, in ``alert_rules``, which
:func:`legacy_alert_rules` reads once for the core to import. That table is left as
it was (an older Lucid started on this data dir again still finds its rules).

Kept behind this small class so another backend can replace SQLite later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiosqlite

from lucid.definitions import legacy_rows
from lucid.store import open_database

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS alert_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, state TEXT NOT NULL,
        value REAL, severity TEXT NOT NULL, labels TEXT NOT NULL, at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rollups (
        minute REAL NOT NULL, service TEXT NOT NULL, route TEXT NOT NULL,
        requests INTEGER NOT NULL, errors INTEGER NOT NULL, duration_sum REAL NOT NULL,
        buckets TEXT NOT NULL, clients TEXT NOT NULL, alerting INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rollups_minute ON rollups (minute)",
)


def legacy_alert_rules(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Alert rules an older Lucid created through the API and kept in
    ``monitoring.db``, ``{name: rule}`` in creation order (moved to the core's store)."""
    rows = legacy_rows(data_dir / "monitoring.db",
                       "SELECT name, definition FROM alert_rules ORDER BY created_at, name")
    return {name: {**json.loads(body), "name": name} for name, body in rows}


class MonitoringStore:
    """Alert history and rollups; every write is committed before return."""

    def __init__(self, db: aiosqlite.Connection):
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> MonitoringStore:
        return cls(await open_database(path, SCHEMA))

    async def close(self) -> None:
        await self.db.close()

    # history ---------------------------------------------------------------
    async def record_transitions(self, rows: list[tuple[str, str, float | None, str,
                                                        dict[str, str], float]],
                                 keep: int) -> None:
        await self.db.executemany(
            "INSERT INTO alert_history (name, state, value, severity, labels, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(n, s, v, sev, json.dumps(lab), at) for n, s, v, sev, lab, at in rows])
        await self.db.execute(
            "DELETE FROM alert_history WHERE id <= (SELECT MAX(id) FROM alert_history) - ?",
            (keep,))
        await self.db.commit()

    async def history(self, limit: int) -> list[dict[str, Any]]:
        async with self.db.execute(
                "SELECT name, state, value, severity, labels, at FROM alert_history "
                "ORDER BY id DESC LIMIT ?", (limit,)) as cur:
            return [
                {"name": r[0], "state": r[1], "value": r[2], "severity": r[3],
                 "labels": json.loads(r[4]), "at": r[5]}
                for r in await cur.fetchall()
            ]

    # rollups ---------------------------------------------------------------
    async def add_rollups(self, rows: list[tuple[Any, ...]], prune_before: float) -> None:
        await self.db.executemany(
            "INSERT INTO rollups (minute, service, route, requests, errors, "
            "duration_sum, buckets, clients, alerting) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows)
        await self.db.execute("DELETE FROM rollups WHERE minute < ?", (prune_before,))
        await self.db.commit()

    async def rollups(self, start: float, end: float) -> list[dict[str, Any]]:
        async with self.db.execute(
                "SELECT minute, service, route, requests, errors, duration_sum, buckets, "
                "clients, alerting FROM rollups WHERE minute >= ? AND minute < ? "
                "ORDER BY minute", (start, end)) as cur:
            return [
                {"minute": r[0], "service": r[1], "route": r[2], "requests": r[3],
                 "errors": r[4], "duration_sum": r[5], "buckets": json.loads(r[6]),
                 "clients": json.loads(r[7]), "alerting": bool(r[8])}
                for r in await cur.fetchall()
            ]
