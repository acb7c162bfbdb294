"""Helpers for Lucid's own tests, not part of the plugin-author kit.

They know Lucid's repository and its built-in plugins (the ``gateway`` plugin's config
format, the ``lucid plugins`` table, the Debian packages the monitoring tests drive),
or do things a plugin's test suite should not (``debian_tool`` runs ``apt-get``), so
they may change without notice. The public kit is :mod:`lucid.testing`
(``docs/testing.md``); these names answered from there before and still do, with a
:class:`DeprecationWarning`, for one release.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from lucid.plugins import ENTRY_POINT_GROUP, InstalledPlugin

__all__ = [
    "AUTH_PARAM",
    "TLSFiles",
    "builtin_plugins",
    "challenge_params",
    "debian_tool",
    "lucid_env",
    "make_tls",
    "plugin_rows",
    "route",
    "run_lucid",
    "two_services",
]


def two_services(url: str, extra: str = "") -> str:
    """Config: services ``svc`` and ``other``, both at ``url``; every path routed to
    ``svc`` without retries; then ``extra``."""
    return f"""
[gateway.services.svc]
instances = ["{url}"]
[gateway.services.other]
instances = ["{url}"]

[[gateway.routes]]
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}
{extra}
"""


def route(upstream_url: str, extra: str = "") -> str:
    """Config: every path to one service at ``upstream_url``, no retries; then ``extra``."""
    return f"""
[gateway.services.svc]
instances = ["{upstream_url}"]

[[gateway.routes]]
id = "all"
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}
{extra}
"""


AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_]+)=("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(?:,|$)')


def challenge_params(value: str) -> dict[str, str]:
    """An RFC 9110 §11.2 challenge's auth-params, quoted-strings unescaped; fails if the
    value does not parse, as a client's parser would."""
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer"
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = AUTH_PARAM.match(rest, position)
        assert match is not None, f"unparseable challenge {value!r} at {position}"
        name, raw = match.groups()
        params[name] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        position = match.end()
    return params


def lucid_env(*installed: Path, **extra: str) -> dict[str, str]:
    """The environment for a ``lucid`` subprocess: no stray ``LUCID_*`` overrides from
    the caller's shell, the ``installed`` folders (plugin dist-infos) importable, and
    ``extra`` variables set."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LUCID_")}
    paths = [str(p) for p in installed]
    if paths:
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def run_lucid(
    *args: str, installed: tuple[Path, ...] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the ``lucid`` command (``python -m lucid ARGS``) and capture what it says."""
    return subprocess.run(
        [sys.executable, "-m", "lucid", *args],
        capture_output=True, text=True, timeout=60, env=lucid_env(*installed, **env),
    )


def builtin_plugins() -> list[InstalledPlugin]:
    """Lucid's own plugins (the ``lucid`` entry points of ``lucid-gateway``), by name."""
    return sorted(
        (InstalledPlugin(ep.name, ep.value, ep.dist.name)
         for ep in entry_points(group=ENTRY_POINT_GROUP)
         if ep.dist is not None and ep.dist.name == "lucid-gateway"),
        key=lambda p: p.name,
    )


def plugin_rows(output: str) -> dict[str, list[str]]:
    """``lucid plugins`` output as ``name -> [capability, enabled, package, hooks]``.

    Columns are cut where the header's words start, so a plugin implementing no hooks
    (an empty last column) parses too, as ``""``."""
    header, *lines = output.splitlines()
    assert header.split() == ["plugin", "capability", "enabled", "package", "hooks"]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    rows = {}
    for line in lines:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        assert all(cells[:4]) and " " not in "".join(cells[:4]), f"misaligned row: {line!r}"
        rows[cells[0]] = cells[1:]
    return rows


_apt_lock = threading.Lock()


def debian_tool(binary: str, package: str) -> str:
    """The path of a tool a test needs from Debian's packages, installing the package
    first when it is missing and this is a root shell with apt (as on CI and a fresh
    development machine); otherwise the test fails saying what to install."""
    found = shutil.which(binary)
    if found:
        return found
    with _apt_lock:
        if shutil.which(binary) is None and os.geteuid() == 0 and shutil.which("apt-get"):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True,
                           timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            package], env=env, capture_output=True, timeout=900)
    found = shutil.which(binary)
    assert found, f"this test needs {binary!r}: apt-get install -y {package}"
    return found


@dataclass
class TLSFiles:
    """A test CA and what it signed, as PEM files in one folder (see :func:`make_tls`):
    ``server_cert``/``server_key`` for ``names``, ``client_cert``/``client_key`` for a
    client (mTLS), ``ca_cert`` to trust them. ``ca`` is the ``trustme.CA`` itself, to
    issue more (``issue(name, *names)``)."""

    directory: Path
    ca: Any
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def issue(self, stem: str, *names: str) -> tuple[Path, Path]:
        """A further certificate from the same CA for ``names``: (cert, key) files."""
        leaf = self.ca.issue_cert(*names)
        cert, key = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def client_context(self, with_certificate: bool = False) -> ssl.SSLContext:
        """A client context trusting the CA (with the client certificate if asked)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        if with_certificate:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx

    def server_context(self, require_client: bool = False) -> ssl.SSLContext:
        """A server context with the server certificate (for a test upstream); with
        ``require_client``, a client without a certificate from the CA is refused."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client:
            ctx.load_verify_locations(cafile=str(self.ca_cert))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def make_tls(directory: Path, *names: str) -> TLSFiles:
    """A CA made now (``trustme``), a server certificate for ``names`` (default
    ``localhost`` and ``127.0.0.1``) and a client certificate, written to
    ``directory``: for HTTPS and WSS tests of the proxy listener and mTLS upstreams."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="Lucid test CA")
    files = TLSFiles(directory, ca, directory / "ca.pem", directory / "server.pem",
                     directory / "server.key", directory / "client.pem",
                     directory / "client.key")
    ca.cert_pem.write_to_path(str(files.ca_cert))
    files.issue("server", *(names or ("localhost", "127.0.0.1")))
    files.issue("client", "client.lucid.test")
    return files
