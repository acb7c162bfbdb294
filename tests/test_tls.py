"""TLS: HTTPS on the proxy listener (``[server.tls]``: SNI, versions, ALPN, SIGHUP
reload, config errors) and ``https://`` upstreams (``[services.<name>]``: CA,
verification, SNI, client certificates, keep-alive).

Certificates come from a CA made per test (``lucid.testing_internal.make_tls``);
every connection is a real TLS handshake on loopback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import tomllib
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from lucid.config import ConfigError
from lucid.runtime import load_plugins_and_config
from lucid.server import serve_forever
from lucid.testing import run_gateway, wait_until, write_config
from lucid.testing_http import read_response
from lucid.testing_internal import TLSFiles, make_tls, route
from lucid.tls import load_tls


def _tls_server(files: TLSFiles, *extra: str) -> str:
    return f"""
[server.tls]
cert = "{files.server_cert}"
key = "{files.server_key}"
{''.join(extra)}
"""


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[1].rpartition(":")
    return host, int(port)


async def _handshake(url: str, ctx: ssl.SSLContext, server_name: str | None,
                     request: bytes | None = None) -> tuple[list[str], str | None, Any]:
    """Connect over TLS sending ``server_name`` by SNI: the DNS names of the
    certificate the server chose, the ALPN protocol, and the response to
    ``request``."""
    host, port = _host_port(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=server_name or ""), 10)
    try:
        cert = writer.get_extra_info("peercert")
        names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        response = None
        if request is not None:
            writer.write(request)
            await writer.drain()
            response = await asyncio.wait_for(read_response(reader), 10)
        return names, alpn, response
    finally:
        writer.close()


async def _h2_get(url: str, files: TLSFiles, path: str) -> tuple[int, bytes]:
    """One GET over HTTP/2 on TLS (ALPN h2), with the ``h2`` state machine."""
    import h2.config
    import h2.connection
    import h2.events

    host, port = _host_port(url)
    ctx = files.client_context()
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "https"),
                          (":authority", f"{host}:{port}")], end_stream=True)
    writer.write(conn.data_to_send())
    status, body = 0, b""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "connection closed before the response ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length,
                                                   event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, body
            writer.write(conn.data_to_send())
    finally:
        writer.close()


def _unchecked(files: TLSFiles, alpn: list[str] | None = None) -> ssl.SSLContext:
    """Trusts the CA, any name: to see which certificate an SNI name gets."""
    ctx = files.client_context()
    ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# -- termination ------------------------------------------------------------------


async def test_https_through_the_proxy_with_sni_alpn_and_versions(
        engine_gateway, lucid_upstream, tmp_path, request):
    """One gateway per engine: HTTPS proxied (the upstream hears https as the
    client's scheme), each SNI name gets its certificate (by SAN, by explicit
    wildcard name, the default otherwise and without SNI), ALPN as the engine speaks,
    and a TLS 1.1 client is refused by the server."""
    engine = request.node.callspec.params["engine_gateway"]
    files = make_tls(tmp_path / "tls")
    b_cert, b_key = files.issue("b", "b.lucid.test")
    w_cert, w_key = files.issue("wild", "other.lucid.test")
    upstream = await lucid_upstream()
    gw = await engine_gateway(route(upstream.url, _tls_server(files, f"""
[[server.tls.certificates]]
cert = "{b_cert}"
key = "{b_key}"

[[server.tls.certificates]]
cert = "{w_cert}"
key = "{w_key}"
server_names = ["*.wild.test"]
""")))
    assert gw.proxy_url.startswith("https://")

    # a real HTTPS client, checking the certificate and the name 127.0.0.1
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.proxy_url}/hello?x=1",
                               ssl=files.client_context()) as response:
            assert response.status == 200
            seen = await response.json()
    assert seen["path"] == "/hello"
    assert seen["headers"]["x-forwarded-proto"] == "https"

    ctx = _unchecked(files)
    assert (await _handshake(gw.proxy_url, ctx, "b.lucid.test"))[0] == ["b.lucid.test"]
    assert (await _handshake(gw.proxy_url, ctx, "B.Lucid.Test"))[0] == ["b.lucid.test"]
    assert (await _handshake(gw.proxy_url, ctx, "x.wild.test"))[0] == ["other.lucid.test"]
    default = ["localhost"]
    assert (await _handshake(gw.proxy_url, ctx, "nobody.test"))[0] == default
    assert (await _handshake(gw.proxy_url, ctx, None))[0] == default

    # ALPN: h2 only where the engine speaks it, and then a request over it is proxied
    names, alpn, response = await _handshake(
        gw.proxy_url, _unchecked(files, ["h2", "http/1.1"]), "b.lucid.test")
    assert alpn == ("h2" if engine == "hypercorn" else "http/1.1")
    if engine == "hypercorn":
        status, body = await _h2_get(gw.proxy_url, files, "/over-h2")
        assert status == 200 and json.loads(body)["path"] == "/over-h2"
    names, alpn, response = await _handshake(
        gw.proxy_url, _unchecked(files, ["http/1.1"]), "b.lucid.test",
        b"GET /over-sni HTTP/1.1\r\nHost: b.lucid.test\r\nConnection: close\r\n\r\n")
    assert alpn == "http/1.1" and response.status == 200
    assert json.loads(response.body)["path"] == "/over-sni"

    # TLS 1.1: a client allowed to offer it (security level 0) is refused by the
    # server (uvloop resets the connection, Python's loop sends an alert); the same
    # client is served once it may offer TLS 1.2
    lax = _unchecked(files)
    lax.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated
        lax.minimum_version = ssl.TLSVersion.TLSv1
        lax.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await _handshake(gw.proxy_url, lax, "b.lucid.test")
    lax.maximum_version = ssl.TLSVersion.TLSv1_2
    assert (await _handshake(gw.proxy_url, lax, "b.lucid.test"))[0] == ["b.lucid.test"]


async def test_min_version_1_3_refuses_a_tls_1_2_client(lucid_gateway, lucid_upstream,
                                                        tmp_path):
    files = make_tls(tmp_path / "tls")
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route(upstream.url, _tls_server(files, 'min_version = "1.3"\n')))
    only_12 = _unchecked(files)
    only_12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await _handshake(gw.proxy_url, only_12, None)
    ctx = _unchecked(files)
    host, port = _host_port(gw.proxy_url)
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    writer.close()


def _serial(url: str, ctx: ssl.SSLContext) -> str:
    async def get() -> str:
        host, port = _host_port(url)
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        try:
            return str(writer.get_extra_info("peercert")["serialNumber"])
        finally:
            writer.close()

    return asyncio.run(get())


def _encrypted(key: Path, destination: Path,
               form: Any = serialization.PrivateFormat.PKCS8) -> Path:
    """``key`` protected by a passphrase, written to ``destination``: PKCS#8
    ("ENCRYPTED PRIVATE KEY") or OpenSSL's traditional form (Proc-Type: 4,ENCRYPTED)."""
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    destination.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, form, serialization.BestAvailableEncryption(b"secret")))
    return destination


def test_sighup_swaps_the_certificate_and_a_bad_one_is_refused(engine_process, tmp_path):
    """On each engine, new connections get the renewed certificate and the new minimum
    version after SIGHUP, without a restart (a TLS 1.2-only client refused once the
    minimum is 1.3); a key that does not match, or an encrypted one, keeps the running
    certificate, and the log says why."""
    files = make_tls(tmp_path / "tls")
    process = engine_process(route("http://127.0.0.1:9", _tls_server(files)))
    assert process.proxy_url.startswith("https://")
    ctx = files.client_context()
    first = _serial(process.proxy_url, ctx)

    only_12 = files.client_context()
    only_12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _serial(process.proxy_url, only_12) == first

    renewed = files.ca.issue_cert("localhost", "127.0.0.1")
    renewed.cert_chain_pems[0].write_to_path(str(files.server_cert))
    renewed.private_key_pem.write_to_path(str(files.server_key))
    config = tomllib.loads(process.config_path.read_text())
    config["server"]["tls"]["min_version"] = "1.3"
    process.config_path.write_text(tomli_w.dumps(config))
    process.signal(signal.SIGHUP)
    process.wait_for_line("config reloaded")
    second = _serial(process.proxy_url, ctx)
    assert second != first
    with pytest.raises((ssl.SSLError, ConnectionResetError)):  # the new minimum holds
        _serial(process.proxy_url, only_12)

    stranger = files.ca.issue_cert("localhost")
    stranger.private_key_pem.write_to_path(str(files.server_key))  # not the cert's key
    process.signal(signal.SIGHUP)
    line = process.wait_for_line("reload rejected")
    assert line
    process.wait_for_line("server.tls.key")
    assert "does not match server.tls.cert" in process.output
    assert _serial(process.proxy_url, ctx) == second

    # a renewed certificate whose (matching) key came encrypted: Lucid cannot read it
    renewed = files.ca.issue_cert("localhost", "127.0.0.1")
    renewed.cert_chain_pems[0].write_to_path(str(files.server_cert))
    renewed.private_key_pem.write_to_path(str(tmp_path / "plain.key"))
    _encrypted(tmp_path / "plain.key", files.server_key)
    rejected = len(process.output.split("reload rejected")) - 1
    process.signal(signal.SIGHUP)
    process.wait_for_line(f"server.tls.key = '{files.server_key}': the private key in "
                          f"{files.server_key} is encrypted".replace(".", r"\."))
    assert len(process.output.split("reload rejected")) - 1 == rejected + 1
    assert "Lucid has no passphrase option" in process.output
    assert _serial(process.proxy_url, ctx) == second
    with pytest.raises((ssl.SSLError, ConnectionResetError)):  # and its minimum too
        _serial(process.proxy_url, only_12)


def test_bad_certificates_stop_lucid_serve_with_exit_2(tmp_path, capsys):
    """``lucid serve``'s own entry point, in process: it stops before binding."""
    files = make_tls(tmp_path / "tls")
    other_cert, _ = files.issue("other", "localhost")
    path = write_config(route("http://127.0.0.1:9", f"""
[server.tls]
cert = "{other_cert}"
key = "{files.server_key}"

[[server.tls.certificates]]
cert = "missing.pem"
key = "{files.server_key}"
"""), tmp_path)
    assert serve_forever(path) == 2
    out = capsys.readouterr().err
    assert out.startswith(f"lucid: invalid config {path}:")
    assert "server.tls.key" in out and "does not match server.tls.cert" in out
    assert "server.tls.certificates[0].cert = 'missing.pem': cannot read" in out
    assert "expected a PEM certificate chain" in out


def test_an_encrypted_key_stops_lucid_serve_with_exit_2(lucid_process, tmp_path):
    """``lucid serve`` in a subprocess: a passphrase-protected key, for the listener
    or for a service's client certificate, is refused before anything binds (and
    OpenSSL never asks for the passphrase on a terminal); the message names the key
    and the file, and says it is encrypted."""
    files = make_tls(tmp_path / "tls")
    server_key = _encrypted(files.server_key, tmp_path / "server-encrypted.key")
    client_key = _encrypted(files.client_key, tmp_path / "client-encrypted.key",
                            serialization.PrivateFormat.TraditionalOpenSSL)
    text = route("https://localhost:9", f"""
[server.tls]
cert = "{files.server_cert}"
key = "{server_key}"

[services.svc]
tls_ca = "{files.ca_cert}"
tls_cert = "{files.client_cert}"
tls_key = "{client_key}"
""")
    process = lucid_process(text, wait=False)
    assert process.wait() == 2
    assert process.output.startswith(f"lucid: invalid config {process.config_path}:")
    assert "listening on" not in process.output
    for name, key in (("server.tls.key", server_key), ("services.svc.tls_key", client_key)):
        assert (f"{name} = '{key}': the private key in {key} is encrypted "
                "(passphrase-protected) and Lucid has no passphrase option; expected a "
                "PEM private key without a passphrase") in process.output

    # the same keys unencrypted: it starts
    process = lucid_process(text.replace(str(server_key), str(files.server_key))
                            .replace(str(client_key), str(files.client_key)))
    assert process.proxy_url.startswith("https://")


def _check(text: str, path: Path) -> list[str]:
    path.write_text(text)
    try:
        plugin_set, config = load_plugins_and_config(path)
        load_tls(config, path)
    except ConfigError as exc:
        return exc.problems
    return []


def test_config_errors_name_the_key_the_file_and_what_was_expected(tmp_path):
    files = make_tls(tmp_path / "tls")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    config = tmp_path / "cluster.toml"
    # paths relative to the config file's folder
    assert _check(_tls_server(files).replace(str(tmp_path) + "/", ""), config) == []
    problems = _check("""
[server.tls]
cert = "junk.pem"
key = "junk.pem"
min_version = "1.1"
""", config)
    assert problems == ["server.tls.min_version = '1.1': Input should be '1.2' or '1.3'"]
    problems = _check("""
[server.tls]
cert = "junk.pem"
key = "junk.pem"
""", config)
    assert problems == [
        "server.tls.cert = 'junk.pem': no PEM certificate in "
        f"{tmp_path}/junk.pem; expected a PEM certificate chain",
        "server.tls.key = 'junk.pem': no PEM private key in "
        f"{tmp_path}/junk.pem; expected a PEM private key",
    ]
    problems = _check(f"""
[services.a]
tls_cert = "{files.client_cert}"

[services.b]
tls_ca = "nowhere.pem"

[services.c]
tls_verify = false
tls_ca = "{files.ca_cert}"
""", config)
    assert problems[0].startswith("services.a = ")
    assert "give tls_cert and tls_key together" in problems[0]
    assert "tls_ca is unused with tls_verify = false" in problems[1]
    problems = _check('[services.b]\ntls_ca = "nowhere.pem"\n', config)
    assert problems == [f"services.b.tls_ca = 'nowhere.pem': cannot read {tmp_path}/"
                        "nowhere.pem (No such file or directory); expected PEM CA "
                        "certificates"]


# -- upstreams --------------------------------------------------------------------


class TLSUpstream:
    """An aiohttp server over TLS on loopback; records the SNI names it was sent and
    the client ports of the connections that reached it."""

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.names: list[str | None] = []
        self.peers: list[int] = []
        ctx.sni_callback = self._sni
        self.runner: web.AppRunner | None = None
        self.port = 0

    def _sni(self, obj: Any, name: str | None, _: Any) -> None:
        self.names.append(name)

    async def _handle(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername")[1])
        peer = request.transport.get_extra_info("peercert")
        subject = dict(x[0] for x in peer["subject"]) if peer else {}
        return web.json_response({"path": request.path, "client": subject.get("commonName"),
                                  "sans": peer.get("subjectAltName") if peer else None})

    async def start(self) -> TLSUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ctx)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def tls_upstreams(tls_files):
    files = tls_files
    plain = await TLSUpstream(files.server_context()).start()
    mutual = await TLSUpstream(files.server_context(require_client=True)).start()
    yield files, plain, mutual
    await plain.close()
    await mutual.close()


async def test_https_upstreams_verify_send_sni_and_present_client_certificates(
        lucid_gateway, tls_upstreams, caplog):
    """One gateway, a service per case, to upstreams of a CA made now: verification
    on by default (the system's CAs do not know it: 502), the service's CA (200),
    tls_verify = false (200, and a warning), a client certificate for an upstream
    that requires one (200; without one: 502), the SNI name the URL's host or the
    one configured, and TLS connections kept alive and reused."""
    files, plain, mutual = tls_upstreams
    services = {
        "default": f"https://localhost:{plain.port}",
        "ca": f"https://localhost:{plain.port}",
        "unverified": f"https://localhost:{plain.port}",
        "named": f"https://127.0.0.1:{plain.port}",
        "mtls": f"https://localhost:{mutual.port}",
        "nocert": f"https://localhost:{mutual.port}",
    }
    text = "".join(f"""
[gateway.services.{name}]
instances = ["{url}"]

[[gateway.routes]]
prefix = "/{name}/"
service = "{name}"
retries = {{ attempts = 1 }}
""" for name, url in services.items())
    text += f"""
[services.ca]
tls_ca = "{files.ca_cert}"

[services.unverified]
tls_verify = false

[services.named]
tls_ca = "{files.ca_cert}"
tls_server_name = "localhost"

[services.mtls]
tls_ca = "{files.ca_cert}"
tls_cert = "{files.client_cert}"
tls_key = "{files.client_key}"

[services.nocert]
tls_ca = "{files.ca_cert}"
"""
    with caplog.at_level(logging.WARNING, logger="lucid.tls"):
        gw = await lucid_gateway(text)
    assert any("services.unverified.tls_verify = false" in r.getMessage()
               for r in caplog.records)

    async def get(path: str) -> tuple[int, Any]:
        async with gw.session.get(f"{gw.proxy_url}{path}") as response:
            body = await response.read()
            return response.status, (json.loads(body) if response.status == 200 else body)

    assert (await get("/default/x"))[0] == 502
    plain.names.clear()
    status, seen = await get("/ca/x")
    assert status == 200 and seen["path"] == "/ca/x" and seen["client"] is None
    assert plain.names == ["localhost"]
    assert (await get("/unverified/x"))[0] == 200
    plain.names.clear()
    assert (await get("/named/x"))[0] == 200  # 127.0.0.1 in the URL, localhost by SNI
    assert plain.names == ["localhost"]

    status, seen = await get("/mtls/x")
    assert status == 200
    assert ["DNS", "client.lucid.test"] in seen["sans"]
    assert (await get("/nocert/x"))[0] == 502

    # keep-alive: further requests ride the connection already made
    before = len(set(mutual.peers))
    for _ in range(3):
        assert (await get("/mtls/y"))[0] == 200
    assert len(set(mutual.peers)) == before


async def test_a_reload_changes_a_services_tls_settings_but_not_the_listener(
        lucid_gateway, tls_upstreams):
    files, plain, _ = tls_upstreams
    text = f"""
[gateway.services.svc]
instances = ["https://localhost:{plain.port}"]

[[gateway.routes]]
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}
"""
    gw = await lucid_gateway(text)

    async def status() -> int:
        async with gw.session.get(f"{gw.proxy_url}/r") as response:
            await response.read()
            return response.status

    assert await status() == 502
    gw.config_path.write_text(gw.config_path.read_text()
                              + f'\n[services.svc]\ntls_ca = "{files.ca_cert}"\n')
    await gw.runtime.reload()
    await wait_until(lambda: _is(status, 200), message="the service's CA to be used")

    # a reload that changes nothing keeps the pooled TLS connection (no new handshake)
    peers = set(plain.peers)
    await gw.runtime.reload()
    for _ in range(3):
        assert await status() == 200
    assert set(plain.peers) == peers

    # what the running listener cannot follow is refused, and nothing changes
    config = tomllib.loads(gw.config_path.read_text())
    config["server"]["tls"] = {"cert": str(files.server_cert), "key": str(files.server_key)}
    config["server"]["engine"] = "hypercorn"
    gw.config_path.write_text(tomli_w.dumps(config))
    with pytest.raises(ConfigError) as rejected:
        await gw.runtime.reload()
    assert rejected.value.problems == [
        "server.engine: changing it needs a restart",
        "server.tls: turning TLS on or off needs a restart"]
    assert gw.runtime.termination is None and await status() == 200


async def _is(probe: Any, expected: int) -> bool:
    return await probe() == expected


async def test_a_services_table_naming_no_service_is_warned_about(tls_files, tmp_path,
                                                                  caplog):
    """``[services.<name>]`` is matched to a service by name only: a table naming no
    service of the config (``[gateway.services]``, ``[registry.services]``) nor of the
    registry at start (one registered through the admin API before a restart counts)
    is logged as a likely misspelling; the others are not."""
    data_dir = str(tmp_path / "data")
    async with run_gateway(route("https://localhost:9"), tmp_path / "first",
                           data_dir=data_dir) as first:
        async with first.session.post(first.admin_url + "/registry/services", json={
                "id": "orders", "instances": [{"id": "o1", "url": "https://localhost:9"}]},
                                      ) as response:
            assert response.status == 201, await response.text()
    text = route("https://localhost:9", f"""
[registry.services.billing]
instances = ["https://localhost:9"]

[services.svc]
tls_ca = "{tls_files.ca_cert}"

[services.billing]
tls_ca = "{tls_files.ca_cert}"

[services.biling]
tls_ca = "{tls_files.ca_cert}"

[services.orders]
tls_ca = "{tls_files.ca_cert}"
""")
    with caplog.at_level(logging.WARNING, logger="lucid.tls"):
        async with run_gateway(text, tmp_path / "second", data_dir=data_dir) as second:
            assert [i.url for i in second.runtime.instances("orders")] == [
                "https://localhost:9"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "lucid.tls"]
    assert warnings == ["services.biling: no service 'biling' is in the config or the "
                        "registry, so these TLS settings apply to nothing yet; is the name "
                        "misspelt?"]
