"""The gateway's SQLite file (``gateway.db``): runtime routes and the admin audit log.

Behind this small interface so a Redis store can replace it later. Every write is
one committed transaction before the admin API answers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lucid.store import open_database

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS routes (
        id TEXT PRIMARY KEY, definition TEXT NOT NULL, updated_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, subject TEXT NOT NULL,
        role TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,
        summary TEXT NOT NULL, request_id TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
)


class GatewayStore:
    def __init__(self, db: Any):
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> GatewayStore:
        return cls(await open_database(path, SCHEMA))

    async def close(self) -> None:
        await self.db.close()

    # runtime routes --------------------------------------------------------
    async def load_routes(self) -> dict[str, dict[str, Any]]:
        async with self.db.execute("SELECT id, definition FROM routes ORDER BY id") as cur:
            return {row["id"]: json.loads(row["definition"]) async for row in cur}

    async def put_route(self, route_id: str, definition: dict[str, Any]) -> None:
        await self.db.execute(
            "INSERT INTO routes (id, definition, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET definition = excluded.definition, "
            "updated_at = excluded.updated_at",
            (route_id, json.dumps(definition), time.time()))
        await self.db.commit()

    async def delete_route(self, route_id: str) -> None:
        await self.db.execute("DELETE FROM routes WHERE id = ?", (route_id,))
        await self.db.commit()

    async def routes_signature(self) -> tuple[Any, ...]:
        """Changes whenever a runtime route is added, replaced or deleted."""
        async with self.db.execute(
                "SELECT count(*), max(updated_at), group_concat(id) FROM routes") as cur:
            row = await cur.fetchone()
        return tuple(row) if row is not None else ()

    # audit -----------------------------------------------------------------
    async def audit(self, entry: dict[str, Any]) -> None:
        await self.db.execute(
            "INSERT INTO audit (at, subject, role, method, path, status, summary, request_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (entry["at"], entry["subject"], entry["role"], entry["method"], entry["path"],
             entry["status"], entry["summary"], entry["request_id"]))
        await self.db.commit()

    async def audit_entries(self, subject: str | None = None, path_prefix: str | None = None,
                            since: float | None = None, until: float | None = None,
                            status: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if subject is not None:
            clauses.append("subject = ?")
            args.append(subject)
        if path_prefix is not None:
            clauses.append("substr(path, 1, ?) = ?")
            args += [len(path_prefix), path_prefix]
        if since is not None:
            clauses.append("at >= ?")
            args.append(since)
        if until is not None:
            clauses.append("at <= ?")
            args.append(until)
        if status is not None:
            clauses.append("status = ?")
            args.append(status)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?"
        async with self.db.execute(sql, (*args, limit)) as cur:
            return [dict(row) async for row in cur]
