"""Definitions: what operators manage as named entities -- routes, limits, circuits,
pools, alert rules.

A definition has a *kind* (``"route"``, ``"limit"`` …), an *id*, a *body* (a JSON
object, valid for its kind's model), an *origin* and a *revision*:

* ``static`` definitions come from the config file. The admin API shows them and
  refuses to change them (409): the file is their source of truth, and a reload
  replaces them.
* ``dynamic`` definitions are written through the admin API and kept by a
  :class:`Backend` -- SQLite under ``data_dir`` on one node, Redis in a cluster.
  Every write is committed there before the API answers, so it survives a
  restart, ``kill -9`` included.

The backend keeps one *revision* for all dynamic definitions, bumped by every
committed write; each definition carries the revision of its own last write (as
etcd's ``mod_revision``). A write may name the revision it expects (HTTP
``If-Match``), and is refused with 412 when the definition has moved on, so two
writers never silently overwrite one another.

Nothing above :class:`Backend` may assume SQLite: the interface is two calls,
:meth:`Backend.load` and :meth:`Backend.commit`, and a second implementation only
has to make ``commit`` atomic.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from lucid.store import Database, open_database

if TYPE_CHECKING:
    from pydantic import BaseModel

log = logging.getLogger("lucid.definitions")
Origin = Literal["static", "dynamic"]
M = TypeVar("M", bound="BaseModel")
Key = tuple[str, str]  # (kind, id)


@dataclass(frozen=True)
class Kind:
    """A kind of definition, as a plugin registered it (``lucid_register_definitions``)."""

    name: str
    model: type[BaseModel]  # validates one body
    # config -> {id: body or validated model}, in file order
    static: Callable[[Any], Mapping[str, Any]] | None = None
    legacy: Callable[[Path], Mapping[str, Mapping[str, Any]]] | None = None  # older stores
    # where the file declares them ("gateway.routes"): the effective config shows the
    # dynamic ones there too (lucid.export)
    section: str | None = None

    def declared(self, config: Any) -> Mapping[str, Any]:
        """The definitions the config file declares, ``{id: body or model}`` in file
        order."""
        return self.static(config) if self.static is not None else {}


class Definition:
    """One entity, as the API shows it and the plugins read it.

    It holds its JSON ``body``, its validated model (``parsed``), or both; each is made
    from the other once, when first asked for. A snapshot carries unchanged
    definitions from one generation to the next as the same objects, so a write
    re-validates only what it wrote, not every route of a large table.
    """

    __slots__ = ("kind", "id", "origin", "revision", "_body", "_value")

    def __init__(self, kind: str, id: str, body: Mapping[str, Any] | None = None,
                 origin: Origin = "dynamic", revision: int = 0, value: Any = None):
        if body is None and value is None:
            raise ValueError("a definition needs a body or a value")
        self.kind = kind
        self.id = id
        self.origin = origin
        self.revision = revision  # the backend revision of its last write; 0 if static
        self._body = body
        self._value = value

    @property
    def body(self) -> Mapping[str, Any]:
        if self._body is None:
            self._body = self._value.model_dump(mode="json", exclude_unset=True)
        return self._body

    def parsed(self, model: type[M]) -> M:
        """The body validated by ``model`` (the kind's), made once."""
        if self._value is None:
            self._value = model.model_validate(dict(self.body))
        return self._value  # type: ignore[no-any-return]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "origin": self.origin,
                "revision": self.revision, "body": dict(self.body)}

    def __repr__(self) -> str:
        return f"Definition({self.kind!r}, {self.id!r}, {self.origin}, r{self.revision})"


class DefinitionError(Exception):
    """A write that cannot be done; ``status`` is the HTTP answer the admin API gives."""

    status = 400

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.message = message
        self.extra = extra


class NotFound(DefinitionError):
    status = 404


class Conflict(DefinitionError):
    """The write contradicts what exists: a static id, an id taken, a definition in use."""

    status = 409


class PreconditionFailed(DefinitionError):
    """``If-Match`` named a revision the definition no longer has."""

    status = 412


class Invalid(DefinitionError):
    """A plugin rejected the configuration the write would make (``problems``)."""

    status = 422


class BackendUnavailable(DefinitionError):
    """The backend could not commit: nothing was written."""

    status = 503


@dataclass(frozen=True, slots=True)
class Write:
    """One change in a commit: ``body`` None deletes."""

    kind: str
    id: str
    body: Mapping[str, Any] | None


@dataclass(frozen=True)
class Snapshot:
    """Every dynamic definition at one backend revision. Immutable: a commit makes a
    new snapshot, so a generation built from one never changes under a request."""

    revision: int = 0
    items: Mapping[Key, Definition] = field(default_factory=dict)

    def of(self, kind: str) -> dict[str, Definition]:
        """The definitions of one kind, by id, in id order."""
        return {i: d for (k, i), d in sorted(self.items.items()) if k == kind}

    def get(self, kind: str, id: str) -> Definition | None:
        return self.items.get((kind, id))

    def applied(self, writes: Sequence[Write], revision: int) -> Snapshot:
        """This snapshot with ``writes`` applied at ``revision``."""
        items = dict(self.items)
        for w in writes:
            if w.body is None:
                items.pop((w.kind, w.id), None)
            else:
                items[(w.kind, w.id)] = Definition(w.kind, w.id, dict(w.body), "dynamic",
                                                   revision)
        return Snapshot(revision, items)


def check_expectations(current: Snapshot, expect: Mapping[Key, int | None]) -> None:
    """Raise :class:`PreconditionFailed` unless every expectation holds: an int is the
    revision the definition must have now, None that it must not exist."""
    for (kind, id), wanted in expect.items():
        found = current.get(kind, id)
        if wanted is None and found is not None:
            raise Conflict(f"{kind} {id!r} already exists", field="id")
        if wanted is not None and (found is None or found.revision != wanted):
            now = "deleted" if found is None else f"at revision {found.revision}"
            raise PreconditionFailed(
                f"{kind} {id!r} is {now}, not at revision {wanted} (If-Match)",
                revision=None if found is None else found.revision)


class Backend(Protocol):
    """Where dynamic definitions live. ``commit`` is atomic: all writes and the
    revision bump, or nothing."""

    name: str

    async def load(self) -> Snapshot:
        """Every dynamic definition, at the backend's current revision."""
        ...

    async def commit(self, writes: Sequence[Write], base: int,
                     expect: Mapping[Key, int | None]) -> Snapshot:
        """Apply ``writes`` if ``expect`` holds, as revision ``base + 1``.

        ``base`` is the revision the caller validated against; a backend shared by
        several writers refuses the commit (:class:`PreconditionFailed`) when its
        revision moved past ``base`` and the writes touch something changed since,
        so the caller validates again against the new snapshot. Returns the
        snapshot after the commit.
        """
        ...

    async def revision(self) -> int:
        """The backend's current revision: cheap, to see whether to load again."""
        ...

    async def close(self) -> None: ...


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS definitions (
        kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL,
        revision INTEGER NOT NULL, updated_at REAL NOT NULL,
        PRIMARY KEY (kind, id))""",
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)""",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0)",
)


class SqliteBackend:
    """``<data_dir>/definitions.db``: one node's dynamic definitions (the default)."""

    name = "local"

    def __init__(self, db: Database, path: Path):
        self.db = db
        self.path = path
        self._snapshot: Snapshot | None = None

    @classmethod
    async def open(cls, path: Path) -> SqliteBackend:
        return cls(await open_database(path, SCHEMA), path)

    async def load(self) -> Snapshot:
        def read(conn: Any) -> Snapshot:
            revision = conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0]
            items = {
                (kind, id): Definition(kind, id, json.loads(body), "dynamic", rev)
                for kind, id, body, rev in conn.execute(
                    "SELECT kind, id, body, revision FROM definitions")
            }
            return Snapshot(revision, items)

        self._snapshot = await self.db.transaction(read)
        return self._snapshot

    async def commit(self, writes: Sequence[Write], base: int,
                     expect: Mapping[Key, int | None]) -> Snapshot:
        now = time.time()

        def run(conn: Any) -> int:
            revision = conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0]
            if revision != base:  # another process (a worker) wrote: validate again
                raise _Moved(revision)
            for (kind, id), wanted in expect.items():
                row = conn.execute("SELECT revision FROM definitions WHERE kind = ? AND id = ?",
                                   (kind, id)).fetchone()
                check_expectations(
                    Snapshot(revision, {} if row is None else
                             {(kind, id): Definition(kind, id, {}, "dynamic", row[0])}),
                    {(kind, id): wanted})
            revision += 1
            for w in writes:
                if w.body is None:
                    conn.execute("DELETE FROM definitions WHERE kind = ? AND id = ?",
                                 (w.kind, w.id))
                else:
                    conn.execute(
                        "INSERT INTO definitions (kind, id, body, revision, updated_at) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, id) DO UPDATE SET "
                        "body = excluded.body, revision = excluded.revision, "
                        "updated_at = excluded.updated_at",
                        (w.kind, w.id, json.dumps(w.body, sort_keys=True), revision, now))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
            return int(revision)

        try:
            revision = await self.db.transaction(run)
        except _Moved as moved:
            raise PreconditionFailed(
                f"the definitions moved on to revision {moved.revision}; read them again",
                revision=moved.revision) from None
        base_snapshot = self._snapshot if (
            self._snapshot is not None and self._snapshot.revision == base) else None
        if base_snapshot is None:
            self._snapshot = await self.load()
        else:
            self._snapshot = base_snapshot.applied(writes, revision)
        return self._snapshot

    async def revision(self) -> int:
        async with self.db.execute("SELECT value FROM meta WHERE key = 'revision'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row is not None else 0

    async def close(self) -> None:
        await self.db.close()


class _Moved(Exception):
    def __init__(self, revision: int):
        self.revision = revision


def legacy_rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    """Rows an older Lucid's own SQLite file holds, read-only, for a kind's ``legacy``
    reader: none when the file or its table does not exist (nothing to move)."""
    import contextlib
    import sqlite3

    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            return conn.execute(query).fetchall()
        except sqlite3.OperationalError:  # no such table: that version kept none
            return []


def legacy_writes(data_dir: Path, kinds: Mapping[str, Kind]) -> list[Write]:
    """What the kinds' ``legacy`` readers find under ``data_dir``: definitions an older
    Lucid kept in each plugin's own store. A reader that fails is logged and skipped."""
    writes: list[Write] = []
    for kind in kinds.values():
        if kind.legacy is None:
            continue
        try:
            found = kind.legacy(data_dir)
        except Exception:
            log.exception("reading older %s definitions under %s failed; none imported",
                          kind.name, data_dir)
            continue
        writes += [Write(kind.name, id, body) for id, body in found.items()]
    return writes


def read_stored(data_dir: Path, kinds: Mapping[str, Kind]) -> Snapshot:
    """The dynamic definitions a gateway with this ``data_dir`` has stored, read-only
    and without starting it (``lucid config export``). A data dir an older Lucid wrote
    is read through the kinds' ``legacy`` readers, as the gateway would import it."""
    import contextlib
    import sqlite3

    path = data_dir / "definitions.db"
    if path.exists():
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            revision = conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
            if revision is not None and revision[0] > 0:
                return Snapshot(revision[0], {
                    (kind, id): Definition(kind, id, json.loads(body), "dynamic", rev)
                    for kind, id, body, rev in conn.execute(
                        "SELECT kind, id, body, revision FROM definitions")})
    writes = legacy_writes(data_dir, kinds)
    return Snapshot().applied(writes, 1) if writes else Snapshot()


def merged(static: Mapping[str, Any], snapshot: Snapshot, kind: str) -> dict[str, Definition]:
    """Static definitions of ``kind`` (file order) followed by the dynamic ones (id
    order). A dynamic id that a static one now takes (the file gained it) is left out:
    the file wins, and the API shows the static one."""
    out = {id: _static(kind, id, given) for id, given in static.items()}
    for id, definition in snapshot.of(kind).items():
        out.setdefault(id, definition)
    return out


def ids(definitions: Iterable[Definition]) -> list[str]:
    return [d.id for d in definitions]


def _static(kind: str, id: str, given: Any) -> Definition:
    if isinstance(given, Mapping):
        return Definition(kind, id, given, "static")
    return Definition(kind, id, None, "static", value=given)
