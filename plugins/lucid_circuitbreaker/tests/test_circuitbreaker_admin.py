"""The admin API: all seven endpoints plus force-open and disable, bad input,
static circuits, and persistence across a kill -9."""

from __future__ import annotations

import json
import signal
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lucid_circuitbreaker.testing import Switch, plugin_of

from lucid.testing import PluginAdmin, json_request, run_gateway
from lucid.testing_internal import two_services

STATIC = """
[circuitbreaker.circuits.fixed]
service = "other"
consecutive_failures = 5
"""


class Admin(PluginAdmin):
    def __init__(self, gw: Any):
        super().__init__(gw, "/circuitbreaker")

    async def proxy(self, path: str = "/x") -> tuple[int, dict[str, str]]:
        async with self.gw.session.get(self.gw.proxy_url + path) as r:
            await r.read()
            return r.status, dict(r.headers)


@pytest.fixture
async def setup(lucid_upstream: Any, lucid_gateway: Any) -> tuple[Admin, Switch]:
    switch = Switch(500)
    up = await lucid_upstream(switch)
    gw = await lucid_gateway(two_services(up.url, STATIC))
    return Admin(gw), switch


async def test_create_list_replace_delete(setup: tuple[Admin, Switch]) -> None:
    admin, switch = setup
    code, body = await admin("POST", "/circuits", {
        "id": "svc-breaker", "service": "svc", "consecutive_failures": 2,
        "wait_duration_in_open_state": "30s", "fallback": {"status": 200, "body": "later"}})
    assert code == 201, body
    assert body["source"] == "api"
    assert body["effective"]["wait_duration_in_open_state"] == 30
    code, listing = await admin("GET", "/circuits")
    assert code == 200
    assert sorted(c["id"] for c in listing["circuits"]) == ["fixed", "svc-breaker"]
    assert [(await admin.proxy())[0] for _ in range(3)] == [500, 500, 200]  # fallback
    assert switch.calls == 2

    code, body = await admin("PUT", "/circuits/svc-breaker",
                             {"service": "svc", "consecutive_failures": 4})
    assert code == 200 and body["definition"] == {"service": "svc", "consecutive_failures": 4}
    code, status = await admin("GET", "/circuits/svc-breaker")
    assert status["status"]["state"] == "closed"  # a changed definition starts closed
    assert [(await admin.proxy())[0] for _ in range(5)] == [500] * 4 + [503]

    code, body = await admin("DELETE", "/circuits/svc-breaker")
    assert (code, body) == (200, {"deleted": "svc-breaker"})
    assert (await admin("GET", "/circuits/svc-breaker"))[0] == 404
    assert (await admin.proxy())[0] == 500  # no circuit any more


async def test_health_and_status(setup: tuple[Admin, Switch]) -> None:
    admin, _ = setup
    code, health = await admin("GET", "/health")
    assert (code, health["status"], health["circuits"], health["not_closed"]) == (
        200, "ok", 1, [])
    code, status = await admin("GET", "/status")
    [fixed] = status["circuits"]
    assert fixed["id"] == "fixed" and fixed["state"] == "closed"
    for key in ("since", "failure_rate", "slow_call_rate", "calls_in_window", "next_probe_at"):
        assert key in fixed


@pytest.mark.parametrize(("payload", "field"), [
    ({"id": "c", "service": "svc", "failure_rate_threshold": 150}, "failure_rate_threshold"),
    ({"id": "c", "service": "svc", "failure_rate_threshold": -1}, "failure_rate_threshold"),
    ({"id": "c", "service": "svc", "slow_call_rate_threshold": 101}, "slow_call_rate_threshold"),
    ({"id": "c", "service": "svc", "sliding_window_size": 0}, "sliding_window_size"),
    ({"id": "c", "service": "svc", "sliding_window_size": 5, "minimum_number_of_calls": 6},
     "minimum_number_of_calls"),
    ({"id": "c", "service": "svc", "wait_duration_in_open_state": "soon"},
     "wait_duration_in_open_state"),
    ({"id": "c", "service": "svc", "scope": "zone"}, "scope"),
    ({"id": "c", "service": "svc", "failure_statuses": [700]}, "failure_statuses"),
    ({"id": "c", "service": "svc", "bogus": 1}, "bogus"),
    ({"id": "c"}, "service"),
    ({"id": "bad id", "service": "svc"}, "id"),
    ({"id": "c", "service": "svc", "fallback": {"service": "x", "body": "y"}}, "fallback"),
])
async def test_bad_input_is_422_naming_the_field_and_changes_nothing(
    setup: tuple[Admin, Switch], payload: dict[str, Any], field: str
) -> None:
    admin, _ = setup
    code, body = await admin("POST", "/circuits", payload)
    assert code == 422, body
    assert body["error"] == "validation failed"
    assert any(f["field"].startswith(field) for f in body["fields"]), body
    assert [c["id"] for c in (await admin("GET", "/circuits"))[1]["circuits"]] == ["fixed"]


async def test_malformed_json_is_422(setup: tuple[Admin, Switch]) -> None:
    admin, _ = setup
    code, body = await admin("POST", "/circuits", data=b"{nope",
                             headers={"content-type": "application/json"})
    assert code == 422 and body["fields"][0]["field"] == "body"


@pytest.mark.parametrize(("method", "path", "payload"), [
    ("GET", "/circuits/nope", None),
    ("PUT", "/circuits/nope", {"service": "svc"}),
    ("DELETE", "/circuits/nope", None),
    ("POST", "/circuits/nope/reset", None),
    ("POST", "/circuits/nope/force-open", None),
    ("POST", "/circuits/nope/disable", None),
])
async def test_unknown_circuit_is_404(setup: tuple[Admin, Switch], method: str, path: str,
                                      payload: Any) -> None:
    admin, _ = setup
    code, body = await admin(method, path, payload)
    assert code == 404 and body["field"] == "circuit_id"


async def test_conflicts_are_409(setup: tuple[Admin, Switch]) -> None:
    admin, _ = setup
    code, body = await admin("DELETE", "/circuits/fixed")
    assert code == 409 and "config file" in body["error"]
    code, body = await admin("PUT", "/circuits/fixed", {"service": "other"})
    assert code == 409
    code, body = await admin("POST", "/circuits", {"id": "fixed", "service": "svc"})
    assert code == 409 and body["field"] == "id"
    code, body = await admin("POST", "/circuits", {"id": "again", "service": "other"})
    assert code == 409 and body["field"] == "service"
    assert (await admin("POST", "/circuits", {"id": "c1", "service": "svc"}))[0] == 201
    assert (await admin("POST", "/circuits", {"id": "c1", "service": "svc"}))[0] == 409


async def test_force_open_disable_reset(setup: tuple[Admin, Switch]) -> None:
    admin, switch = setup
    assert (await admin("POST", "/circuits", {
        "id": "c", "service": "svc", "consecutive_failures": 2}))[0] == 201
    code, body = await admin("POST", "/circuits/c/force-open")
    assert code == 200 and body["state"] == "forced_open" and body["mode"] == "forced_open"
    status, headers = await admin.proxy()
    assert status == 503 and "Retry-After" not in headers and switch.calls == 0

    code, body = await admin("POST", "/circuits/c/disable")
    assert body["state"] == "metrics_only"
    assert [(await admin.proxy())[0] for _ in range(4)] == [500] * 4  # never trips
    code, body = await admin("GET", "/circuits/c")
    assert body["status"]["failed_calls"] == 4  # but still counts

    code, body = await admin("POST", "/circuits/c/reset")
    assert (body["state"], body["mode"], body["calls_in_window"]) == ("closed", "normal", 0)
    assert [(await admin.proxy())[0] for _ in range(3)] == [500, 500, 503]
    code, status = await admin("GET", "/status")
    assert status["transitions"]["closed->forced_open"] == 1
    assert status["transitions"]["closed->open"] == 1


async def test_static_circuits_can_be_forced_open(setup: tuple[Admin, Switch]) -> None:
    admin, _ = setup
    code, body = await admin("POST", "/circuits/fixed/force-open")
    assert code == 200 and body["state"] == "forced_open"
    assert plugin_of(admin.gw).circuits["fixed"].mode == "forced_open"


async def test_definitions_and_modes_survive_kill_9(
    lucid_upstream: Any, lucid_process: Any, tmp_path: Path
) -> None:
    switch = Switch(200)
    up = await lucid_upstream(switch)
    data_dir = str(tmp_path / "shared-data")
    first = lucid_process(two_services(up.url, STATIC), data_dir=data_dir)
    async with aiohttp.ClientSession() as session:
        admin = first.admin_url + "/circuitbreaker"
        code, _ = await json_request(session, "POST", admin + "/circuits",
                             json={"id": "c", "service": "svc", "consecutive_failures": 3,
                                   "fallback": {"service": "other"}})
        assert code == 201
        assert (await json_request(session, "POST", admin + "/circuits/c/force-open"))[0] == 200
        assert (await json_request(session, "POST", admin + "/circuits/fixed/disable"))[0] == 200
        assert (await json_request(session, "POST", admin + "/circuits",
                           json={"id": "x", "service": "nowhere",
                                 "failure_rate_threshold": 500}))[0] == 422
    first.signal(signal.SIGKILL)
    first.wait()

    # a route in the file may name a circuit made through the API: the config is
    # checked against the store before the plugin starts
    pinned = ('\n[[gateway.routes]]\nid = "pinned"\nprefix = "/pinned"\nservice = "other"\n'
              'plugins = { circuitbreaker = { circuit = "c" } }\n')
    second = lucid_process(two_services(up.url, STATIC) + pinned, data_dir=data_dir)
    async with aiohttp.ClientSession() as session:
        admin = second.admin_url + "/circuitbreaker"
        code, listing = await json_request(session, "GET", admin + "/circuits")
        modes = {c["id"]: (c["mode"], c["source"]) for c in listing["circuits"]}
        assert modes == {"fixed": ("metrics_only", "static"), "c": ("forced_open", "api")}
        async with session.get(second.proxy_url + "/x") as r:
            assert r.status == 200  # refused, answered by the fallback service
            assert r.headers["x-lucid-fallback"] == "c"
        assert switch.calls == 1
        async with session.get(second.proxy_url + "/pinned") as r:
            assert r.status == 200 and r.headers["x-lucid-fallback"] == "c"


async def test_routes_may_name_api_circuits_which_cannot_then_be_deleted(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    up = await lucid_upstream()
    gw = await lucid_gateway(two_services(up.url))
    admin = Admin(gw)
    assert (await admin("POST", "/circuits", {"id": "api", "service": "other"}))[0] == 201
    route = {"id": "guarded", "prefix": "/g", "service": "svc",
             "plugins": {"circuitbreaker": {"circuit": "api"}}}
    async with gw.session.post(gw.admin_url + "/gateway/route", json=route) as r:
        assert r.status == 201, await r.text()
    bad = {**route, "id": "dangling", "plugins": {"circuitbreaker": {"circuit": "nope"}}}
    async with gw.session.post(gw.admin_url + "/gateway/route", json=bad) as r:
        assert r.status == 422
        assert "circuitbreaker.circuit = 'nope'" in " ".join((await r.json())["problems"])
    status, body = await admin("DELETE", "/circuits/api")
    assert status == 409 and body["routes"] == ["guarded"]
    assert [c["id"] for c in (await admin("GET", "/circuits"))[1]["circuits"]] == ["api"]
    async with gw.session.delete(gw.admin_url + "/gateway/route/guarded") as r:
        assert r.status == 200
    assert (await admin("DELETE", "/circuits/api"))[0] == 200


async def test_circuits_cannot_be_made_through_the_api_with_several_workers(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    up = await lucid_upstream()
    gw = await lucid_gateway(two_services(up.url) + "\n[server]\nworkers = 2\n")
    status, body = await Admin(gw)("POST", "/circuits", {"id": "c", "service": "svc"})
    assert status == 409 and "2 workers" in body["error"] and body["field"] == "id"
    assert (await Admin(gw)("GET", "/circuits"))[1]["circuits"] == []


async def test_circuits_an_older_lucid_kept_are_imported_once(
    lucid_upstream: Any, tmp_path: Path
) -> None:
    """Upgrading: circuits an older Lucid stored in circuitbreaker.db move to the core's
    definitions store on the first start; their operator modes stay where they were."""
    switch = Switch(200)
    up = await lucid_upstream(switch)
    data_dir = tmp_path / "old-data"
    data_dir.mkdir()
    with closing(sqlite3.connect(data_dir / "circuitbreaker.db")) as db, db:  # older schema
        db.execute("CREATE TABLE circuits (id TEXT PRIMARY KEY, spec TEXT NOT NULL, "
                   "updated REAL NOT NULL)")
        db.execute("CREATE TABLE modes (id TEXT PRIMARY KEY, mode TEXT NOT NULL)")
        db.execute("INSERT INTO circuits VALUES (?, ?, 0)", (
            "old", json.dumps({"service": "svc", "consecutive_failures": 3,
                               "wait_duration_in_open_state": 30.0})))
        db.execute("INSERT INTO modes VALUES ('old', 'forced_open')")
    async with run_gateway(two_services(up.url), tmp_path / "first",
                           data_dir=str(data_dir)) as gw:
        admin = Admin(gw)
        code, body = await admin("GET", "/circuits/old")
        assert code == 200, body
        assert (body["source"], body["revision"], body["mode"]) == ("api", 1, "forced_open")
        assert body["definition"] == {"service": "svc", "consecutive_failures": 3,
                                      "wait_duration_in_open_state": 30.0}
        assert (await admin.proxy())[0] == 503 and switch.calls == 0  # still forced open
        with closing(sqlite3.connect(data_dir / "definitions.db")) as db:
            assert db.execute("SELECT kind, id FROM definitions").fetchall() == [
                ("circuit", "old")]
        assert (await admin("DELETE", "/circuits/old"))[0] == 200
    async with run_gateway(two_services(up.url), tmp_path / "second",
                           data_dir=str(data_dir)) as gw:
        admin = Admin(gw)  # deleted stays deleted: the old table is not read again
        assert (await admin("GET", "/circuits"))[1]["circuits"] == []
        assert (await admin.proxy())[0] == 200
        assert (await admin("POST", "/circuits", {"id": "old", "service": "svc"}))[0] == 201
        assert (await admin("GET", "/circuits/old"))[1]["mode"] == "normal"  # mode forgotten


async def test_reads_show_the_revision_and_writes_honour_if_match(
    setup: tuple[Admin, Switch]
) -> None:
    admin, _ = setup
    code, body = await admin("POST", "/circuits", {"id": "c", "service": "svc"})
    assert code == 201
    revision = body["revision"]
    assert revision > 0
    assert (await admin("GET", "/circuits/c"))[1]["revision"] == revision
    listed = {c["id"]: c["revision"] for c in (await admin("GET", "/circuits"))[1]["circuits"]}
    assert listed == {"fixed": 0, "c": revision}  # static ones have no store revision

    change = {"service": "svc", "consecutive_failures": 2}
    code, body = await admin("PUT", "/circuits/c", change,
                             headers={"If-Match": str(revision + 1)})
    assert code == 412 and body["revision"] == revision
    assert (await admin("GET", "/circuits/c"))[1]["definition"] == {"service": "svc"}
    code, body = await admin("PUT", "/circuits/c", change, headers={"If-Match": str(revision)})
    assert code == 200 and body["revision"] > revision
    code, body = await admin("DELETE", "/circuits/c", headers={"If-Match": f'"{revision}"'})
    assert code == 412
    code, body = await admin("DELETE", "/circuits/c", headers={"If-Match": "W/\"x\""})
    assert code == 412
    current = (await admin("GET", "/circuits/c"))[1]["revision"]
    assert (await admin("DELETE", "/circuits/c", headers={"If-Match": str(current)}))[0] == 200


async def test_a_write_of_another_kind_keeps_the_breaker_state(
    setup: tuple[Admin, Switch]
) -> None:
    """Every definition write makes a new generation; circuits that did not change
    carry their state into it (lucid_activate), whatever kind was written."""
    admin, switch = setup
    assert (await admin("POST", "/circuits", {
        "id": "c", "service": "svc", "consecutive_failures": 1,
        "wait_duration_in_open_state": "1h"}))[0] == 201
    before = plugin_of(admin.gw).circuits["c"]
    assert [(await admin.proxy())[0] for _ in range(2)] == [500, 503]
    route = {"id": "extra", "prefix": "/extra", "service": "other"}
    async with admin.gw.session.post(admin.gw.admin_url + "/gateway/route", json=route) as r:
        assert r.status == 201, await r.text()
    assert plugin_of(admin.gw).circuits["c"] is before
    assert (await admin.proxy())[0] == 503 and switch.calls == 1  # still open
    assert (await admin("POST", "/circuits", {"id": "d", "service": "nowhere"}))[0] == 201
    assert plugin_of(admin.gw).circuits["c"] is before
