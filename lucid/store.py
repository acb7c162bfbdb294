"""The embedded store: one SQLite file per plugin under ``server.data_dir``, in WAL mode.

What the admin API accepts must survive a restart, ``kill -9`` included: every write
is a committed transaction before the API answers. ``synchronous=NORMAL`` in WAL mode
keeps committed transactions across a process crash (only an OS crash or power loss
can cost the last ones), at a fraction of the cost of ``FULL``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import aiosqlite


async def open_database(path: Path, schema: Sequence[str] = ()) -> aiosqlite.Connection:
    """Open (creating if needed) a SQLite file in WAL mode and apply ``schema``.

    ``schema`` holds idempotent statements (``CREATE TABLE IF NOT EXISTS …``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path)
    db.row_factory = aiosqlite.Row
    # busy_timeout first. Switching a new file to WAL takes an exclusive lock that
    # SQLite may refuse at once, busy handler or not, while another worker process is
    # creating the same file: retry that one statement for a bounded time.
    await db.execute("PRAGMA busy_timeout=5000")
    deadline = time.monotonic() + 10.0
    while True:
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                await db.close()
                raise
            await asyncio.sleep(0.05)
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.execute("PRAGMA foreign_keys=ON")
    for statement in schema:
        await db.execute(statement)
    await db.commit()
    return db
