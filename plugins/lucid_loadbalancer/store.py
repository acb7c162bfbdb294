"""Where pools made through the admin API, and the affinity signing key, are kept:
``<data_dir>/loadbalancer.db``. Every write is committed before it returns."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from lucid.store import open_database

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pools (id TEXT PRIMARY KEY, spec TEXT NOT NULL, "
    "updated REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
AFFINITY_KEY = "affinity"


class SQLiteStore:
    def __init__(self, db: Any):
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        return cls(await open_database(path, SCHEMA))

    async def load(self) -> dict[str, dict[str, Any]]:
        async with self.db.execute("SELECT id, spec FROM pools ORDER BY id") as cursor:
            return {row["id"]: json.loads(row["spec"]) for row in await cursor.fetchall()}

    async def put_pool(self, pool_id: str, spec: dict[str, Any]) -> None:
        await self.db.execute(
            "INSERT INTO pools (id, spec, updated) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE "
            "SET spec = excluded.spec, updated = excluded.updated",
            (pool_id, json.dumps(spec, sort_keys=True), time.time()))
        await self.db.commit()

    async def delete_pool(self, pool_id: str) -> None:
        await self.db.execute("DELETE FROM pools WHERE id = ?", (pool_id,))
        await self.db.commit()

    async def affinity_key(self) -> bytes:
        """The random key signing affinity cookies, made once and kept, so cookies stay
        valid across restarts. ``INSERT OR IGNORE`` then read: worker processes that
        start together all end up with the one key that won."""
        await self.db.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)",
                              (AFFINITY_KEY, secrets.token_hex(32)))
        await self.db.commit()
        async with self.db.execute("SELECT value FROM secrets WHERE name = ?",
                                   (AFFINITY_KEY,)) as cursor:
            row = await cursor.fetchone()
        return bytes.fromhex(row["value"])

    async def close(self) -> None:
        await self.db.close()
