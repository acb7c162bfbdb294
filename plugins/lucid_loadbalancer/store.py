"""Where the affinity signing key is kept: ``<data_dir>/loadbalancer.db``, or with
a Redis backend the cluster's key in Redis (:func:`cluster_affinity_key`), so a cookie
minted by one node is honoured by every node.

Pools made through the admin API live in the core's definitions store; an older
Lucid kept them in this file's ``pools`` table, which ``legacy_pools`` (in the
package) imports once and leaves in place."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lucid.store import open_database

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from lucid.cluster import Cluster

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


async def cluster_affinity_key(cluster: Cluster) -> bytes:
    """The cluster's random affinity key: made once by whichever process asks first
    (``SET NX``), then read by every node and worker. Raises
    ``lucid.definitions.BackendUnavailable`` while Redis is unreachable."""
    key = cluster.key("loadbalancer", "affinity_key")

    async def made_or_read(redis: Redis) -> list[Any]:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(key, secrets.token_hex(32), nx=True)
            pipe.get(key)
            return await pipe.execute()

    _, value = await cluster.call(made_or_read)
    return bytes.fromhex(value)
