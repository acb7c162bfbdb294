"""The core's operations endpoints (``lucid.admin``): health, status, reload, config,
metrics and the audit of every admin write answer whichever plugin does routing, and
the audit rows an older Lucid kept in the gateway plugin's ``gateway.db`` survive the
upgrade."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from lucid.admin import mint_admin_token
from lucid.definitions import Kind, Snapshot, Write
from lucid.export import effective_config
from lucid.testing import run_gateway, wait_until

THIRDPARTY = Path(__file__).resolve().parent / "fixtures" / "thirdparty"
ADMIN_SECRET = "a" * 48


def admin_token(role: str) -> str:
    return mint_admin_token(ADMIN_SECRET, role, 3600, "tests")


@pytest.fixture
def thirdparty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(THIRDPARTY))


async def call(gw: Any, method: str, path: str, token: str | None = None,
               **kw: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with gw.session.request(method, gw.admin_url + path, headers=headers, **kw) as r:
        return r.status, await r.json(content_type=None)


async def test_operations_answer_with_a_third_party_router(
    thirdparty: None, lucid_upstream: Any, tmp_path: Path
) -> None:
    upstream = await lucid_upstream()
    toml = f"""
[server]
admin_secret = "{ADMIN_SECRET}"

[plugins]
gateway = "fakerouter"

[fakerouter]
upstream = "{upstream.url}"
prefix = "/api"
"""
    admin, viewer = admin_token("admin"), admin_token("viewer")
    async with run_gateway(toml, tmp_path) as gw:
        assert "gateway" not in {p.name for p in gw.runtime.plugin_set.plugins}
        # health: open without a token, the core's own checks
        status, body = await call(gw, "GET", "/gateway/health")
        assert (status, body["status"]) == (200, "ok")
        assert body["checks"] == {"plugins_started": True, "store": True}

        status, body = await call(gw, "GET", "/gateway/status", viewer)
        assert status == 200
        assert {"name": "fakerouter", "capability": "gateway"} in body["plugins"]
        generation = body["generation"]

        async with gw.session.get(f"{gw.proxy_url}/api/x") as r:
            assert r.status == 200 and r.headers["x-routed-by"] == "fakerouter"

        async def counted() -> bool:
            return bool((await call(gw, "GET", "/gateway/metrics", viewer))[1]["requests"])

        await wait_until(counted, message="the request to be counted")

        status, body = await call(gw, "GET", "/gateway/config", viewer)
        assert status == 200
        assert body["config"]["fakerouter"] == {"upstream": upstream.url, "prefix": "/api"}
        assert body["config"]["server"]["admin_secret"] == "***"
        assert "gateway" not in body["config"]

        status, body = await call(gw, "POST", "/gateway/config/reload", admin)
        assert (status, body["generation"]) == (200, generation + 1)

        # a third-party plugin's own write endpoint is audited like the core's
        status, body = await call(gw, "POST", "/fakerouter/notes", admin, json={"n": 1})
        assert (status, body) == (201, {"noted": {"n": 1}})
        status, _ = await call(gw, "POST", "/fakerouter/notes", viewer, json={"n": 2})
        assert status == 403

        status, body = await call(gw, "GET", "/gateway/audit", viewer)
        assert status == 200
        assert [(e["method"], e["path"], e["status"], e["summary"]) for e in body["entries"]
                ] == [("POST", "/fakerouter/notes", 403, '{"n":2}'),
                      ("POST", "/fakerouter/notes", 201, '{"n":1}'),
                      ("POST", "/gateway/config/reload", 200, "")]
        assert body["entries"][1]["subject"] == "tests"


OLD_GATEWAY_DB = (
    """CREATE TABLE routes (
        id TEXT PRIMARY KEY, definition TEXT NOT NULL, updated_at REAL NOT NULL)""",
    """CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, subject TEXT NOT NULL,
        role TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,
        summary TEXT NOT NULL, request_id TEXT NOT NULL)""",
    "CREATE INDEX audit_at ON audit (at)",
)


def older_gateway_db(data: Path) -> None:
    """A ``gateway.db`` as the gateway plugin of an older Lucid left it."""
    data.mkdir(parents=True)
    with sqlite3.connect(data / "gateway.db") as conn:
        for statement in OLD_GATEWAY_DB:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO audit (at, subject, role, method, path, status, summary, request_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(1000.0, "alice", "admin", "POST", "/gateway/route", 201, '{"id":"a"}', "r1"),
             (2000.0, "bob", "admin", "DELETE", "/gateway/route/a", 200, "", "r2")])


async def test_audit_rows_an_older_lucid_kept_are_imported_once(tmp_path: Path) -> None:
    older_gateway_db(tmp_path / "data")
    config = "[gateway.services.svc]\ninstances = [\"http://127.0.0.1:9\"]\n"

    def rows(body: Any) -> list[tuple[str, str, str]]:
        return [(e["subject"], e["method"], e["path"]) for e in body["entries"]]

    async with run_gateway(config, tmp_path) as gw:
        assert (await call(gw, "POST", "/gateway/config/reload"))[0] == 200
        status, body = await call(gw, "GET", "/gateway/audit")
        assert status == 200
        assert rows(body) == [("anonymous", "POST", "/gateway/config/reload"),
                              ("bob", "DELETE", "/gateway/route/a"),
                              ("alice", "POST", "/gateway/route")]
        assert body["entries"][2]["at"] == 1000.0
        assert body["entries"][2]["request_id"] == "r1"
        status, body = await call(gw, "GET", "/gateway/audit?until=1500")
        assert rows(body) == [("alice", "POST", "/gateway/route")]
    # the next start finds them imported already: nothing twice
    async with run_gateway(config, tmp_path) as gw:
        status, body = await call(gw, "GET", "/gateway/audit")
        assert [e["subject"] for e in body["entries"]] == ["anonymous", "bob", "alice"]
    with sqlite3.connect(tmp_path / "data" / "gateway.db") as conn:  # left as it was
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (2,)


async def test_health_is_unavailable_while_the_definitions_store_does_not_answer(
    lucid_gateway: Any,
) -> None:
    gw = await lucid_gateway("[gateway.services.svc]\ninstances = [\"http://127.0.0.1:9\"]\n")
    assert (await call(gw, "GET", "/gateway/health"))[0] == 200
    backend = gw.runtime.backend
    await backend.db.close()  # the store is gone (the file's disk, say)
    status, body = await call(gw, "GET", "/gateway/health")
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["checks"] == {"plugins_started": True, "store": False}


async def test_metrics_count_only_the_last_minute(lucid_gateway: Any) -> None:
    gw = await lucid_gateway("[gateway.services.svc]\ninstances = [\"http://127.0.0.1:9\"]\n")
    now = time.perf_counter()
    gw.runtime.recent.extend([(now - 120.0, 0.5, 200), (now - 1.0, 0.002, 502)])
    status, body = await call(gw, "GET", "/gateway/metrics")
    assert status == 200
    assert body["requests"] == 1 and body["error_rate"] == 1.0
    assert body["latency_ms"]["p50"] == 2.0


# --- the effective config: each kind's dynamic definitions where its section is -------------


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int = 1


class Section(BaseModel):
    routes: list[dict[str, Any]] = []
    tables: dict[str, Item] = {}


class Root(BaseModel):
    thing: Section = Section()


def test_effective_config_places_dynamic_definitions_in_their_section() -> None:
    kinds = {
        "listed": Kind("listed", Item, static=lambda c: {"file": {"size": 1}},
                       section="thing.routes"),
        "tabled": Kind("tabled", Item, section="thing.tables"),
        "hidden": Kind("hidden", Item),
    }
    config = Root(thing=Section(routes=[{"id": "file", "size": 1}]))
    snapshot = Snapshot().applied([
        Write("listed", "dyn", {"size": 2}),
        Write("listed", "file", {"size": 9}),  # the file took this id since: it wins
        Write("tabled", "t1", {}),
        Write("hidden", "h", {"size": 3}),
    ], 1)
    full = effective_config(config, kinds, snapshot, full=True)
    assert full == {"thing": {  # "hidden" has no section: left out
        "routes": [{"id": "file", "size": 1}, {"id": "dyn", "size": 2}],
        "tables": {"t1": {"size": 1}}}}
    brief = effective_config(config, kinds, snapshot, full=False)
    assert brief["thing"]["tables"] == {"t1": {}}  # as written


async def test_config_export_carries_every_kind_and_loads_again(lucid_upstream: Any,
                                                                lucid_gateway: Any) -> None:
    """Routes, limits, circuits and pools written through the API come out of
    ``lucid config export`` in their sections, and the exported file is a valid config
    that declares them (the file is a backup an operator can restore)."""
    import subprocess
    import sys
    import tomllib

    upstream = await lucid_upstream()
    gw = await lucid_gateway(f"""
[gateway.services.svc]
instances = ["{upstream.url}"]
[[gateway.routes]]
id = "static"
prefix = "/"
service = "svc"
""")
    writes = [
        ("/gateway/route", {"id": "r1", "prefix": "/r1", "service": "svc"}),
        ("/ratelimiter/limits", {"id": "l1", "rate": "10/s", "key": "ip"}),
        ("/circuitbreaker/circuits", {"id": "c1", "service": "svc"}),
        ("/loadbalancer/pools", {"id": "p1", "service": "svc",
                                 "instances": [{"url": upstream.url}]}),
    ]
    for path, body in writes:
        async with gw.session.post(gw.admin_url + path, json=body) as r:
            assert r.status in (200, 201), (path, await r.text())
    result = subprocess.run(
        [sys.executable, "-m", "lucid", "config", "export", "--config", str(gw.config_path)],
        capture_output=True, text=True, timeout=60, check=True)
    exported = tomllib.loads(result.stdout)
    assert [r["id"] for r in exported["gateway"]["routes"]] == ["static", "r1"]
    assert [limit["id"] for limit in exported["ratelimiter"]["limits"]] == ["l1"]
    assert list(exported["circuitbreaker"]["circuits"]) == ["c1"]
    assert list(exported["loadbalancer"]["pools"]) == ["p1"]
    restored = gw.config_path.parent / "restored.toml"
    restored.write_text(result.stdout)
    check = subprocess.run([sys.executable, "-m", "lucid", "check", "--config", str(restored)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
