"""Request metrics recorded in plain Python structures, read at scrape time.

The request path does one dict lookup and a few integer additions per table: no
locks, no prometheus_client objects (their per-sample locks and label lookups are
what makes other gateways' metrics expensive). Prometheus text is produced from
these tables by a custom collector when ``/metrics`` is scraped, and windowed
figures (req/s, error rate, percentiles over 1 m / 5 m / 1 h) come from deltas a
background tick takes of the cumulative tables every ``TICK`` seconds.

Labels are bounded: a request that matched no route is labelled ``(unmatched)``,
never with its path; a method outside the standard ones is ``OTHER``; status codes
are reduced to their class (``2xx`` …); instance labels come from the instances the
core lists (``runtime.instances``).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lucid.runtime import Runtime
    from lucid_monitoring.clustered import ClusterFigures

UNMATCHED = "(unmatched)"
OTHER_CLIENTS = "(other)"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                     "CONNECT"})
CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
TICK = 10.0  # seconds per window slot
WINDOWS = {"1m": 60.0, "5m": 300.0, "1h": 3600.0}
SLOTS = int(WINDOWS["1h"] / TICK)

# Layout of one route entry (a list, mutated in place on the request path):
COUNT, DURATION_SUM, UPSTREAM_SUM, BYTES_IN, BYTES_OUT, ERRORS = range(6)
HEAD = 6  # then len(bounds)+1 duration buckets, then len(bounds)+1 upstream buckets


class Recorder:
    """Cumulative tables for one gateway, updated by :meth:`observe`."""

    def __init__(self, bounds: Iterable[float], max_clients: int = 1000):
        self.bounds = tuple(bounds)
        self.nb = len(self.bounds) + 1
        self.width = HEAD + 2 * self.nb
        self.max_clients = max_clients
        self.upstream_head = HEAD + self.nb  # where the upstream buckets start
        # (route, service, method, status class index) -> entry
        self.routes: dict[tuple[str, str, str, int], list[float]] = {}
        # the same entries by the exchange's own (route id, service, method, status)
        self.entries: dict[tuple[str, str, str, int], list[float]] = {}
        # (service, instance id) -> [attempts, failed, time-to-headers sum, *its buckets]
        self.instances: dict[tuple[str, str], list[float]] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}  # (service, kind)
        self.retries: dict[tuple[str, str], int] = {}  # (route, service)
        self.clients: dict[tuple[str, str], int] = {}  # (service, ip) -> n since last rollup
        # event-fed state
        self.breakers: dict[tuple[str, str], str] = {}  # (service, instance) -> state
        self.breaker_transitions: dict[tuple[str, str, str], int] = {}  # (service, from, to)
        self.rejections: dict[str, int] = {}  # limit name -> count
        self.degraded: dict[str, int] = {}  # on_backend_failure mode -> decisions
        self.rejected_keys: dict[str, int] = {}  # limited key -> count (bounded)
        self.health: dict[tuple[str, str], str] = {}  # (service, instance) -> status
        self.reloads = 0
        # windows: deque of (time, {key: delta entry}, {key: delta instance entry}, ...)
        self.slots: deque[tuple[float, dict[Any, list[float]], dict[Any, list[float]],
                                dict[str, int]]] = deque(maxlen=SLOTS)
        self._last_routes: dict[Any, list[float]] = {}
        self._last_instances: dict[Any, list[float]] = {}
        self._last_rejections: dict[str, int] = {}
        self._last_tick = time.time()
        self.started = self._last_tick
        # Worker 0 when server.workers > 1: a recorder holding every worker's counts
        # (workers.py). Windows, rollups and alerts are computed from it.
        self.cluster: Callable[[], Recorder] | None = None

    def view(self) -> Recorder:
        """Every worker's counts when there are several workers, else this recorder."""
        return self if self.cluster is None else self.cluster()

    # hot path --------------------------------------------------------------
    def observe(self, ex: Any) -> None:
        """Record one finished exchange. Called on the request path: keep it cheap
        (entry indices are literals here: COUNT=0, DURATION_SUM=1, UPSTREAM_SUM=2,
        BYTES_IN=3, BYTES_OUT=4, ERRORS=5, HEAD=6). The plugin's
        ``lucid_observe_exchange`` does the same inline (a call less per request):
        change both together."""
        status = ex.status
        key = (ex.route_id, ex.service, ex.method, status)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entry(key)
        duration = ex.duration
        bounds = self.bounds
        entry[0] += 1
        entry[1] += duration
        entry[3] += ex.bytes_in
        entry[4] += ex.bytes_out
        entry[6 + bisect_left(bounds, duration)] += 1
        if 500 <= status < 600:
            entry[5] += 1
        if ex.instance is not None:
            upstream = ex.upstream_duration
            entry[2] += upstream
            entry[self.upstream_head + bisect_left(bounds, upstream)] += 1
            if ex.attempts > 1:
                self.retried(ex)
        clients = self.clients
        ckey = (ex.service, ex.client_ip)
        n = clients.get(ckey)
        if n is not None:
            clients[ckey] = n + 1
        else:
            self.new_client(ckey)

    def entry(self, key: tuple[str, str, str, int]) -> list[float]:
        """The route entry of an exchange's (route id, service, method, status): its
        labels bounded (see the module's doc). Remembered by that raw key when the
        method is a standard one, so the request path finds it in one lookup (route
        ids, services and status codes are few; a client's odd methods are not)."""
        route, service, method, status = key
        normal = method in METHODS
        labels = (route or UNMATCHED, service, method if normal else "OTHER",
                  status // 100 if 0 < status < 600 else 0)
        entry = self.routes.get(labels)
        if entry is None:
            entry = self.routes[labels] = [0] * self.width
        if normal:
            self.entries[key] = entry
        return entry

    def retried(self, ex: Any) -> None:
        """An exchange that took more than one attempt (not the common case)."""
        rkey = (ex.route_id or UNMATCHED, ex.service)
        self.retries[rkey] = self.retries.get(rkey, 0) + ex.attempts - 1

    def new_client(self, ckey: tuple[str, str]) -> None:
        """A (service, client ip) not counted yet in this rollup: counted under its
        own key while there are fewer than ``max_clients``, else under (other)."""
        clients = self.clients
        if len(clients) < self.max_clients:
            clients[ckey] = 1
        else:
            ckey = (ckey[0], OTHER_CLIENTS)
            clients[ckey] = clients.get(ckey, 0) + 1

    def outcome(self, service: str, instance_id: str, outcome: Any) -> None:
        """Record one upstream attempt (every attempt, retries included). The
        plugin's ``lucid_record_outcome`` does the same inline: change both together."""
        ikey = (service, instance_id)
        ientry = self.instances.get(ikey)
        if ientry is None:
            ientry = self.instances[ikey] = [0] * (3 + self.nb)
        duration = outcome.duration
        ientry[0] += 1
        ientry[2] += duration
        ientry[3 + bisect_left(self.bounds, duration)] += 1
        if outcome.kind != "success":
            self.failed(ikey, outcome.kind)

    def failed(self, ikey: tuple[str, str], kind: str) -> None:
        """An attempt that failed (``kind``: its outcome's)."""
        self.instances[ikey][1] += 1
        ekey = (ikey[0], kind)
        self.upstream_errors[ekey] = self.upstream_errors.get(ekey, 0) + 1

    # events ------------------------------------------------------------------
    def observe_event(self, kind: str, data: dict[str, Any]) -> None:
        service = str(data.get("service") or "")
        # a service-wide breaker (no instance) is reported as instance "*"
        instance = str(data.get("instance") or data.get("instance_id") or "*")
        if kind == "breaker_transition":
            new = str(data.get("to", data.get("state", "")))
            old = str(data.get("from", ""))
            self.breakers[(service, instance)] = new
            tkey = (service, old, new)
            self.breaker_transitions[tkey] = self.breaker_transitions.get(tkey, 0) + 1
        elif kind == "limit_rejected":
            limit = str(data.get("limit", data.get("name", "default")))
            self.rejections[limit] = self.rejections.get(limit, 0) + 1
            rkey = str(data.get("key", ""))
            if rkey and (rkey in self.rejected_keys or len(self.rejected_keys) < 1000):
                self.rejected_keys[rkey] = self.rejected_keys.get(rkey, 0) + 1
        elif kind == "limit_degraded":
            mode = str(data.get("mode", ""))
            self.degraded[mode] = self.degraded.get(mode, 0) + int(data.get("decisions", 0))
        elif kind in ("instance_health_changed", "instance_registered"):
            status = str(data.get("status", data.get("health", data.get("to", "passing"))))
            self.health[(service, instance)] = status
        elif kind == "instance_deregistered":
            self.health.pop((service, instance), None)
            self.breakers.pop((service, instance), None)
        elif kind == "config_reloaded":
            self.reloads += 1

    # windows -----------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Close the current slot: store what changed since the previous tick."""
        now = time.time() if now is None else now
        view = self.view()
        routes = _deltas(view.routes, self._last_routes)
        instances = _deltas(view.instances, self._last_instances)
        rejections = {k: v - self._last_rejections.get(k, 0) for k, v in view.rejections.items()
                      if v != self._last_rejections.get(k, 0)}
        self._last_rejections = dict(view.rejections)
        self.slots.append((now, routes, instances, rejections))
        self._last_tick = now

    def window(self, seconds: float, now: float | None = None) -> tuple[
            float, dict[Any, list[float]], dict[Any, list[float]], dict[str, int]]:
        """(covered seconds, route deltas, instance deltas, rejections) over the last
        ``seconds``, the open slot included."""
        now = time.time() if now is None else now
        routes, instances, rejections = self.open_slot()
        for at, r, i, rej in reversed(self.slots):
            if at <= now - seconds:
                break
            _merge(routes, r)
            _merge(instances, i)
            for k, v in rej.items():
                rejections[k] = rejections.get(k, 0) + v
        covered = max(1.0, min(seconds, now - self.started))
        return covered, routes, instances, rejections

    def open_slot(self) -> tuple[dict[Any, list[float]], dict[Any, list[float]], dict[str, int]]:
        """(route deltas, instance deltas, rejections) since the last tick: the slot
        still open, every worker's."""
        view = self.view()
        routes = _deltas(view.routes, self._last_routes, keep=False)
        instances = _deltas(view.instances, self._last_instances, keep=False)
        rejections = {k: v - self._last_rejections.get(k, 0) for k, v in view.rejections.items()}
        return routes, instances, rejections

    def take_clients(self) -> dict[tuple[str, str], int]:
        clients, self.clients = self.clients, {}
        return clients


def _deltas(current: dict[Any, list[float]], last: dict[Any, list[float]],
            keep: bool = True) -> dict[Any, list[float]]:
    out: dict[Any, list[float]] = {}
    for key, entry in list(current.items()):
        snapshot = list(entry)
        previous = last.get(key)
        if previous is None:
            if snapshot[0]:
                out[key] = snapshot
        elif snapshot[0] != previous[0]:
            out[key] = [a - b for a, b in zip(snapshot, previous, strict=True)]
        if keep:
            last[key] = snapshot
    return out


def _merge(into: dict[Any, list[float]], other: dict[Any, list[float]]) -> None:
    for key, entry in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = list(entry)
        else:
            for i, v in enumerate(entry):
                mine[i] += v


def quantile(bounds: tuple[float, ...], counts: list[float], q: float) -> float | None:
    """Estimate the ``q`` quantile from bucket counts (linear inside a bucket, like
    Prometheus' ``histogram_quantile``); None without observations."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(counts):
        if seen + count >= rank and count > 0:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * ((rank - seen) / count)
        seen += count
    return bounds[-1]


def summarise(bounds: tuple[float, ...], entries: Iterable[list[float]], seconds: float,
              nb: int) -> dict[str, Any]:
    """req/s, error rate and percentiles of route entries (any grouping)."""
    count = errors = 0.0
    buckets = [0.0] * nb
    for entry in entries:
        count += entry[COUNT]
        errors += entry[ERRORS]
        for i in range(nb):
            buckets[i] += entry[HEAD + i]
    return figures(bounds, count, errors, buckets, seconds)


def figures(bounds: tuple[float, ...], count: float, errors: float, buckets: list[float],
            seconds: float) -> dict[str, Any]:
    def ms(q: float) -> float | None:
        value = quantile(bounds, buckets, q)
        return None if value is None else round(value * 1000, 3)

    return {
        "requests": int(count),
        "rps": round(count / seconds, 3) if seconds else 0.0,
        "error_rate": round(errors / count, 4) if count else 0.0,
        "p50_ms": ms(0.5), "p95_ms": ms(0.95), "p99_ms": ms(0.99),
    }


class PrometheusCollector(Collector):
    """Turns a :class:`Recorder` into metric families, at scrape time only."""

    def __init__(self, recorder: Recorder, runtime: Callable[[], Runtime | None],
                 alerts: Callable[[], Iterable[tuple[str, str, str]]],
                 workers: Callable[[Recorder], tuple[Recorder, int]] | None = None,
                 node: Callable[[], str | None] | None = None):
        self.recorder = recorder
        self.runtime = runtime
        self.alerts = alerts
        self.workers = workers  # adds the other workers' counts (server.workers > 1)
        # ``[monitoring] node_label``: the node id every series is labelled with, or None
        self.node = node

    def collect(self) -> Iterator[Any]:
        node = self.node() if self.node is not None else None
        for family in self._families():
            if node is not None:
                family.samples = [s._replace(labels={**s.labels, "node": node})
                                  for s in family.samples]
            yield family

    def _families(self) -> Iterator[Any]:
        rec = self.recorder
        other_in_flight = 0
        if self.workers is not None:
            rec, other_in_flight = self.workers(rec)
        bounds = rec.bounds
        nb = rec.nb
        requests = CounterMetricFamily(
            "lucid_requests", "Requests by route, service, method and status class",
            labels=["route", "service", "method", "code"])
        durations: dict[tuple[str, str], list[float]] = {}
        for (route, service, method, klass), entry in list(rec.routes.items()):
            requests.add_metric([route, service, method, CLASSES[klass]], entry[COUNT])
            agg = durations.get((route, service))
            if agg is None:
                durations[(route, service)] = list(entry)
            else:
                for i, v in enumerate(entry):
                    agg[i] += v
        yield requests
        yield self._histogram(
            "lucid_request_duration_seconds",
            "Whole exchange duration, from arrival to the last byte sent",
            durations, HEAD, DURATION_SUM, bounds, nb)
        yield self._histogram(
            "lucid_upstream_duration_seconds",
            "Upstream part of the exchange (last attempt), until its body was relayed",
            durations, HEAD + nb, UPSTREAM_SUM, bounds, nb)
        for name, index, text in (("lucid_request_bytes", BYTES_IN, "Request body bytes"),
                                  ("lucid_response_bytes", BYTES_OUT, "Response body bytes")):
            family = CounterMetricFamily(name, text, labels=["route", "service"])
            for (route, service), entry in durations.items():
                family.add_metric([route, service], entry[index])
            yield family
        runtime = self.runtime()
        in_flight = GaugeMetricFamily("lucid_requests_in_flight", "Requests being served")
        in_flight.add_metric([], other_in_flight + (
            runtime.counters.get("in_flight", 0) if runtime else 0))
        yield in_flight
        websockets = GaugeMetricFamily(
            "lucid_websockets_open", "WebSocket sessions being relayed (this worker)")
        websockets.add_metric([], runtime.counters.get("websockets", 0) if runtime else 0)
        yield websockets
        instance_requests = CounterMetricFamily(
            "lucid_instance_requests", "Upstream calls by instance", labels=["service", "instance"])
        instance_errors = CounterMetricFamily(
            "lucid_instance_errors", "Failed upstream calls by instance",
            labels=["service", "instance"])
        for (service, instance), entry in list(rec.instances.items()):
            instance_requests.add_metric([service, instance], entry[0])
            instance_errors.add_metric([service, instance], entry[1])
        yield instance_requests
        yield instance_errors
        errors = CounterMetricFamily("lucid_upstream_errors", "Upstream errors by kind",
                                     labels=["service", "kind"])
        for (service, kind), n in list(rec.upstream_errors.items()):
            errors.add_metric([service, kind], n)
        yield errors
        retries = CounterMetricFamily("lucid_retries", "Retried upstream attempts",
                                      labels=["route", "service"])
        for (route, service), n in list(rec.retries.items()):
            retries.add_metric([route, service], n)
        yield retries
        breaker = GaugeMetricFamily("lucid_breaker_state",
                                    "1 for the breaker's current state of each instance",
                                    labels=["service", "instance", "state"])
        for (service, instance), state in list(rec.breakers.items()):
            for candidate in ("closed", "open", "half_open"):
                breaker.add_metric([service, instance, candidate], 1 if state == candidate else 0)
        yield breaker
        transitions = CounterMetricFamily("lucid_breaker_transitions",
                                          "Circuit breaker transitions",
                                          labels=["service", "from", "to"])
        for (service, old, new), n in list(rec.breaker_transitions.items()):
            transitions.add_metric([service, old, new], n)
        yield transitions
        rejections = CounterMetricFamily("lucid_ratelimit_rejections",
                                         "Requests rejected by a rate limit", labels=["limit"])
        for limit, n in list(rec.rejections.items()):
            rejections.add_metric([limit], n)
        yield rejections
        degraded = CounterMetricFamily(
            "lucid_ratelimit_degraded_decisions",
            "Rate limit decisions made without the Redis backend, by on_backend_failure",
            labels=["mode"])
        for mode, n in list(rec.degraded.items()):
            degraded.add_metric([mode], n)
        yield degraded
        health = GaugeMetricFamily("lucid_instances", "Instances by health",
                                   labels=["service", "health"])
        counts: dict[tuple[str, str], int] = {}
        for (service, _), status in instance_health(runtime, rec).items():
            counts[(service, status)] = counts.get((service, status), 0) + 1
        for (service, status), n in sorted(counts.items()):
            health.add_metric([service, status], n)
        yield health
        reloads = CounterMetricFamily("lucid_config_reloads", "Config reloads")
        reloads.add_metric([], rec.reloads)
        yield reloads
        generation = GaugeMetricFamily("lucid_config_generation", "Live config generation")
        generation.add_metric([], runtime.generation.number if runtime else 0)
        yield generation
        alerts = GaugeMetricFamily("lucid_alerts", "Alert rules by state",
                                   labels=["alertname", "severity", "state"])
        for name, severity, state in self.alerts():
            alerts.add_metric([name, severity, state], 1)
        yield alerts

    @staticmethod
    def _histogram(name: str, text: str, table: dict[tuple[str, str], list[float]], first: int,
                   sum_index: int, bounds: tuple[float, ...], nb: int) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, text, labels=["route", "service"])
        for (route, service), entry in table.items():
            cumulative = 0.0
            buckets = []
            for i in range(nb):
                cumulative += entry[first + i]
                le = repr(float(bounds[i])) if i < len(bounds) else "+Inf"
                buckets.append((le, cumulative))
            if first > HEAD and cumulative == 0:
                continue  # no upstream call on this route yet
            family.add_metric([route, service], buckets, entry[sum_index])
        return family


def instance_health(runtime: Runtime | None,
                    rec: Recorder | ClusterFigures | None) -> dict[tuple[str, str], str]:
    """Health of every known instance: what the core knows of each service the routes
    name, or a health event mentioned (``runtime.instances``: whichever plugin resolves
    it answers), overridden by what health events said since."""
    known: dict[tuple[str, str], str] = {}
    if runtime is not None:
        services = dict.fromkeys(route.service for route in runtime.generation.routes)
        if rec is not None:
            services.update(dict.fromkeys(service for service, _ in rec.health))
        for service in services:
            for instance in runtime.instances(service):
                known[(service, instance.id)] = instance.status
    if rec is not None:
        known.update(rec.health)
    return known
