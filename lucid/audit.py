"""The audit log of admin writes: who changed what, when, and what the API answered.

The core keeps it, not a plugin, so every write of every plugin's blueprint is
recorded whichever plugins are enabled (a replacement router, a third-party
plugin's endpoints). Each record is committed before the client has its answer.

:class:`AuditLog` is the interface (two calls and ``ping``); :class:`SqliteAudit`,
``<data_dir>/audit.db``, is the one-node implementation. A cluster backend only has
to store rows and filter them the same way.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lucid.store import Database, open_database

log = logging.getLogger("lucid.audit")

FIELDS = ("at", "subject", "role", "method", "path", "status", "summary", "request_id")


@dataclass(frozen=True)
class AuditQuery:
    """Filters of ``GET /gateway/audit``; None matches anything."""

    subject: str | None = None
    path_prefix: str | None = None
    since: float | None = None
    until: float | None = None
    status: int | None = None
    limit: int = 100


class AuditLog(Protocol):
    async def record(self, entry: dict[str, Any]) -> None:
        """Store one admin write (the keys of :data:`FIELDS`), committed."""
        ...

    async def entries(self, query: AuditQuery) -> list[dict[str, Any]]:
        """Matching entries, newest first, at most ``query.limit``; each has an ``id``
        too, ascending with the order they were recorded."""
        ...

    async def ping(self) -> None:
        """Raise unless the log answers (``/gateway/health``)."""
        ...

    async def close(self) -> None: ...


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, subject TEXT NOT NULL,
        role TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,
        summary TEXT NOT NULL, request_id TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


class SqliteAudit:
    """``<data_dir>/audit.db``."""

    def __init__(self, db: Database):
        self.db = db

    @classmethod
    async def open(cls, data_dir: Path) -> SqliteAudit:
        """Open the log; the first time, move in the rows an older Lucid kept in the
        gateway plugin's ``gateway.db`` (that file is left as it was)."""
        log_ = cls(await open_database(data_dir / "audit.db", SCHEMA))
        try:
            moved = await log_.db.transaction(
                lambda conn: _import_legacy(conn, data_dir / "gateway.db"))
        except Exception:
            await log_.close()
            raise
        if moved:
            log.info("imported %d audit entries from gateway.db into audit.db", moved)
        return log_

    async def record(self, entry: dict[str, Any]) -> None:
        await self.db.execute(
            f"INSERT INTO audit ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})",
            tuple(entry[f] for f in FIELDS))
        await self.db.commit()

    async def entries(self, query: AuditQuery) -> list[dict[str, Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if query.subject is not None:
            clauses.append("subject = ?")
            args.append(query.subject)
        if query.path_prefix is not None:
            clauses.append("substr(path, 1, ?) = ?")
            args += [len(query.path_prefix), query.path_prefix]
        for clause, value in (("at >= ?", query.since), ("at <= ?", query.until),
                              ("status = ?", query.status)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?"
        async with self.db.execute(sql, (*args, query.limit)) as cur:
            return [dict(row) async for row in cur]

    async def ping(self) -> None:
        await (await self.db.execute("SELECT 1")).close()

    async def close(self) -> None:
        await self.db.close()


def _import_legacy(conn: sqlite3.Connection, legacy: Path) -> int:
    """Copy ``legacy``'s audit rows in, once: the marker is written first, so a second
    worker process opening the log at the same moment waits on the write lock and
    then finds it (nothing is imported twice)."""
    marked = conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('gateway_db_imported', 1)")
    if marked.rowcount == 0 or not legacy.exists():
        return 0
    try:
        old = sqlite3.connect(f"file:{legacy}?mode=ro", uri=True)
    except sqlite3.Error:
        log.exception("cannot read %s; its audit entries were not imported", legacy)
        return 0
    try:
        rows = old.execute(f"SELECT {', '.join(FIELDS)} FROM audit ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # no audit table: nothing to move
        return 0
    finally:
        old.close()
    conn.executemany(
        f"INSERT INTO audit ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})",
        rows)
    return len(rows)
