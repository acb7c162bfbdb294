"""Every hook is documented with its exact signature, and every hook is exercised by a
test plugin installed through a real entry point."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from lucid import hookspecs
from lucid.config import ConfigError
from lucid.testing import run_gateway, wait_until

ROOT = Path(__file__).resolve().parent.parent
RECORDER = Path(__file__).parent / "fixtures" / "recorder"
SPECS = {
    name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("lucid_")
}


def signature(fn) -> str:
    return f"{fn.__name__}({', '.join(inspect.signature(fn).parameters)})"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hook_is_documented_with_its_exact_signature(name):
    docs = (ROOT / "docs" / "plugin_hooks.md").read_text()
    assert f"### `{signature(SPECS[name])}`" in docs


def test_the_docs_describe_no_hook_that_does_not_exist():
    docs = (ROOT / "docs" / "plugin_hooks.md").read_text()
    documented = set(re.findall(r"^### `(lucid_\w+)\(", docs, re.MULTILINE))
    assert documented == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_firstresult_hooks_say_so_and_only_they(name):
    fn = SPECS[name]
    firstresult = fn.lucid_spec["firstresult"]
    assert ("Stops at first non-None result" in (fn.__doc__ or "")) == firstresult
    assert fn.__doc__ and all(f":param {p}:" in fn.__doc__
                              for p in inspect.signature(fn).parameters)


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.syspath_prepend(str(RECORDER))
    import lucid_recorder

    lucid_recorder.CALLS.clear()
    yield lucid_recorder
    lucid_recorder.CALLS.clear()


def config(url: str, **recorder: str) -> str:
    settings = "\n".join(f"{k} = {v}" for k, v in recorder.items())
    return f"""
[recorder]
{settings}

[gateway.services.svc]
instances = ["http://127.0.0.1:1", "{url}"]

[[gateway.routes]]
id = "tagged"
prefix = "/"
service = "svc"
plugins = {{ recorder = {{ tag = "blue" }} }}
"""


async def test_every_hook_is_called_by_a_real_gateway(recorder, lucid_upstream, tmp_path):
    upstream = await lucid_upstream()
    async with run_gateway(config(upstream.url), tmp_path) as gw:
        async with gw.session.get(f"{gw.proxy_url}/hello") as r:
            assert r.status == 200
            # the recorder's selection picked the last candidate, the live upstream
            assert r.headers["x-recorder-tag"] == "blue"
        async with gw.session.get(f"{gw.proxy_url}/no", headers={"x-reject": "1"}) as r:
            assert r.status == 403
            assert r.headers["x-rejected-by"] == "recorder"
            body = await r.json()
            assert body["why"] == "asked to" and body["request_id"]
        # A plugin's body may carry error, status and request_id, even a value JSON
        # cannot hold: the core's status and request id win, never a 500.
        async with gw.session.get(f"{gw.proxy_url}/no", headers={"x-reject-full": "1"}) as r:
            assert r.status == 429
            body = await r.json()
            assert body["error"] == "slow down" and body["status"] == 429
            assert body["request_id"] == r.headers["x-request-id"] != "mine"
            assert body["when"].startswith("Exchange(")
        async with gw.session.get(f"{gw.proxy_url}/no", headers={"x-refuse": "1"}) as r:
            assert r.status == 503
            assert r.headers["retry-after"] == "7"
        headers = {"x-refuse": "1", "x-fallback": "1"}
        async with gw.session.get(f"{gw.proxy_url}/fb", headers=headers) as r:
            assert r.status == 200
            assert await r.read() == b"from the fallback"
        async with gw.session.get(f"{gw.admin_url}/recorder/calls") as r:
            assert r.status == 200
        assert [i.url for i in gw.runtime.instances("svc")] == ["http://127.0.0.1:1",
                                                                 upstream.url]
        assert [(r.id, r.service) for r in gw.runtime.generation.routes] == [("tagged", "svc")]
        async with gw.session.post(f"{gw.admin_url}/gateway/config/reload") as r:
            assert r.status == 200
        await wait_until(
            lambda: any(n == "lucid_observe_event" for n, _ in recorder.CALLS),
            message="the config_reloaded event",
        )
    called = {name for name, _ in recorder.CALLS}
    assert called >= set(SPECS) - {"lucid_check_workers"}
    events = [d for n, d in recorder.CALLS if n == "lucid_observe_event"]
    assert events[0]["kind"] == "config_reloaded" and events[0]["data"]["generation"] == 2
    observed = [d for n, d in recorder.CALLS if n == "lucid_observe_exchange"]
    assert observed[0]["status"] == 200 and observed[0]["route"] == "tagged"
    assert observed[0]["instance"] == upstream.url and observed[0]["bytes_out"] > 0
    outcomes = [d for n, d in recorder.CALLS if n == "lucid_record_outcome"]
    assert outcomes[0] == {"kind": "success", "status": 200}
    activated = [d for n, d in recorder.CALLS if n == "lucid_activate"]
    assert activated == [{"number": 1, "notes": ["from-file"]},
                         {"number": 2, "notes": ["from-file"]}]
    first_prepare = next(i for i, (n, _) in enumerate(recorder.CALLS) if n == "lucid_prepare")
    startup = next(i for i, (n, _) in enumerate(recorder.CALLS) if n == "lucid_startup")
    first_activate = next(i for i, (n, _) in enumerate(recorder.CALLS) if n == "lucid_activate")
    assert first_prepare < startup < first_activate  # live only once started


async def test_definitions_are_written_through_the_core(recorder, lucid_upstream, tmp_path):
    """A third-party plugin's definitions: static ones are read-only, dynamic ones are
    committed, carry a revision, honour If-Match, reach lucid_activate and survive a
    restart."""
    upstream = await lucid_upstream()
    async with run_gateway(config(upstream.url), tmp_path) as gw:
        notes = f"{gw.admin_url}/recorder/notes"
        async with gw.session.put(f"{notes}/from-file", json={"text": "x"}) as r:
            assert r.status == 409 and (await r.json())["origin"] == "static"
        async with gw.session.put(f"{notes}/a", json={"text": "one"}) as r:
            assert r.status == 200
            first = await r.json()
            assert first["origin"] == "dynamic" and first["body"] == {"text": "one"}
        async with gw.session.put(f"{notes}/a", json={"text": "two"},
                                  headers={"If-Match": str(first["revision"] + 7)}) as r:
            assert r.status == 412
        async with gw.session.put(f"{notes}/a", json={"text": "two"},
                                  headers={"If-Match": f'"{first["revision"]}"'}) as r:
            assert r.status == 200
            second = await r.json()
            assert second["revision"] > first["revision"]
        async with gw.session.delete(f"{notes}/missing") as r:
            assert r.status == 404
        activated = [d for n, d in recorder.CALLS if n == "lucid_activate"]
        assert activated[-1]["notes"] == ["a", "from-file"]  # each write went live
        generation = gw.runtime.generation
        assert generation.defined("recorder_note")["a"].body == {"text": "two"}
    recorder.CALLS.clear()
    async with run_gateway(config(upstream.url), tmp_path) as gw:
        defined = gw.runtime.generation.defined("recorder_note")
        assert list(defined) == ["from-file", "a"]
        assert defined["a"].revision == second["revision"]


def test_check_workers_refuses_state_that_would_be_multiplied(recorder, lucid_process):
    gateway = lucid_process(config("http://127.0.0.1:9"), wait=False, workers=2,
                            env={"PYTHONPATH": str(RECORDER)})
    assert gateway.wait() == 2
    assert "server.workers = 2: the recorder keeps its calls in one process" in gateway.output
    assert "Traceback" not in gateway.output


async def test_an_async_firstresult_hook_is_refused(recorder, monkeypatch, tmp_path):
    from lucid.plugins import hookimpl

    @hookimpl
    async def lucid_match_route(exchange, generation):
        return None

    monkeypatch.setattr(recorder, "lucid_match_route", lucid_match_route)
    with pytest.raises(ConfigError, match="lucid_match_route must be synchronous"):
        async with run_gateway(config("http://127.0.0.1:9"), tmp_path):
            pass
