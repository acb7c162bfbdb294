"""The embedded store: WAL mode, and a committed write survives kill -9 of its writer."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

from lucid.store import open_database


async def test_database_is_in_wal_mode_with_its_schema(tmp_path):
    db = await open_database(tmp_path / "x" / "p.db",
                             ["CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v TEXT)"])
    try:
        async with db.execute("PRAGMA journal_mode") as cursor:
            assert (await cursor.fetchone())[0] == "wal"
        await db.execute("INSERT INTO t VALUES ('a', '1')")
        await db.commit()
    finally:
        await db.close()
    again = await open_database(tmp_path / "x" / "p.db",
                                ["CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v TEXT)"])
    try:
        async with again.execute("SELECT v FROM t WHERE k = 'a'") as cursor:
            assert (await cursor.fetchone())[0] == "1"
    finally:
        await again.close()


async def test_a_committed_write_survives_kill_9(tmp_path):
    path = tmp_path / "crash.db"
    writer = textwrap.dedent(f"""
        import asyncio, os, signal, sys
        from pathlib import Path
        from lucid.store import open_database

        async def main():
            db = await open_database(Path({str(path)!r}),
                ["CREATE TABLE IF NOT EXISTS t (n INTEGER)"])
            await db.execute("INSERT INTO t VALUES (42)")
            await db.commit()
            print("committed", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
    """)
    result = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == -9
    assert result.stdout.strip() == "committed"
    db = await open_database(path)
    try:
        async with db.execute("SELECT n FROM t") as cursor:
            assert [row[0] for row in await cursor.fetchall()] == [42]
    finally:
        await db.close()


def test_two_processes_opening_a_new_file_at_once_both_succeed(tmp_path):
    """Workers start together and open the same new file: switching it to WAL must not
    fail one of them with 'database is locked'."""
    opener = textwrap.dedent("""
        import asyncio, sys, time
        from pathlib import Path
        from lucid.store import open_database

        async def main(path, go):
            while not Path(go).exists():
                time.sleep(0.001)
            db = await open_database(Path(path), ["CREATE TABLE IF NOT EXISTS t (n INTEGER)"])
            await db.close()
            print("opened", flush=True)

        asyncio.run(main(sys.argv[1], sys.argv[2]))
    """)
    for round_ in range(5):
        path, go = tmp_path / f"race{round_}.db", tmp_path / f"go{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", opener, str(path), str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        go.touch()
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert out.strip() == "opened"


async def test_concurrent_writers_each_return_only_once_committed(tmp_path):
    """Group commit: writers share commits, and each one's row is durable (seen by
    another connection) by the time its own commit() returns."""
    import asyncio
    import sqlite3

    path = tmp_path / "group.db"
    db = await open_database(path, ["CREATE TABLE IF NOT EXISTS t (n INTEGER)"])
    reader = sqlite3.connect(path)
    try:
        async def write(n):
            await db.execute("INSERT INTO t VALUES (?)", (n,))
            await db.commit()
            return reader.execute("SELECT count(*) FROM t WHERE n = ?", (n,)).fetchone()[0]

        assert await asyncio.gather(*(write(n) for n in range(50))) == [1] * 50
    finally:
        reader.close()
        await db.close()


async def test_a_transaction_is_all_or_nothing(tmp_path):
    import sqlite3

    import pytest

    db = await open_database(tmp_path / "tx.db",
                             ["CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY)"])
    try:
        await db.transaction(lambda conn: conn.executemany("INSERT INTO t VALUES (?)",
                                                           [("a",), ("b",)]))
        with pytest.raises(sqlite3.IntegrityError):
            await db.transaction(lambda conn: conn.executemany("INSERT INTO t VALUES (?)",
                                                               [("c",), ("a",)]))
        async with db.execute("SELECT k FROM t ORDER BY k") as cursor:
            assert [row[0] for row in await cursor.fetchall()] == ["a", "b"]
        # A failing transaction takes back only its own statements, not another
        # writer's executed and not yet committed ones.
        await db.execute("INSERT INTO t VALUES ('d')")
        with pytest.raises(sqlite3.IntegrityError):
            await db.transaction(lambda conn: conn.execute("INSERT INTO t VALUES ('a')"))
        await db.commit()
        async with db.execute("SELECT k FROM t ORDER BY k") as cursor:
            assert [row[0] for row in await cursor.fetchall()] == ["a", "b", "d"]
    finally:
        await db.close()


async def test_the_wal_is_checkpointed_in_the_background(tmp_path):
    """Writers never checkpoint (it stalled one commit every few hundred); a
    background connection copies the WAL back into the database file."""
    from lucid.testing import wait_until

    path = tmp_path / "wal.db"
    db = await open_database(path, ["CREATE TABLE IF NOT EXISTS t (v TEXT)"])
    try:
        async with db.execute("PRAGMA wal_autocheckpoint") as cursor:
            assert (await cursor.fetchone())[0] == 0
        before = path.stat().st_size
        for _ in range(db.CHECKPOINT_COMMITS + 10):
            await db.execute("INSERT INTO t VALUES (?)", ("x" * 2000,))
            await db.commit()
        await wait_until(lambda: path.stat().st_size > before + 200_000,
                         message="the WAL to be copied into the database file")
    finally:
        await db.close()


async def test_a_database_nobody_writes_to_runs_nothing(tmp_path):
    """No task or timer per open file while it is only read (each file's checkpoint
    loop used to wake every second); one write is still checkpointed, then nothing is
    left running."""
    import asyncio

    from lucid.testing import wait_until

    path = tmp_path / "quiet.db"
    before = asyncio.all_tasks()
    db = await open_database(path, ["CREATE TABLE IF NOT EXISTS t (v TEXT)"])
    try:
        assert asyncio.all_tasks() == before
        size = path.stat().st_size
        await db.execute("INSERT INTO t VALUES (?)", ("x" * 10_000,))
        await db.commit()
        await wait_until(lambda: path.stat().st_size > size + 8_000,
                         message="the one write to be copied into the database file")
        await wait_until(lambda: asyncio.all_tasks() == before,
                         message="the checkpoint to finish")
        async with db.execute("SELECT count(*) FROM t") as cursor:
            assert (await cursor.fetchone())[0] == 1
    finally:
        await db.close()


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


async def test_database_files_are_private_from_their_creation(tmp_path):
    """The .db and its -wal and -shm are 0600 whatever the umask; a folder the store
    creates is 0700; a file that exists already keeps the mode an operator gave it."""
    folder = tmp_path / "new"
    path = folder / "p.db"
    old = os.umask(0)  # the loosest: what the store asks for is all a file gets
    try:
        db = await open_database(path, ["CREATE TABLE IF NOT EXISTS t (n INTEGER)"])
    finally:
        os.umask(old)
    try:
        await db.execute("INSERT INTO t VALUES (1)")
        await db.commit()
        files = [path, folder / "p.db-wal", folder / "p.db-shm"]
        assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
        assert mode(folder) == 0o700
    finally:
        await db.close()

    shared = tmp_path / "shared.db"
    shared.touch()
    shared.chmod(0o640)
    db = await open_database(shared, ["CREATE TABLE IF NOT EXISTS t (n INTEGER)"])
    try:
        assert mode(shared) == 0o640
    finally:
        await db.close()
