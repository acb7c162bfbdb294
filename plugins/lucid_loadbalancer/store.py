"""Where the affinity signing key is kept: ``<data_dir>/loadbalancer.db``.

Pools made through the admin API live in the core's definitions store; an older
Lucid kept them in this file's ``pools`` table, which ``legacy_pools`` (in the
package) imports once and leaves in place."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from lucid.store import open_database

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
AFFINITY_KEY = "affinity"


class SQLiteStore:
    def __init__(self, db: Any):
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        return cls(await open_database(path, SCHEMA))

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
