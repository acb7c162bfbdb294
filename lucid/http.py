"""HTTP details of proxying: path normalisation, hop-by-hop headers, forwarding headers,
request ids and trace context. Pure functions, so the data plane stays readable."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import random
import re
import time
from collections.abc import Container, Mapping, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

# RFC 9110 §7.6.1 plus the ones every proxy also treats as connection-specific.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
        "upgrade", "proxy-authenticate", "proxy-authorization",
    }
)
# Request headers the proxy always sets itself, whatever the client sent.
FORWARDING = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "traceparent",
     "host", "via"}
)
# Request headers upstream frameworks read the client's address, scheme, port, path
# prefix or URL from (besides X-Forwarded-For/-Proto/-Host, which Lucid sets itself):
# de facto standards, CDN and proxy vendors' own, and the ones Rack, Symfony, Spring,
# IIS and ingress-nginx honour. A client that is not a trusted proxy could otherwise
# make an upstream believe any of these.
CLIENT_IDENTITY = frozenset(
    {
        "forwarded", "x-forwarded", "forwarded-for", "x-real-ip", "true-client-ip",
        "x-client-ip", "client-ip", "cf-connecting-ip", "fastly-client-ip",
        "x-cluster-client-ip", "x-original-forwarded-for", "x-envoy-external-address",
        "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server", "x-forwarded-scheme",
        "x-forwarded-protocol", "x-forwarded-ssl", "front-end-https", "x-url-scheme",
        "x-original-url", "x-rewrite-url", "x-original-uri", "x-forwarded-uri",
        "x-original-host",
    }
)
_TWIN_LIMIT = 8  # hyphens in a name whose every spelling is listed: 2**8 spellings at most
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 §5.6.2
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_path(path: str) -> str | None:
    """Resolve dot-segments and duplicate slashes (RFC 3986 §5.2.4); None if unusable.

    ``path`` is the ASGI path, already percent-decoded once, so ``%2e%2e`` and ``%2f``
    arrive here as ``..`` and ``/`` and are resolved like their plain forms: what a
    route matches is exactly what the upstream receives. ``..`` never climbs above
    the root.
    """
    if not path.startswith("/") or "\x00" in path:
        return None
    if "//" not in path and "/." not in path:
        return path
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    normalised = "/" + "/".join(segments)
    if segments and (path.endswith("/") or path.endswith("/.") or path.endswith("/..")):
        normalised += "/"
    return normalised


def connection_tokens(value: str | None) -> frozenset[str]:
    """Header names listed in a Connection header; they are hop-by-hop too."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def hop_by_hop(connection: str | None) -> frozenset[str]:
    """The hop-by-hop header names of a message whose Connection header is this."""
    return _hop_by_hop(connection) if connection else HOP_BY_HOP


@functools.lru_cache(maxsize=256)  # nearly every upstream answers "keep-alive" every time
def _hop_by_hop(connection: str) -> frozenset[str]:
    return HOP_BY_HOP | connection_tokens(connection)


def underscore_twins(names: frozenset[str]) -> frozenset[str]:
    """Every other spelling of these names with ``_`` for some ``-``: ``x_user_id``,
    ``x-user_id`` and ``x_user-id`` for ``x-user-id``.

    CGI (RFC 3875 §4.1.18) and so WSGI map both characters to ``_``, so an upstream
    reading ``HTTP_X_USER_ID`` cannot tell a twin from the header Lucid set or removed.
    Listing them costs nothing per request: the caller caches the set. A name with
    more than ``_TWIN_LIMIT`` hyphens gets its all-underscore twin only.
    """
    twins: set[str] = set()
    for name in names:
        parts = name.split("-")
        if len(parts) - 1 > _TWIN_LIMIT:
            twins.add(name.replace("-", "_"))
            continue
        for mask in range(1, 2 ** (len(parts) - 1)):
            spelled = parts[0]
            for i, part in enumerate(parts[1:]):
                spelled += ("_" if mask >> i & 1 else "-") + part
            twins.add(spelled)
    return frozenset(twins)


@functools.lru_cache(maxsize=1024)
def forwarded_element(peer: str, scheme: str, host: str) -> str:
    """This hop's RFC 7239 ``Forwarded`` element: who connected (``for``), with what
    scheme (``proto``), asking for which ``host`` (as received, §5.3).

    An IPv6 address is bracketed, and since ``:`` is not a token character it is a
    quoted-string (§6); an unknown peer (a Unix socket) is ``unknown`` (§6.2).
    """
    node = f'"[{peer}]"' if ":" in peer else peer or "unknown"
    element = f"for={node};proto={scheme}"
    if host:
        element += ";host=" + (host if _TOKEN.match(host) else _quoted(host))
    return element


def _quoted(value: str) -> str:
    """An RFC 9110 §5.6.4 quoted-string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Request and trace ids name things, they guard nothing: a PRNG seeded from the OS
# serves (OpenTelemetry's id generator does the same), and unlike ``os.urandom`` it
# costs no system call per id. A forked worker reseeds, so workers never share ids.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def random_hex(size: int) -> str:
    """``size`` random bytes as lowercase hex (16 -> 32 characters): randbytes() without
    its Python frame (the same bytes). The two ids of a proxied request are drawn the
    same way inline, a call less each."""
    return _ids.getrandbits(size * 8).to_bytes(size, "little").hex()


def new_request_id() -> str:
    return random_hex(16)


def request_id_from(value: str | None) -> str:
    """Keep a well-formed incoming request id, else make one."""
    if value and _REQUEST_ID.match(value):
        return value
    return _ids.getrandbits(128).to_bytes(16, "little").hex()  # new_request_id()


def traceparent_from(value: str | None) -> tuple[str, bool]:
    """The W3C traceparent to forward, and whether the incoming one was kept.

    A valid incoming header is propagated unchanged (Lucid reports no spans, so it
    must not become a parent); a missing or malformed one starts a new trace.
    """
    if value:
        m = _TRACEPARENT.match(value.strip())
        if (
            m
            and m.group(1) != "ff"
            and m.group(2) != "0" * 32
            and m.group(3) != "0" * 16
        ):
            return value.strip(), True
    ids = _ids.getrandbits(192).to_bytes(24, "little").hex()  # trace and parent id: one draw
    return f"00-{ids[:32]}-{ids[32:]}-00", False


def is_trusted(ip: str, trusted: Sequence[Network]) -> bool:
    if not trusted:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in trusted)


def client_ip(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The original client: the right-most X-Forwarded-For entry not added by a trusted
    proxy, believed only when the peer itself is trusted."""
    if not forwarded_for or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def refused_head(
    scope: dict[str, Any], headers: Container[str], head_size: int, server: Any
) -> tuple[int, str] | None:
    """Why a request head is refused before anything else looks at it, if it is:
    ``headers`` holds the lower-case names, ``head_size`` the names' and values' bytes.
    The proxy and the admin listener both ask.

    The limits hold however the head arrived: Hypercorn's parser bounds only a head
    still incomplete, so one that came whole in a single read was never measured.
    """
    if "transfer-encoding" in headers:
        # RFC 9112 §6.3: a message with both is a request-smuggling attempt or a broken
        # client; a proxy that forwards it lets the next hop frame it otherwise. An
        # HTTP/1.0 message with Transfer-Encoding has faulty framing too (§6.1).
        if "content-length" in headers:
            return 400, "Content-Length together with Transfer-Encoding"
        if scope["http_version"] == "1.0":
            return 400, "Transfer-Encoding in an HTTP/1.0 request"
    count = len(scope["headers"])
    line = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope["query_string"])
    limit = server.max_request_header_size
    if line + 12 > limit:  # " ", "?", " HTTP/1.1", CRLF
        return 414, f"request line longer than {limit} bytes"
    if line + 12 + head_size + 4 * count + 2 > limit:
        return 431, f"request head larger than {limit} bytes"
    if count > server.max_request_headers:
        return 431, f"more than {server.max_request_headers} request header fields"
    return None


def json_body(status: int, message: str, request_id: str,
              extra: Mapping[str, Any] | None = None) -> bytes:
    """An answer of Lucid's own (or a plugin's ``Rejection`` body) as JSON.

    The contract for a plugin's body: it gives ``error`` (replacing ``message``) and
    any extra fields; the core's ``status`` and ``request_id`` always win, since they
    must say what the client actually got. A value JSON cannot carry is sent as its
    text rather than turning the answer into a 500.
    """
    body: dict[str, Any] = {"error": message, "status": status, "request_id": request_id}
    if extra:
        body.update((k, v) for k, v in extra.items() if k not in ("status", "request_id"))
    return json.dumps(body, default=str).encode()


HEAD_LATE = "request head not received in time"


def refusal(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 answer of Lucid's own, written by a server before any request
    reached the app (a head that came late or too large, or could not be parsed): JSON
    naming what was wrong, and the connection closes after it."""
    body = json_body(status, message, new_request_id())
    reason = _REASONS.get(status, "")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\ndate: %s\r\n\r\n%s"
            % (status, reason.encode(), len(body), http_date(), body))


_REASONS = {status.value: status.phrase for status in HTTPStatus}
_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header value, formatted at most once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]
