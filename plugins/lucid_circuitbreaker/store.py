"""Where circuit definitions made through the admin API, and operator modes (forced
open, disabled), are kept. SQLite today; the interface is what a Redis store will
implement. Every write is committed before it returns."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from lucid.store import open_database

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS circuits (id TEXT PRIMARY KEY, spec TEXT NOT NULL, "
    "updated REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS modes (id TEXT PRIMARY KEY, mode TEXT NOT NULL)",
)


class CircuitStore(Protocol):
    async def load(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]: ...
    async def put_circuit(self, circuit_id: str, spec: dict[str, Any]) -> None: ...
    async def delete_circuit(self, circuit_id: str) -> None: ...
    async def set_mode(self, circuit_id: str, mode: str | None) -> None: ...
    async def close(self) -> None: ...


class SQLiteStore:
    """``<data_dir>/circuitbreaker.db``."""

    def __init__(self, db: Any):
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        return cls(await open_database(path, SCHEMA))

    async def load(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        async with self.db.execute("SELECT id, spec FROM circuits ORDER BY id") as cursor:
            specs = {row["id"]: json.loads(row["spec"]) for row in await cursor.fetchall()}
        async with self.db.execute("SELECT id, mode FROM modes") as cursor:
            modes = {row["id"]: row["mode"] for row in await cursor.fetchall()}
        return specs, modes

    async def put_circuit(self, circuit_id: str, spec: dict[str, Any]) -> None:
        await self.db.execute(
            "INSERT INTO circuits (id, spec, updated) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE "
            "SET spec = excluded.spec, updated = excluded.updated",
            (circuit_id, json.dumps(spec, sort_keys=True), time.time()))
        await self.db.commit()

    async def delete_circuit(self, circuit_id: str) -> None:
        await self.db.execute("DELETE FROM circuits WHERE id = ?", (circuit_id,))
        await self.db.execute("DELETE FROM modes WHERE id = ?", (circuit_id,))
        await self.db.commit()

    async def set_mode(self, circuit_id: str, mode: str | None) -> None:
        if mode is None:
            await self.db.execute("DELETE FROM modes WHERE id = ?", (circuit_id,))
        else:
            await self.db.execute(
                "INSERT INTO modes (id, mode) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET "
                "mode = excluded.mode", (circuit_id, mode))
        await self.db.commit()

    async def close(self) -> None:
        await self.db.close()
