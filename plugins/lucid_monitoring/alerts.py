"""Alert rules, their pending → firing → resolved states, and notifiers.

Rules are evaluated every ``evaluation_interval`` against the in-memory windows of
the :class:`~lucid_monitoring.metrics.Recorder` (never a store read). Transitions are
persisted (alert history) and handed to the notifiers. The webhook notifier keeps
notifications in memory, in order, while its receiver is down and retries with
exponential backoff, so nothing is lost while the gateway runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import operator
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from lucid_monitoring.config import AlertRule, Notifier
from lucid_monitoring.metrics import (
    COUNT,
    ERRORS,
    HEAD,
    WINDOWS,
    Recorder,
    instance_health,
    quantile,
)

if TYPE_CHECKING:
    from lucid.runtime import Runtime
    from lucid_monitoring.clustered import ClusterFigures

log = logging.getLogger("lucid.monitoring.alerts")

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
       "==": operator.eq, "!=": operator.ne}
ZERO_TIME = "0001-01-01T00:00:00Z"


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def measure(rule: AlertRule, rec: Recorder | ClusterFigures, runtime: Runtime | None,
            now: float) -> float | None:
    """The rule's figure now, or None when there is nothing to judge (no traffic).
    ``rec`` is this gateway's recorder, or in a Redis cluster every node's figures."""
    metric = rule.metric
    if metric == "healthy_instance_share":
        statuses = [s for (service, _), s in instance_health(runtime, rec.view()).items()
                    if not rule.service or service == rule.service]
        if not statuses:
            return None
        return sum(1 for s in statuses if s == "passing") / len(statuses)
    if metric == "breaker_open":
        return float(sum(1 for (service, _), s in rec.view().breakers.items()
                         if s == "open" and (not rule.service or service == rule.service)))
    covered, routes, instances, rejections = rec.window(WINDOWS[rule.window], now)
    if metric == "rejections_rate":
        return sum(rejections.values()) / covered
    if metric == "upstream_errors_rate":
        return sum(e[1] for (service, _), e in instances.items()
                   if not rule.service or service == rule.service) / covered
    entries = [e for (route, service, _, _), e in routes.items()
               if (not rule.service or service == rule.service)
               and (not rule.route or route == rule.route)]
    count = sum(e[COUNT] for e in entries)
    if metric == "request_rate":
        return count / covered
    if not count:
        return None
    if metric == "error_rate":
        return sum(e[ERRORS] for e in entries) / count
    buckets = [sum(e[HEAD + i] for e in entries) for i in range(rec.nb)]
    q = {"p50_latency": 0.5, "p95_latency": 0.95, "p99_latency": 0.99}[metric]
    return quantile(rec.bounds, buckets, q)


@dataclass
class AlertState:
    rule: AlertRule
    static: bool
    revision: int = 0  # of the rule's definition (0: from the config file)
    state: str = "inactive"  # inactive | pending | firing
    since: float = 0.0  # when the condition started holding
    fired_at: float = 0.0
    value: float | None = None
    last_evaluated: float = 0.0

    @property
    def labels(self) -> dict[str, str]:
        labels = {"alertname": self.rule.name, "severity": self.rule.severity}
        if self.rule.service:
            labels["service"] = self.rule.service
        if self.rule.route:
            labels["route"] = self.rule.route
        return {**labels, **self.rule.labels}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.rule.name, "state": self.state,
            "value": None if self.value is None else round(self.value, 6),
            "since": self.since or None, "fired_at": self.fired_at or None,
            "static": self.static, "revision": self.revision, "labels": self.labels,
            "rule": self.rule.model_dump(by_alias=True),
        }


@dataclass
class Transition:
    alert: AlertState
    state: str  # pending | firing | resolved | inactive
    value: float | None
    at: float
    starts_at: float = 0.0


@dataclass
class AlertEngine:
    """Evaluates rules; returns the transitions of each evaluation."""

    alerts: dict[str, AlertState] = field(default_factory=dict)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))

    def set_rules(self, rules: Iterable[tuple[AlertRule, bool, int]]) -> None:
        """Replace the rule set (``(rule, static, revision)`` each), keeping the state
        of rules that did not change: a reload or another rule's write must not reset
        a pending ``for`` timer or re-send a firing alert."""
        kept: dict[str, AlertState] = {}
        for rule, static, revision in rules:
            old = self.alerts.get(rule.name)
            if old is not None and old.rule == rule:
                old.static, old.revision = static, revision
                kept[rule.name] = old
            else:
                kept[rule.name] = AlertState(rule, static, revision)
        self.alerts = kept

    def evaluate(self, rec: Recorder | ClusterFigures, runtime: Runtime | None,
                 now: float) -> list[Transition]:
        out: list[Transition] = []
        for alert in list(self.alerts.values()):
            value = measure(alert.rule, rec, runtime, now)
            alert.value = value
            alert.last_evaluated = now
            holds = value is not None and OPS[alert.rule.op](value, alert.rule.threshold)
            if holds:
                if alert.state == "inactive":
                    alert.state, alert.since = "pending", now
                    out.append(Transition(alert, "pending", value, now))
                if alert.state == "pending" and now - alert.since >= alert.rule.for_:
                    alert.state, alert.fired_at = "firing", now
                    out.append(Transition(alert, "firing", value, now, now))
            elif alert.state == "firing":
                out.append(Transition(alert, "resolved", value, now, alert.fired_at))
                alert.state, alert.since, alert.fired_at = "inactive", 0.0, 0.0
            elif alert.state == "pending":
                out.append(Transition(alert, "inactive", value, now))
                alert.state, alert.since = "inactive", 0.0
        for t in out:
            self.recent.appendleft({"name": t.alert.rule.name, "state": t.state,
                                    "value": t.value, "at": t.at,
                                    "severity": t.alert.rule.severity,
                                    "labels": t.alert.labels})
        return out

    def firing(self) -> bool:
        return any(a.state == "firing" for a in self.alerts.values())


def alertmanager_payload(t: Transition, external_url: str) -> dict[str, Any]:
    """The body Alertmanager's webhook receiver sends (version 4), for one alert."""
    alert = t.alert
    labels = alert.labels
    status = "resolved" if t.state == "resolved" else "firing"
    fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    annotations = dict(alert.rule.annotations)
    if t.value is not None:
        annotations.setdefault("value", f"{t.value:g}")
    group_key = "{}:{alertname=" + json.dumps(alert.rule.name) + "}"
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "lucid",
        "groupLabels": {"alertname": alert.rule.name},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "alerts": [{
            "status": status,
            "labels": labels,
            "annotations": annotations,
            "startsAt": iso(t.starts_at or t.at),
            "endsAt": iso(t.at) if status == "resolved" else ZERO_TIME,
            "generatorURL": external_url,
            "fingerprint": fingerprint,
        }],
    }


class WebhookNotifier:
    """POSTs payloads in order; on failure keeps them queued and retries with backoff."""

    def __init__(self, config: Notifier):
        self.config = config
        self.url = str(config.url)
        self.queue: deque[dict[str, Any]] = deque()
        self.delivered = 0
        self.failures = 0
        self.dropped = 0
        self.last_error = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self.queue:
            log.warning("webhook %s: %d notification(s) not delivered at shutdown",
                        self.url, len(self.queue))

    def send(self, payload: dict[str, Any]) -> None:
        if len(self.queue) >= self.config.max_queue:
            self.queue.popleft()
            self.dropped += 1
            log.error("webhook %s: queue full (%d), dropped the oldest notification",
                      self.url, self.config.max_queue)
        self.queue.append(payload)
        self._wake.set()

    async def _run(self) -> None:
        assert self._session is not None
        delay = self.config.backoff_initial
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            payload = self.queue[0]
            try:
                async with self._session.post(self.url, json=payload) as response:
                    await response.read()
                    if response.status >= 300:
                        raise RuntimeError(f"receiver answered {response.status}")
            except (aiohttp.ClientError, TimeoutError, RuntimeError, OSError) as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("webhook %s: delivery failed (%s); retrying in %.1fs, %d queued",
                            self.url, self.last_error, delay, len(self.queue))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max)
                continue
            self.queue.popleft()
            self.delivered += 1
            delay = self.config.backoff_initial

    def describe(self) -> dict[str, Any]:
        return {"type": "webhook", "url": self.url, "queued": len(self.queue),
                "delivered": self.delivered, "failures": self.failures,
                "dropped": self.dropped, "last_error": self.last_error}


class LogNotifier:
    """Writes each notification as one WARNING (firing) or INFO (resolved) log line."""

    def __init__(self) -> None:
        self.delivered = 0

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def send(self, payload: dict[str, Any]) -> None:
        alert = payload["alerts"][0]
        level = logging.WARNING if payload["status"] == "firing" else logging.INFO
        log.log(level, "alert %s %s: %s", alert["labels"]["alertname"], payload["status"],
                json.dumps({"labels": alert["labels"], "annotations": alert["annotations"],
                            "startsAt": alert["startsAt"], "endsAt": alert["endsAt"]}))
        self.delivered += 1

    def describe(self) -> dict[str, Any]:
        return {"type": "log", "delivered": self.delivered}


def make_notifier(config: Notifier) -> WebhookNotifier | LogNotifier:
    return WebhookNotifier(config) if config.type == "webhook" else LogNotifier()


def now() -> float:
    return time.time()
