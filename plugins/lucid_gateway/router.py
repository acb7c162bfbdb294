"""The route matcher: picks one ``Route`` for a request without scanning the table.

Everything is compiled in ``Router.__init__`` so that ``match()`` costs one dict
lookup per path segment, whatever the number of routes:

* exact paths live in one dict keyed by the path as written;
* prefixes live in a segment trie; each node that holds routes also points at its
  nearest ancestor that holds routes, so falling back to a shorter prefix is a
  pointer chase, not a second walk;
* patterns live in a segment trie whose nodes have literal children and at most one
  ``{param}`` child (parameter names are a property of the route, not the shape).

Matching rules, in the order they are applied:

1. Kind: an exact ``path`` beats any ``prefix``, which beats any ``pattern``.
2. Path: among prefixes the longest (in whole segments) wins; among patterns a
   literal segment is preferred to a parameter at each depth, backtracking to the
   parameter branch when the literal one fails further down.
3. Among routes with the same kind and the same path (prefix, pattern shape): the
   higher ``priority``, then host-specific routes before host-less ones, then the
   earlier route in the list.
4. Filters -- ``methods``, ``hosts``, ``headers`` -- are applied to each candidate in
   that order; a candidate that fails them is skipped for the next one at the same
   node, then the next shorter prefix, then the patterns.

Path details, for a request path that is already normalised:

* An exact path matches only as written: ``/a/`` is not ``/a``.
* A prefix matches whole segments: ``/api`` (or ``/api/``) matches ``/api``,
  ``/api/`` and ``/api/x`` but not ``/apix``; ``/`` matches every path.
* A pattern ignores one trailing slash in the request (``/users/1/`` matches
  ``/users/{id}``) and in its own definition; ``{name}`` matches one non-empty segment.

Upstream path: ``strip_prefix`` removes the prefix (``/api/users`` -> ``/users``,
``/api`` -> ``/``); a prefix route's ``rewrite`` replaces the prefix; an exact route's
``rewrite`` replaces the whole path; a pattern route's ``rewrite`` is a template filled
with the parameters. Without either, the request path is sent unchanged.

Hosts are compared without the port and case-insensitively; ``*.example.com``
matches ``a.example.com`` and ``a.b.example.com`` but not ``example.com``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lucid_gateway.config import Route

__all__ = ["Match", "Router"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HOST_INDEX_MIN = 8  # this many exact-host routes at one node get a dict by host
_HOST_CACHE_SIZE = 1024  # distinct Host headers remembered per router


@dataclass(slots=True)
class Match:
    """The chosen route and what the proxy needs from the match."""

    route: Route
    index: int  # position of the route in the list given to Router
    route_id: str  # route.id, or "routes[N]" when it has none
    params: dict[str, str]  # {param} values for pattern routes, else {}
    upstream_path: str  # the path to send upstream after strip_prefix / rewrite


class _Entry:
    """One route compiled for the hot path: filters as sets, rewrites pre-split."""

    __slots__ = (
        "route",
        "index",
        "route_id",
        "filtered",
        "methods",
        "hosts",
        "wildcards",
        "headers",
        "cut",
        "base",
        "whole",
        "names",
        "template",
        "sort_key",
        "service",
        "policy",
        "overrides",
    )

    def __init__(self, route: Route, index: int, policy: Any = None,
                 overrides: Any = None) -> None:
        self.route = route
        self.index = index
        self.route_id = route.id or f"routes[{index}]"  # as lucid_gateway.route_id
        self.service = route.service
        self.policy = policy  # what the owner of the router keeps per route, read
        self.overrides = overrides  # back with the match (Router.find)
        self.methods = frozenset(route.methods) or None
        exact = frozenset(h for h in route.hosts if not h.startswith("*."))
        wild = frozenset(h[2:] for h in route.hosts if h.startswith("*."))
        self.hosts = exact if route.hosts else None
        self.wildcards = wild or None
        self.headers = tuple(route.headers.items()) or None
        self.filtered = bool(self.methods or self.hosts is not None or self.headers)
        # Prefix routes: upstream = base + path[cut:], or whole when nothing follows.
        self.cut = 0
        self.base: str | None = None
        self.whole: str | None = None
        # Pattern routes: parameter names in path order and a str.format template.
        self.names: tuple[str, ...] = ()
        self.template: str | None = None
        if route.prefix is not None:
            self.cut = len(route.prefix.rstrip("/"))
            replacement = "/" if route.strip_prefix else route.rewrite
            if replacement is not None:
                self.base = replacement.rstrip("/")
                self.whole = replacement
        elif route.pattern is not None:
            self.names = tuple(_PARAM.findall(route.pattern))
            if route.rewrite is not None:
                self.template = _format_template(route.rewrite)
        else:
            self.whole = route.rewrite
        self.sort_key = (-route.priority, 0 if route.hosts else 1, index)

    def host_ok(self, host: str) -> bool:
        if self.hosts is not None and host in self.hosts:
            return True
        wild = self.wildcards
        if wild is not None:
            dot = host.find(".")
            while dot != -1:
                if host[dot + 1 :] in wild:
                    return dot > 0
                dot = host.find(".", dot + 1)
        return False


class _Node:
    """A trie node (or an exact path): children, an optional ``{param}`` child, routes.

    ``entries`` is None when no route ends here, else the routes in precedence order.
    When many routes here differ only by exact host (one per tenant, say), those are
    moved to ``by_host`` so the filter scan does not grow with the tenant count.
    """

    __slots__ = ("children", "param", "entries", "by_host", "plain", "fallback")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.entries: Sequence[_Entry] | None = None
        self.by_host: dict[str, tuple[_Entry, ...]] | None = None
        self.plain: _Entry | None = None  # the first route, when it has no filters at all
        self.fallback: _Node | None = None  # prefix trie: nearest ancestor with routes

    def add(self, entry: _Entry) -> None:
        if self.entries is None:
            self.entries = []
        self.entries.append(entry)  # type: ignore[attr-defined]  # a list until seal()

    def seal(self) -> None:
        """Sort the routes by precedence and index the host-specific ones if many."""
        if self.entries is None:
            return
        entries = sorted(self.entries, key=_sort_key)
        hosted = [e for e in entries if e.hosts and e.wildcards is None]
        if len(hosted) >= _HOST_INDEX_MIN:
            by_host: dict[str, list[_Entry]] = {}
            for entry in hosted:
                for name in entry.hosts:  # type: ignore[union-attr]
                    by_host.setdefault(name, []).append(entry)
            self.by_host = {name: tuple(group) for name, group in by_host.items()}
            entries = [e for e in entries if not (e.hosts and e.wildcards is None)]
        self.entries = tuple(entries)
        if self.by_host is None and entries and not entries[0].filtered:
            self.plain = entries[0]


class Router:
    """Matches requests against a fixed list of routes; build a new one on reload."""

    __slots__ = (
        "routes",
        "_exact",
        "_prefixes",
        "_patterns",
        "_has_prefixes",
        "_has_patterns",
        "_has_hosts",
        "_host_keys",
    )

    def __init__(self, routes: Sequence[Route], policies: Sequence[Any] = (),
                 overrides: Sequence[Any] = ()) -> None:
        """``policies`` and ``overrides``, if given, hold one value per route that
        :meth:`find` hands back with the route's entry (``entry.policy``,
        ``entry.overrides``)."""
        self.routes = tuple(routes)
        self._exact: dict[str, _Node] = {}
        self._prefixes = _Node()
        self._patterns = _Node()
        for index, route in enumerate(self.routes):
            entry = _Entry(route, index, policies[index] if policies else None,
                           overrides[index] if overrides else None)
            if route.path is not None:
                self._exact.setdefault(route.path, _Node()).add(entry)
            elif route.prefix is not None:
                node = self._prefixes
                for segment in _segments(route.prefix):
                    node = node.children.setdefault(segment, _Node())
                node.add(entry)
            else:
                assert route.pattern is not None
                node = self._patterns
                for segment in _segments(route.pattern):
                    if _PARAM.fullmatch(segment):
                        if node.param is None:
                            node.param = _Node()
                        node = node.param
                    else:
                        node = node.children.setdefault(segment, _Node())
                node.add(entry)
        for node in self._exact.values():
            node.seal()
        _finish(self._prefixes)
        _finish(self._patterns)
        self._has_prefixes = _has_routes(self._prefixes)
        self._has_patterns = _has_routes(self._patterns)
        self._has_hosts = any(route.hosts for route in self.routes)
        self._host_keys: dict[str, str] = {}  # Host header -> host key, bounded

    def match(self, method: str, host: str, path: str, headers: Mapping[str, str]) -> Match | None:
        """The best route for this request, or None.

        :param method: upper-case HTTP method
        :param host: the Host header as received, port and case included
        :param path: the normalised, percent-decoded path, starting with "/"
        :param headers: request headers with lower-case names
        """
        found = self.find(method, host, path, headers)
        if found is None:
            return None
        entry, params, upstream = found
        return Match(entry.route, entry.index, entry.route_id, params, upstream)

    def find(self, method: str, host: str, path: str, headers: Mapping[str, str]
             ) -> tuple[_Entry, dict[str, str], str] | None:
        """:meth:`match` for the data path: the route's entry (``route``, ``index``,
        ``route_id``, ``service``, ``policy``, ``overrides``), the path parameters and
        the upstream path, without building a :class:`Match`."""
        if self._has_hosts:
            key = self._host_keys.get(host)
            if key is None:
                if len(self._host_keys) >= _HOST_CACHE_SIZE:
                    self._host_keys.clear()  # clients choose Host: never grow unbounded
                key = self._host_keys[host] = _host_key(host)
            host = key
        node = self._exact.get(path)
        if node is not None:
            entry = node.plain or _first(node, method, host, headers)
            if entry is not None:
                return entry, {}, path if entry.whole is None else entry.whole
        segments = None
        if self._has_prefixes:
            root = self._prefixes
            deepest = root if root.entries is not None else None
            if root.children:  # else only "/" routes: no segment to walk
                segments = path[1:].split("/")
                children = root.children
                for segment in segments:
                    node = children.get(segment)
                    if node is None:
                        break
                    if node.entries is not None:
                        deepest = node
                    children = node.children
            while deepest is not None:
                entry = deepest.plain or _first(deepest, method, host, headers)
                if entry is not None:
                    if entry.base is None:
                        return entry, {}, path
                    return entry, {}, _upstream_for_prefix(entry, path)
                deepest = deepest.fallback
        if self._has_patterns:
            if segments is None:
                segments = path[1:].split("/")
            end = len(segments)
            if end > 1 and not segments[-1]:
                end -= 1  # one trailing slash is ignored
            values: list[str] = []
            entry = _walk(self._patterns, segments, 0, end, values, method, host, headers)
            if entry is not None:
                names = entry.names  # the walk bound exactly one value per name
                if len(names) == 1:
                    params = {names[0]: values[0]}
                else:
                    params = dict(zip(names, values, strict=False))  # strict costs ~50%
                upstream = path if entry.template is None else entry.template.format_map(params)
                return entry, params, upstream
        return None


def _first(node: _Node, method: str, host: str, headers: Mapping[str, str]) -> _Entry | None:
    """The first route at this node, in precedence order, whose filters accept the request."""
    if node.by_host is not None:
        return _first_by_host(node, method, host, headers)
    for entry in node.entries:  # type: ignore[union-attr]
        if not entry.filtered or _accepts(entry, method, host, headers):
            return entry
    return None


def _first_by_host(
    node: _Node, method: str, host: str, headers: Mapping[str, str]
) -> _Entry | None:
    """``_first`` for an indexed node: merge this host's routes with the others, in order."""
    hosted = node.by_host.get(host, ())  # type: ignore[union-attr]
    rest = node.entries
    assert rest is not None
    i = j = 0
    while i < len(hosted) or j < len(rest):
        if j == len(rest) or (i < len(hosted) and hosted[i].sort_key < rest[j].sort_key):
            entry = hosted[i]
            i += 1
        else:
            entry = rest[j]
            j += 1
        if _accepts(entry, method, host, headers):
            return entry
    return None


def _accepts(entry: _Entry, method: str, host: str, headers: Mapping[str, str]) -> bool:
    if entry.methods is not None and method not in entry.methods:
        return False
    if entry.hosts is not None and not entry.host_ok(host):
        return False
    if entry.headers is not None:
        for name, value in entry.headers:
            if headers.get(name) != value:
                return False
    return True


def _walk(
    node: _Node,
    segments: list[str],
    i: int,
    end: int,
    values: list[str],
    method: str,
    host: str,
    headers: Mapping[str, str],
) -> _Entry | None:
    """Depth-first through the pattern trie, literal child before ``{param}`` child.

    ``values`` collects the parameter values along the current branch; on success it
    holds exactly the matched route's values, in path order. Only a node with both a
    matching literal child and a param child recurses; elsewhere the walk just loops.
    """
    while i < end:
        segment = segments[i]
        child = node.children.get(segment)
        param = node.param
        if param is not None and segment:
            if child is not None:
                mark = len(values)
                found = _walk(child, segments, i + 1, end, values, method, host, headers)
                if found is not None:
                    return found
                del values[mark:]  # drop what the failed literal branch bound
            values.append(segment)
            node = param
        elif child is not None:
            node = child
        else:
            return None
        i += 1
    if node.entries is None:
        return None
    return node.plain or _first(node, method, host, headers)


def _upstream_for_prefix(entry: _Entry, path: str) -> str:
    """The prefix replaced by its rewrite (``/`` for strip_prefix), never doubling a slash.

    With prefix ``/api`` and rewrite ``/v2`` (or ``/v2/``): ``/api/users`` -> ``/v2/users``;
    the bare prefix ``/api`` becomes the rewrite as written.
    """
    if entry.base is None:
        return path
    rest = path[entry.cut :]  # "" or starts with "/": prefixes match whole segments
    if not rest:
        return entry.whole  # type: ignore[return-value]
    return entry.base + rest


def _host_key(host: str) -> str:
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end != -1 else host
    else:
        colon = host.find(":")
        if colon != -1:
            host = host[:colon]
    if host.endswith("."):
        host = host[:-1]  # the fully-qualified form names the same host
    return host.lower()


def _segments(path: str) -> list[str]:
    """Route path to trie segments; ``/`` and ``""`` give the root (no segments)."""
    stripped = path.strip("/")
    return stripped.split("/") if stripped else []


def _sort_key(entry: _Entry) -> tuple[int, int, int]:
    return entry.sort_key


def _finish(root: _Node) -> None:
    """Seal every node of a trie and link each to its nearest ancestor with routes."""
    stack: list[tuple[_Node, _Node | None]] = [(root, None)]
    while stack:
        node, fallback = stack.pop()
        node.fallback = fallback
        if node.entries is not None:
            node.seal()
            fallback = node
        stack.extend((child, fallback) for child in node.children.values())
        if node.param is not None:
            stack.append((node.param, fallback))


def _has_routes(root: _Node) -> bool:
    stack = [root]
    while stack:
        node = stack.pop()
        if node.entries is not None:
            return True
        stack.extend(node.children.values())
        if node.param is not None:
            stack.append(node.param)
    return False


def _format_template(rewrite: str) -> str:
    """A rewrite like ``/u/{id}`` as a ``str.format`` template, other braces escaped."""
    parts = _PARAM.split(rewrite)  # literal, name, literal, name, ..., literal
    out = []
    for i, part in enumerate(parts):
        out.append("{" + part + "}" if i % 2 else part.replace("{", "{{").replace("}", "}}"))
    return "".join(out)
