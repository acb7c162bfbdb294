"""What the admin API accepted survives a restart, ``kill -9`` included; static services
come from the config on every start and follow a reload; several worker processes are
refused when the registry is configured."""

from __future__ import annotations

import tomllib

import aiohttp
import tomli_w

from lucid.testing import wait_until

CONFIG = """
[registry.services.billing]
instances = ["http://127.0.0.1:9100"]

[[gateway.routes]]
prefix = "/users"
service = "users"
"""


async def snapshot(session, admin_url):
    async with session.get(admin_url + "/registry/services/users") as r:
        assert r.status == 200
        service = await r.json()
    return {
        "tags": service["tags"], "check": service["check"],
        "instances": {i["id"]: (i["url"], i["weight"], i["zone"], i["status"], i["metadata"],
                                i["maintenance_reason"]) for i in service["instances"]},
    }


async def test_registrations_survive_kill_9(lucid_process, tmp_path):
    data_dir = str(tmp_path / "data")
    first = lucid_process(CONFIG, data_dir=data_dir)
    async with aiohttp.ClientSession() as session:
        admin = first.admin_url
        async with session.post(admin + "/registry/services", json={
            "id": "users", "tags": ["v1"], "check": {"ttl": "1h"},
            "instances": [{"id": "a", "url": "http://127.0.0.1:9001", "zone": "z1"},
                          {"id": "b", "url": "http://127.0.0.1:9002", "weight": 5,
                           "metadata": {"v": "2"}}]}) as r:
            assert r.status == 201
        async with session.post(admin + "/registry/services/users/instances",
                                json={"id": "c", "url": "http://127.0.0.1:9003"}) as r:
            assert r.status == 201
        async with session.post(admin + "/registry/services/users/health",
                                json={"instance": "b", "status": "warning"}) as r:
            assert r.status == 200
        async with session.put(admin + "/registry/services/users/instances/c/maintenance",
                               json={"enabled": True, "reason": "deploy"}) as r:
            assert r.status == 200
        async with session.post(admin + "/registry/services/billing/instances",
                                json={"id": "extra", "url": "http://127.0.0.1:9101"}) as r:
            assert r.status == 201  # a registered instance in a static service
        async with session.post(admin + "/registry/services", json={"id": "gone"}) as r:
            assert r.status == 201
        async with session.delete(admin + "/registry/services/gone") as r:
            assert r.status == 200
        async with session.get(admin + "/registry/services/users") as r:
            index = int(r.headers["X-Lucid-Index"])
        before = await snapshot(session, admin)
        first.proc.kill()
        assert first.wait() == -9

        second = lucid_process(CONFIG, data_dir=data_dir)
        after = await snapshot(session, second.admin_url)
        assert after == before
        assert before["instances"]["b"][3] == "warning"
        assert before["instances"]["c"][3] == "maintenance"
        async with session.get(second.admin_url + "/registry/services") as r:
            names = [s["id"] for s in (await r.json())["services"]]
        assert names == ["billing", "users"]
        async with session.get(second.admin_url + "/registry/services/billing/instances") as r:
            billing = {i["id"]: i["static"] for i in (await r.json())["instances"]}
        assert billing == {"127.0.0.1:9100": True, "extra": False}
        async with session.get(second.admin_url + "/registry/services/users") as r:
            assert int(r.headers["X-Lucid-Index"]) > index  # indexes never go backwards


def test_several_workers_are_refused_when_the_registry_is_configured(lucid_process):
    process = lucid_process(CONFIG, wait=False, workers=2)
    assert process.wait() == 2
    assert "server.workers = 2" in process.output and "registry" in process.output


async def test_a_reload_applies_static_service_changes(lucid_gateway):
    gw = await lucid_gateway("""
        [registry.services.kept]
        instances = [{ id = "k1", url = "http://127.0.0.1:9001" },
                     { id = "k2", url = "http://127.0.0.1:9002" }]
        [registry.services.dropped]
        instances = ["http://127.0.0.1:9003"]
    """)
    async with gw.session.post(gw.admin_url + "/registry/services/kept/instances",
                               json={"id": "dyn", "url": "http://127.0.0.1:9009"}) as r:
        assert r.status == 201
    data = tomllib.loads(gw.config_path.read_text())
    data["registry"] = {"services": {
        "kept": {"tags": ["new"], "instances": [
            {"id": "k1", "url": "http://127.0.0.1:9001"},
            {"id": "k2", "url": "http://127.0.0.1:9222"}]},
        "added": {"instances": ["http://127.0.0.1:9004"]},
    }}
    gw.config_path.write_text(tomli_w.dumps(data))
    async with gw.session.post(gw.admin_url + "/gateway/config/reload") as r:
        assert r.status == 200, await r.text()
    registry = gw.runtime.plugin_set.pm.get_plugin("registry").registry
    await wait_until(lambda: "added" in registry.services, message="the reload to apply")

    async with gw.session.get(gw.admin_url + "/registry/services") as r:
        services = {s["id"]: s for s in (await r.json())["services"]}
    assert sorted(services) == ["added", "kept"]
    assert services["kept"]["tags"] == ["new"]
    async with gw.session.get(gw.admin_url + "/registry/services/kept/instances") as r:
        instances = {i["id"]: i for i in (await r.json())["instances"]}
    assert sorted(instances) == ["dyn", "k1", "k2"]
    assert instances["k2"]["url"] == "http://127.0.0.1:9222"
    assert not instances["dyn"]["static"]
