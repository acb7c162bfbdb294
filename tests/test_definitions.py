"""The definitions layer's SQLite backend: atomic commits, revisions, If-Match, and
what survives a reopen."""

from __future__ import annotations

import pytest

from lucid.definitions import (
    Conflict,
    PreconditionFailed,
    Snapshot,
    SqliteBackend,
    Write,
    merged,
)


async def test_a_new_store_is_empty_at_revision_zero(tmp_path):
    backend = await SqliteBackend.open(tmp_path / "definitions.db")
    try:
        snapshot = await backend.load()
        assert snapshot.revision == 0 and not snapshot.items
    finally:
        await backend.close()


async def test_each_commit_bumps_the_revision_and_stamps_what_it_wrote(tmp_path):
    backend = await SqliteBackend.open(tmp_path / "definitions.db")
    try:
        first = await backend.commit([Write("limit", "a", {"rate": 1})], 0, {("limit", "a"): None})
        assert first.revision == 1 and first.get("limit", "a").revision == 1
        second = await backend.commit(
            [Write("limit", "b", {"rate": 2}), Write("route", "r", {"prefix": "/"})], 1, {})
        assert second.revision == 2
        assert second.get("limit", "a").revision == 1
        assert second.get("limit", "b").revision == 2
        assert list(second.of("limit")) == ["a", "b"]
        third = await backend.commit([Write("limit", "a", None)], 2, {("limit", "a"): 1})
        assert third.revision == 3 and third.get("limit", "a") is None
    finally:
        await backend.close()


async def test_commits_survive_a_reopen(tmp_path):
    path = tmp_path / "definitions.db"
    backend = await SqliteBackend.open(path)
    await backend.commit([Write("pool", "p", {"algorithm": "round_robin"})], 0, {})
    await backend.close()
    backend = await SqliteBackend.open(path)
    try:
        snapshot = await backend.load()
        assert snapshot.revision == 1
        assert snapshot.get("pool", "p").body == {"algorithm": "round_robin"}
    finally:
        await backend.close()


async def test_if_match_refuses_a_stale_revision_and_writes_nothing(tmp_path):
    backend = await SqliteBackend.open(tmp_path / "definitions.db")
    try:
        await backend.commit([Write("limit", "a", {"rate": 1})], 0, {})
        await backend.commit([Write("limit", "a", {"rate": 2})], 1, {("limit", "a"): 1})
        with pytest.raises(PreconditionFailed):
            await backend.commit([Write("limit", "a", {"rate": 3})], 2, {("limit", "a"): 1})
        with pytest.raises(Conflict):
            await backend.commit([Write("limit", "a", {"rate": 3})], 2, {("limit", "a"): None})
        snapshot = await backend.load()
        assert snapshot.revision == 2 and snapshot.get("limit", "a").body == {"rate": 2}
    finally:
        await backend.close()


async def test_a_commit_validated_against_an_old_revision_is_refused(tmp_path):
    """Two processes on one file (workers): the second must validate again."""
    path = tmp_path / "definitions.db"
    one, two = await SqliteBackend.open(path), await SqliteBackend.open(path)
    try:
        await one.commit([Write("limit", "a", {"rate": 1})], 0, {})
        with pytest.raises(PreconditionFailed):
            await two.commit([Write("limit", "b", {"rate": 1})], 0, {})
        fresh = await two.load()
        done = await two.commit([Write("limit", "b", {"rate": 1})], fresh.revision, {})
        assert set(done.items) == {("limit", "a"), ("limit", "b")}
    finally:
        await one.close()
        await two.close()


def test_static_definitions_come_first_and_win_their_ids():
    snapshot = Snapshot(0).applied([Write("limit", "x", {"rate": 9}),
                                    Write("limit", "b", {"rate": 2})], 1)
    out = merged({"x": {"rate": 1}, "a": {"rate": 1}}, snapshot, "limit")
    assert list(out) == ["x", "a", "b"]
    assert out["x"].origin == "static" and out["x"].body == {"rate": 1}
    assert out["b"].origin == "dynamic" and out["b"].revision == 1
