"""What the rate limiter keeps on disk: limit definitions made through the admin API,
and quota counters (windows of an hour or more).

Counters are never written per request: the data path marks a key dirty (a set add)
and :meth:`SqliteStore.flush` writes every dirty key in one transaction, every
``flush_interval``. A ``kill -9`` can therefore lose at most the quota usage of the last
``flush_interval`` (plus the flush in progress). A Redis store for clusters will
implement the same small interface.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiosqlite

from lucid.store import open_database

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS limits (
        id TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS counters (
        limit_id TEXT NOT NULL,
        signature TEXT NOT NULL,
        key TEXT NOT NULL,
        window REAL NOT NULL,
        value REAL NOT NULL,
        previous REAL NOT NULL,
        PRIMARY KEY (limit_id, key)
    )""",
)

Row = tuple[str, str, str, float, float, float]  # limit id, signature, key, window, value, prev


class SqliteStore:
    """Limit definitions and quota counters in ``<data_dir>/ratelimiter.db``."""

    def __init__(self, db: aiosqlite.Connection):
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        return cls(await open_database(path, SCHEMA))

    async def close(self) -> None:
        await self.db.close()

    # definitions -------------------------------------------------------------
    async def load_limits(self) -> list[dict[str, Any]]:
        async with self.db.execute("SELECT body FROM limits ORDER BY rowid") as cursor:
            return [json.loads(row[0]) async for row in cursor]

    async def save_limit(self, body: dict[str, Any], now: float, signature: str) -> None:
        """Upsert a definition; counters persisted under another signature are dropped
        in the same transaction (what they counted changed)."""
        await self.db.execute(
            "INSERT INTO limits (id, body, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
            (body["id"], json.dumps(body), now),
        )
        await self.db.execute("DELETE FROM counters WHERE limit_id = ? AND signature != ?",
                              (body["id"], signature))
        await self.db.commit()

    async def delete_limit(self, limit_id: str) -> None:
        await self.db.execute("DELETE FROM limits WHERE id = ?", (limit_id,))
        await self.db.execute("DELETE FROM counters WHERE limit_id = ?", (limit_id,))
        await self.db.commit()

    # quota counters ------------------------------------------------------------
    async def load_counters(self) -> list[Row]:
        async with self.db.execute(
            "SELECT limit_id, signature, key, window, value, previous FROM counters"
        ) as cursor:
            return [tuple(row) async for row in cursor]  # type: ignore[misc]

    async def write_counters(self, rows: list[Row], deleted: list[tuple[str, str]]) -> None:
        """One transaction for a whole flush."""
        if deleted:
            await self.db.executemany(
                "DELETE FROM counters WHERE limit_id = ? AND key = ?", deleted)
        if rows:
            await self.db.executemany(
                "INSERT INTO counters (limit_id, signature, key, window, value, previous) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (limit_id, key) DO UPDATE SET "
                "signature = excluded.signature, window = excluded.window, "
                "value = excluded.value, previous = excluded.previous",
                rows,
            )
        await self.db.commit()
