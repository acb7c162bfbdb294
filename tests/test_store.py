"""The embedded store: WAL mode, and a committed write survives kill -9 of its writer."""

from __future__ import annotations

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
