"""Where registrations live between restarts: a small interface, SQLite behind it.

The registry keeps everything in memory and writes through this interface; it never
reads it on the data path. ``SQLiteStore`` is the embedded default (one file under
``server.data_dir``, WAL mode, each write one committed transaction before the admin
API answers, so ``kill -9`` loses nothing that was acknowledged). A Redis store for
multi-node clusters will implement the same five methods.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any, Protocol

from lucid.store import Database, open_database

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS services (
        name TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        idx INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS instances (
        service TEXT NOT NULL,
        id TEXT NOT NULL,
        body TEXT NOT NULL,
        health TEXT NOT NULL,
        maintenance TEXT,
        note TEXT NOT NULL DEFAULT '',
        changed_at REAL NOT NULL,
        idx INTEGER NOT NULL,
        PRIMARY KEY (service, id)
    )""",
)


class RegistryStore(Protocol):
    """What the registry needs from storage. Rows are plain dicts."""

    async def load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]: ...

    async def write(
        self,
        services: list[dict[str, Any]] = ...,
        instances: list[dict[str, Any]] = ...,
        delete_services: list[str] = ...,
        delete_instances: list[tuple[str, str]] = ...,
    ) -> None: ...

    async def close(self) -> None: ...


class SQLiteStore:
    """The embedded store. One connection; a lock keeps each write one transaction."""

    def __init__(self, path: Path):
        self.path = path
        self._db: Database | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> Database:
        if self._db is None:
            self._db = await open_database(self.path, SCHEMA)
        return self._db

    async def load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        db = await self._connection()
        services = []
        async with db.execute("SELECT name, body, idx FROM services") as cursor:
            async for row in cursor:
                services.append({"name": row["name"], "idx": row["idx"],
                                 **json.loads(row["body"])})
        instances = []
        async with db.execute("SELECT * FROM instances") as cursor:
            async for row in cursor:
                instances.append({
                    "service": row["service"], "id": row["id"], "health": row["health"],
                    "maintenance": row["maintenance"], "note": row["note"],
                    "changed_at": row["changed_at"], "idx": row["idx"],
                    **json.loads(row["body"]),
                })
        return services, instances

    async def write(
        self,
        services: list[dict[str, Any]] = (),  # type: ignore[assignment]
        instances: list[dict[str, Any]] = (),  # type: ignore[assignment]
        delete_services: list[str] = (),  # type: ignore[assignment]
        delete_instances: list[tuple[str, str]] = (),  # type: ignore[assignment]
    ) -> None:
        """Apply everything in one committed transaction, or nothing: one trip to the
        database's thread (a registration's latency is mostly such trips)."""
        service_rows = [(s["name"], json.dumps(s["body"]), s["idx"]) for s in services]
        instance_rows = [(i["service"], i["id"], json.dumps(i["body"]), i["health"],
                          i["maintenance"], i["note"], i["changed_at"], i["idx"])
                         for i in instances]

        def apply(db: sqlite3.Connection) -> None:
            for name in delete_services:
                db.execute("DELETE FROM instances WHERE service = ?", (name,))
                db.execute("DELETE FROM services WHERE name = ?", (name,))
            if delete_instances:
                db.executemany(
                    "DELETE FROM instances WHERE service = ? AND id = ?", delete_instances)
            if service_rows:
                db.executemany(
                    "INSERT OR REPLACE INTO services (name, body, idx) VALUES (?, ?, ?)",
                    service_rows)
            if instance_rows:
                db.executemany(
                    "INSERT OR REPLACE INTO instances (service, id, body, health, "
                    "maintenance, note, changed_at, idx) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    instance_rows)

        async with self._lock:
            db = await self._connection()
            await db.transaction(apply)

    async def close(self) -> None:
        async with self._lock:
            if self._db is not None:
                await self._db.close()
                self._db = None
