"""Secrets marked by type: a plugin's ``SecretStr`` field is hidden wherever Lucid
shows config or a written body, whatever the field is called, and so is a password
inside a URL. (Secrets found by their key's name are covered in ``test_cli.py`` and
``test_operations.py``.)

The plugin under test, ``tests/fixtures/vault``, is installed through a real entry
point and calls its secrets ``key``: a name the key-name rule does not catch.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, SecretBytes, SecretStr

from lucid.admin import mint_admin_token
from lucid.config import REDACTED, RouteOverrides, redact, redact_url, secret_fields
from lucid.testing import json_request, write_config
from lucid.testing_internal import run_lucid

VAULT = Path(__file__).resolve().parent / "fixtures" / "vault"
ADMIN_SECRET = "s" * 40
CONFIG_KEY = "config-key-0123456789"
ROUTE_KEY = "route-key-0123456789"
TABLE_KEY = "table-key-0123456789"
WRITTEN_KEY = "written-key-0123456789"
URL_PASSWORD = "url-pass-0123456789"


def config(upstream_url: str = "http://127.0.0.1:9") -> str:
    return f"""
[server]
admin_secret = "{ADMIN_SECRET}"

[plugins]
vault = true

[vault]
key = "{CONFIG_KEY}"
upstream = "redis://cache:{URL_PASSWORD}@127.0.0.1:6379/0"
keys = {{ first = "{TABLE_KEY}" }}

[gateway.services.svc]
instances = ["{upstream_url}"]

[[gateway.routes]]
id = "vaulted"
prefix = "/v"
service = "svc"
plugins.vault = {{ key = "{ROUTE_KEY}" }}
"""


SECRETS = (CONFIG_KEY, ROUTE_KEY, TABLE_KEY, WRITTEN_KEY, URL_PASSWORD, ADMIN_SECRET)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(VAULT))


async def call(gw: Any, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    token = mint_admin_token(ADMIN_SECRET, "admin", 600, "tests")
    return await json_request(gw.session, method, gw.admin_url + path,
                              headers={"Authorization": f"Bearer {token}"}, **kw)


async def test_secret_types_are_hidden_by_the_config_endpoint_and_the_audit(
    vault: None, lucid_gateway: Any, lucid_upstream: Any
) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url))

    status, body = await call(gw, "GET", "/gateway/config")
    assert status == 200
    shown = body["config"]
    assert shown["vault"]["key"] == REDACTED
    assert shown["vault"]["keys"] == {"first": REDACTED}
    assert shown["vault"]["upstream"] == f"redis://cache:{REDACTED}@127.0.0.1:6379/0"
    assert shown["gateway"]["routes"][0]["plugins"]["vault"]["key"] == REDACTED
    assert shown["server"]["admin_secret"] == REDACTED
    assert_no_secret(json.dumps(body))

    # a plugin's own endpoint: valid and refused bodies are audited without the key
    assert (await call(gw, "POST", "/vault/keys",
                       json={"name": "second", "key": WRITTEN_KEY}))[0] == 201
    assert (await call(gw, "POST", "/vault/keys",
                       json={"name": "", "key": WRITTEN_KEY}))[0] == 422
    # a route written through the API, with the plugin's per-route secret
    status, written = await call(gw, "POST", "/gateway/route", json={
        "id": "api", "prefix": "/api", "service": "svc",
        "plugins": {"vault": {"key": ROUTE_KEY}}})
    assert status == 201
    assert written["route"]["plugins"] == {"vault": {"key": REDACTED}}

    status, audit = await call(gw, "GET", "/gateway/audit")
    assert status == 200
    summaries = {(e["path"], e["status"]): json.loads(e["summary"]) for e in audit["entries"]}
    assert summaries[("/vault/keys", 201)] == {"name": "second", "key": REDACTED}
    assert summaries[("/vault/keys", 422)] == {"name": "", "key": REDACTED}
    assert summaries[("/gateway/route", 201)]["plugins"] == {"vault": {"key": REDACTED}}
    assert_no_secret(json.dumps(audit))

    # the router's own endpoints show the routes' settings without the secrets too
    for path in ("/gateway/routes", "/gateway/route"):
        status, listed = await call(gw, "GET", path)
        assert status == 200
        assert {r["id"]: r["plugins"]["vault"]["key"] for r in listed["routes"]} == (
            {"vaulted": REDACTED, "api": REDACTED} if path.endswith("s") else {"api": REDACTED})
        assert_no_secret(json.dumps(listed))

    # the API-made route is in the effective config too, its override hidden
    status, body = await call(gw, "GET", "/gateway/config")
    routes = {r["id"]: r for r in body["config"]["gateway"]["routes"]}
    assert routes["api"]["plugins"]["vault"]["key"] == REDACTED
    assert_no_secret(json.dumps(body))

    # the route still works: the plugin read its key as the secret it is
    async with gw.session.get(gw.proxy_url + "/api/x") as r:
        assert r.status == 200


def test_export_hides_secret_types_and_show_secrets_loads_back(
    vault: None, tmp_path: Path
) -> None:
    path = write_config(config(), tmp_path / "original")
    hidden = run_lucid("config", "export", "--config", str(path), installed=(VAULT,))
    assert hidden.returncode == 0, hidden.stderr
    assert_no_secret(hidden.stdout)
    exported = tomllib.loads(hidden.stdout)
    assert exported["vault"]["key"] == REDACTED
    assert exported["vault"]["keys"]["first"] == REDACTED
    assert exported["gateway"]["routes"][0]["plugins"]["vault"]["key"] == REDACTED

    target = tmp_path / "restored" / "cluster.toml"
    target.parent.mkdir()
    shown = run_lucid("config", "export", "--show-secrets", "--config", str(path),
                      "-o", str(target), installed=(VAULT,))
    assert shown.returncode == 0, shown.stderr
    restored = tomllib.loads(target.read_text())
    assert restored["vault"]["key"] == CONFIG_KEY
    assert restored["vault"]["keys"]["first"] == TABLE_KEY
    assert restored["vault"]["upstream"].endswith(f":{URL_PASSWORD}@127.0.0.1:6379/0")
    assert restored["gateway"]["routes"][0]["plugins"]["vault"]["key"] == ROUTE_KEY
    assert restored["server"]["admin_secret"] == ADMIN_SECRET
    checked = run_lucid("check", "--config", str(target), installed=(VAULT,))
    assert checked.returncode == 0, checked.stderr


def test_config_errors_do_not_print_secret_types(vault: None, tmp_path: Path) -> None:
    """A bad value for a secret field is named, never shown: in the plugin's section
    (the root model's errors) and in a route's settings (the router's errors)."""
    for bad, problem in ((config().replace(CONFIG_KEY, "shorty7"), "vault.key"),
                         (config().replace(ROUTE_KEY, "tiny-k7"),
                          "gateway.routes[0].plugins.vault.key"),
                         # a route refused whole: its table is shown, its key hidden
                         (config().replace('prefix = "/v"', 'prefix = "/v"\npath = "/w"')
                          .replace(ROUTE_KEY, "tiny-k7"), "gateway.routes[0]")):
        path = write_config(bad, tmp_path / problem)
        result = run_lucid("check", "--config", str(path), installed=(VAULT,))
        assert result.returncode == 2
        assert problem in result.stderr
        if problem.endswith("key"):
            assert f"{problem} = {REDACTED!r}: Value should have at least 8" in result.stderr
        else:
            assert f"'vault': {{'key': {REDACTED!r}}}" in result.stderr
        assert "shorty7" not in result.stderr and "tiny-k7" not in result.stderr


class Inner(BaseModel):
    token_count: int = 0
    key: SecretBytes


class Outer(BaseModel):
    items: list[Inner] = []
    by_name: dict[str, Inner | None] = {}
    plugins: Annotated[dict[str, dict[str, Any]], RouteOverrides()] = {}
    plain: str = ""


def test_redact_follows_the_model_types_and_hides_url_passwords() -> None:
    tree = secret_fields(Outer, {"vault": Inner})
    value = {"items": [{"key": "a", "token_count": 3}], "by_name": {"x": {"key": "b"}},
             "plugins": {"vault": {"key": "c"}, "other": {"key": "d"}},
             "plain": "see https://u:p@w@example.com/x and http://host:80/a@b"}
    assert redact(value, tree) == {
        "items": [{"key": REDACTED, "token_count": 3}],
        "by_name": {"x": {"key": REDACTED}},
        "plugins": {"vault": {"key": REDACTED}, "other": {"key": "d"}},
        "plain": f"see https://u:{REDACTED}@example.com/x and http://host:80/a@b",
    }
    assert secret_fields(Inner) == {"key": {}}
    assert secret_fields(SecretStr) == {}
    assert secret_fields(str) is None
    assert redact_url("redis://:pw@localhost") == f"redis://:{REDACTED}@localhost"
    assert redact_url("https://user@host/") == "https://user@host/"
