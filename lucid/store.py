"""The embedded store: one SQLite file per plugin under ``server.data_dir``, in WAL mode.

What the admin API accepts must survive a restart, ``kill -9`` included: every write
is a committed transaction before the API answers. ``synchronous=NORMAL`` in WAL mode
keeps committed transactions across a process crash (only an OS crash or power loss
can cost the last ones), at a fraction of the cost of ``FULL``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

log = logging.getLogger("lucid.store")

T = TypeVar("T")


class Database(aiosqlite.Connection):
    """An aiosqlite connection with group commit.

    Concurrent writers on one connection share a commit: ``commit()`` joins a commit
    that is queued and not started yet, since that one will run after the caller's
    statements (the connection's thread runs its queue in order) and so makes them
    durable too. Each caller still returns only once its statements are committed;
    under load one commit (and one hop to the connection's thread) serves many
    writers -- audit rows of concurrent admin writes, for instance.
    """

    _queued_commit: asyncio.Future[Any] | None = None
    _path: Path | None = None  # set once the file is open: checkpoints may run
    _commits = 0  # since the last checkpoint
    _checkpoint_timer: asyncio.TimerHandle | None = None
    _checkpointing: asyncio.Future[None] | None = None
    _checkpoint_conn: sqlite3.Connection | None = None  # used on a worker thread only
    _closing = False

    async def commit(self) -> None:
        self._committed()
        queued = self._queued_commit
        if queued is None:
            queued = asyncio.ensure_future(self._on_thread(self._commit_now))
            self._queued_commit = queued
        # shield: one caller giving up must not cancel the others' commit
        await asyncio.shield(queued)

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on the connection's thread and commit, in one hop: all of it
        or, if it raises, nothing. For a write of several statements this replaces
        one round trip to the thread per statement. A savepoint bounds the undo, so a
        failing ``work`` never takes back another writer's executed statements."""

        def run() -> T:
            conn = self._conn
            conn.execute("SAVEPOINT lucid_tx")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK TO lucid_tx")
                conn.execute("RELEASE lucid_tx")
                raise
            conn.execute("RELEASE lucid_tx")
            conn.commit()
            return result

        self._committed()
        return await self._on_thread(run)  # type: ignore[no-any-return]

    def _on_thread(self, fn: Callable[[], T]) -> Awaitable[Any]:
        """Run ``fn`` on the connection's thread, after what is queued there
        (aiosqlite's ``_execute``, which its stubs leave untyped)."""
        execute: Callable[[Callable[[], T]], Awaitable[Any]] = self._execute
        return execute(fn)

    async def close(self) -> None:
        self._closing = True
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
            self._checkpoint_timer = None
        if self._checkpointing is not None:
            # A thread cannot be interrupted: wait for the checkpoint it runs, since
            # closing its connection under it would crash the process.
            await asyncio.wait([self._checkpointing])
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None
        await super().close()  # the last connection to close checkpoints what is left

    # checkpoints -------------------------------------------------------------
    # SQLite checkpoints a WAL file from inside the commit that crosses 1,000 pages
    # (copy back, then fsync): every few hundred small commits, one writer waited for
    # milliseconds -- most of the admin API's p99. Here the writing connection never
    # checkpoints; a second connection, on a worker thread, does it in the background
    # (PASSIVE: it never blocks writers) after a burst of commits or a second after the
    # first commit since the last checkpoint. Nothing runs while nobody writes: a file
    # that is only read costs no timer and no task (a loop per file, waking every
    # second, doubled an idle gateway's instructions per second).
    CHECKPOINT_COMMITS = 200
    CHECKPOINT_INTERVAL = 1.0

    def _committed(self) -> None:
        self._commits += 1
        if self._path is None or self._checkpointing is not None or self._closing:
            return  # not open yet, or a checkpoint runs (it looks again when done)
        if self._commits >= self.CHECKPOINT_COMMITS:
            self._checkpoint()
        elif self._checkpoint_timer is None:
            self._checkpoint_timer = asyncio.get_running_loop().call_later(
                self.CHECKPOINT_INTERVAL, self._checkpoint)

    def _checkpoint(self) -> None:
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
            self._checkpoint_timer = None
        if self._closing or not self._commits:
            return
        self._commits = 0
        self._checkpointing = asyncio.ensure_future(asyncio.to_thread(self._checkpoint_now))
        self._checkpointing.add_done_callback(self._checkpointed)

    def _checkpoint_now(self) -> None:
        # On a worker thread, one checkpoint at a time.
        assert self._path is not None
        if self._checkpoint_conn is None:
            self._checkpoint_conn = sqlite3.connect(str(self._path), check_same_thread=False)
        self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _checkpointed(self, done: asyncio.Future[None]) -> None:
        self._checkpointing = None
        if not done.cancelled() and done.exception() is not None:
            log.warning("checkpoint of %s failed; retried later", self._path,
                        exc_info=done.exception())
            self._commits = max(self._commits, 1)
        if self._commits and not self._closing:  # written to while it ran
            self._commits -= 1  # counted again by _committed
            self._committed()

    def _commit_now(self) -> None:
        # On the connection's thread: from here on, a new commit() queues its own,
        # because its statements may have been executed after this one started.
        self._queued_commit = None
        self._conn.commit()


def connect(path: Path) -> Database:
    return Database(lambda: sqlite3.connect(str(path)), iter_chunk_size=64)


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (SQLite takes an empty file
    for a new database). The stores hold what the admin API accepted, audit entries,
    the affinity cookies' key: readable by Lucid's user only. SQLite creates the
    ``-wal`` and ``-shm`` files with the database file's mode (``findCreateFileMode``
    in its unix VFS), so they follow. An existing file keeps the mode it has: an
    operator may have chosen it. A folder created here is 0700, for the same reason."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass  # another worker process made it first, or an earlier run


async def open_database(path: Path, schema: Sequence[str] = ()) -> Database:
    """Open (creating if needed) a SQLite file in WAL mode and apply ``schema``.

    ``schema`` holds idempotent statements (``CREATE TABLE IF NOT EXISTS …``).
    """
    create_private(path)
    db = connect(path)
    await db  # starts its thread and opens the file
    db.row_factory = aiosqlite.Row
    # busy_timeout first. Switching a new file to WAL, or creating its tables, takes a
    # lock that SQLite may refuse at once, busy handler or not, while another worker
    # process is creating the same file: retry for a bounded time.
    await db.execute("PRAGMA busy_timeout=5000")
    deadline = time.monotonic() + 10.0
    while True:
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA wal_autocheckpoint=0")  # see Database: in the background
            await db.execute("PRAGMA foreign_keys=ON")
            for statement in schema:
                await db.execute(statement)
            await db.commit()
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                await db.close()
                raise
            await db.rollback()
            await asyncio.sleep(0.05)
    db._path = path  # checkpoints from now on
    return db
