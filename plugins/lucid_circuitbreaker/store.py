"""Where operator modes (forced open, disabled) are kept: state an operator set, not
a definition, so it stays the plugin's (circuit definitions live in the core's
definitions layer). SQLite today; the interface is what a Redis store will implement.
Every write is committed before it returns.

An older Lucid also kept circuit definitions here (a ``circuits`` table); the plugin's
``legacy_circuits`` reader hands them to the core once, and the table is left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from lucid.store import open_database

SCHEMA = ("CREATE TABLE IF NOT EXISTS modes (id TEXT PRIMARY KEY, mode TEXT NOT NULL)",)


class ModeStore(Protocol):
    async def load(self) -> dict[str, str]: ...
    async def set_mode(self, circuit_id: str, mode: str | None) -> None: ...
    async def close(self) -> None: ...


class SQLiteStore:
    """``<data_dir>/circuitbreaker.db``."""

    def __init__(self, db: Any):
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        return cls(await open_database(path, SCHEMA))

    async def load(self) -> dict[str, str]:
        """Every persisted operator mode, by circuit id."""
        async with self.db.execute("SELECT id, mode FROM modes") as cursor:
            return {row["id"]: row["mode"] for row in await cursor.fetchall()}

    async def set_mode(self, circuit_id: str, mode: str | None) -> None:
        """Persist a mode; None forgets it (back to normal, or the circuit deleted)."""
        if mode is None:
            await self.db.execute("DELETE FROM modes WHERE id = ?", (circuit_id,))
        else:
            await self.db.execute(
                "INSERT INTO modes (id, mode) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET "
                "mode = excluded.mode", (circuit_id, mode))
        await self.db.commit()

    async def close(self) -> None:
        await self.db.close()
