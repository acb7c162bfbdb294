"""What the rate limiter keeps on disk: quota counters (windows of an hour or more).
Limits themselves are definitions, kept by the core (an older Lucid kept the ones made
through the admin API here, in a ``limits`` table: see ``legacy_limits``).

Counters are never written per request: the data path marks a key dirty (a set add)
and :meth:`SqliteStore.flush` writes every dirty key in one transaction, every
``flush_interval``. A ``kill -9`` can therefore lose at most the quota usage of the last
``flush_interval`` (plus the flush in progress). A Redis store for clusters will
implement the same small interface.
"""

from __future__ import annotations

from pathlib import Path

import aiosqlite

from lucid.store import open_database

SCHEMA = (
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
    """Quota counters in ``<data_dir>/ratelimiter.db``."""

    def __init__(self, db: aiosqlite.Connection):
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        return cls(await open_database(path, SCHEMA))

    async def close(self) -> None:
        await self.db.close()

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

    async def drop_counters(self, stale: dict[str, str | None]) -> None:
        """Forget counters that no longer mean anything: ``{limit id: signature}``
        drops that limit's counters kept under any other signature (what they counted
        changed), ``{limit id: None}`` all of them (the limit is gone)."""
        await self.db.executemany(
            "DELETE FROM counters WHERE limit_id = ? AND signature IS NOT ?",
            list(stale.items()))
        await self.db.commit()
