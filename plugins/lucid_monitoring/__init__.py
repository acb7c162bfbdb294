"""Lucid's monitoring plugin: Prometheus metrics, alerts, dashboard, access logs, reports.

Per request it does only in-memory bookkeeping (:class:`~lucid_monitoring.metrics.Recorder`,
a ring buffer, and a list append when the access log is on); everything else runs in
background tasks: window ticks, alert evaluation and notification, per-minute
rollups to SQLite, and log writing in a process of its own.

Alert rules are definitions (kind ``alert_rule``): the config file's
``[[monitoring.alerts]]`` are static, those created through ``POST /monitoring/alerts``
are dynamic and kept by the core's definitions store. ``lucid_prepare`` validates
them into the generation, and ``lucid_activate`` hands them to the alert engine once
that generation is live -- at startup, on a reload and after every rule write alike.

With a Redis ``[cluster]`` backend every node publishes its figures to Redis and one
elected node evaluates the rules on the whole cluster's figures (see ``clustered.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from lucid.config import ConfigError
from lucid.definitions import BackendUnavailable
from lucid.plugins import hookimpl
from lucid_monitoring.accesslog import FLUSH_INTERVAL, AccessLogWriter
from lucid_monitoring.alerts import AlertEngine, alertmanager_payload, make_notifier
from lucid_monitoring.clustered import ClusterFigures, ClusterMonitor, WindowSums, node_figures
from lucid_monitoring.config import ALERT_RULE as KIND
from lucid_monitoring.config import AlertRule, MonitoringConfig, RouteMonitoring
from lucid_monitoring.metrics import TICK, PrometheusCollector, Recorder
from lucid_monitoring.reports import Rollups
from lucid_monitoring.store import MonitoringStore, legacy_alert_rules
from lucid_monitoring.workers import SHARE_INTERVAL, WorkerShare

if TYPE_CHECKING:
    from lucid.model import Generation
    from lucid.runtime import Runtime

LUCID_CAPABILITY = "monitoring"
__all__ = ["MonitoringPlugin", "MonitoringConfig", "AlertRule"]

log = logging.getLogger("lucid.monitoring")


def static_alert_rules(config: Any) -> dict[str, AlertRule]:
    """The rules the config file declares (``[[monitoring.alerts]]``), by name, in file
    order: read-only through the API."""
    return {rule.name: rule for rule in config.monitoring.alerts}


@dataclass(frozen=True)
class AlertRules:
    """What ``lucid_prepare`` derives for one generation: the rules the engine runs,
    ``(rule, static, revision)`` each, and the API rules a config rule now shadows."""

    rules: tuple[tuple[AlertRule, bool, int], ...]
    shadowed: tuple[str, ...] = ()


def alert_rules(generation: Generation) -> AlertRules:
    """Validate every alert rule of ``generation``; a stored one that no longer
    validates rejects the generation (ConfigError) rather than vanish silently."""
    rules = []
    problems = []
    defined = generation.defined(KIND)
    for id, definition in defined.items():
        try:
            rule = definition.parsed(AlertRule)
        except ValidationError as exc:
            problems.append(f"alert rule {id!r} ({definition.origin}): {exc}")
            continue
        rules.append((rule, definition.origin == "static", definition.revision))
    if problems:
        raise ConfigError(generation.source, problems)
    shadowed = tuple(id for id in generation.definitions.of(KIND)
                     if defined[id].origin == "static")
    return AlertRules(tuple(rules), shadowed)


class MonitoringPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.config = MonitoringConfig()
        self.recorder: Recorder | None = None
        self.ring: deque[tuple[Any, ...]] | None = None
        self.writer: AccessLogWriter | None = None
        self._put: Callable[[Any], None] | None = None
        self.engine = AlertEngine()
        self.notifiers: list[Any] = []
        self.store: MonitoringStore | None = None
        self.rollups: Rollups | None = None
        self.registry: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._alerted = False  # an alert fired since the last rollup
        self._shadowed: set[str] = set()  # API rules a config rule hides (warned about)
        # Drawn before `lucid serve` forks its workers, so they all share it: where
        # they leave their metrics for worker 0 (see workers.py).
        self.run_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.workers: WorkerShare | None = None
        # With a Redis [cluster] backend (worker 0): figures shared, alerts led by one
        self.monitor: ClusterMonitor | None = None
        self.window_sums = WindowSums()  # closed slots summed once, not at each publish

    # lifecycle ----------------------------------------------------------------
    @hookimpl
    def lucid_register_config(self, register: Callable[..., None]) -> None:
        register("monitoring", MonitoringConfig, route_model=RouteMonitoring)

    @hookimpl
    def lucid_register_definitions(self, register: Callable[..., None]) -> None:
        register(KIND, AlertRule, static=static_alert_rules, legacy=legacy_alert_rules)

    @hookimpl
    def lucid_register_admin(self, register: Callable[..., None]) -> None:
        from lucid_monitoring.admin import blueprint, metrics_blueprint

        register(blueprint)
        register(metrics_blueprint)

    @hookimpl
    def lucid_prepare(self, generation: Generation) -> None:
        generation.state["monitoring"] = alert_rules(generation)
        # The recorder exists before any plugin starts: the registry emits
        # instance_registered events from its own startup, which runs first.
        cfg: MonitoringConfig = generation.config.monitoring
        if self.recorder is None and self.runtime is None and cfg.metrics:
            self.recorder = Recorder(cfg.buckets, cfg.max_clients)

    @hookimpl
    def lucid_activate(self, generation: Generation) -> None:
        """The generation is live: follow its config and run its alert rules."""
        self.config = generation.config.monitoring
        prepared: AlertRules = generation.state["monitoring"]
        for name in set(prepared.shadowed) - self._shadowed:  # once, not at every write
            log.warning("monitoring: alert rule %r from the API is shadowed by the "
                        "config's rule of that name", name)
        self._shadowed = set(prepared.shadowed)
        self.engine.set_rules(prepared.rules)

    @hookimpl
    async def lucid_startup(self, runtime: Runtime) -> None:
        from prometheus_client import CollectorRegistry

        self.runtime = runtime
        cfg: MonitoringConfig = runtime.config.monitoring
        self.config = cfg
        if cfg.metrics and self.recorder is None:
            self.recorder = Recorder(cfg.buckets, cfg.max_clients)
        if cfg.log_buffer:
            self.ring = deque(maxlen=cfg.log_buffer)
        loop = asyncio.get_running_loop()
        if cfg.access_log.enabled:
            self.writer = AccessLogWriter(cfg.access_log, runtime.data_dir)
            await self.writer.start()
            self._put = self.writer.put
            self._tasks.append(loop.create_task(self._every(FLUSH_INTERVAL, self._flush_log)))
        self.registry = CollectorRegistry(auto_describe=False)
        if self.recorder is not None and runtime.config.server.workers > 1:
            self.workers = WorkerShare(runtime.data_dir / "monitoring-workers", self.run_id,
                                       runtime.worker_index)
            if runtime.worker_index == 0:
                await asyncio.to_thread(self.workers.start_run)
                self.recorder.cluster = self._cluster
            else:
                self._tasks.append(loop.create_task(self._every(SHARE_INTERVAL, self._share)))
        if self.recorder is not None:
            self.registry.register(PrometheusCollector(
                self.recorder, lambda: self.runtime, self._alert_samples,
                self.workers.merged if self.workers is not None else None,
                node=self._node_label))
        if runtime.worker_index != 0:
            return  # alerts, notifications and rollups run in the first worker only
        self.store = await MonitoringStore.open(runtime.data_dir / "monitoring.db")
        self.notifiers = [make_notifier(n) for n in cfg.notifiers]
        for notifier in self.notifiers:
            notifier.start()
        if self.recorder is not None and runtime.cluster.shared:
            self.monitor = ClusterMonitor(runtime.cluster, self.run_id, cfg.cluster_interval,
                                          cfg.leader_lease)
            self._tasks += [
                loop.create_task(self._every(cfg.cluster_interval, self._publish)),
                # every sixth of the lease: the holder renews, the others try to take it
                loop.create_task(self._every(cfg.leader_lease / 6, self._campaign)),
            ]
        if self.recorder is not None:
            self.rollups = Rollups(self.recorder, self.workers.take_clients
                                   if self.workers is not None else None)
            self._tasks += [
                loop.create_task(self._every(TICK, self._tick)),
                loop.create_task(self._every(cfg.evaluation_interval, self.evaluate)),
                loop.create_task(self._every(cfg.rollup_interval, self.rollup)),
            ]

    @hookimpl
    async def lucid_shutdown(self, runtime: Runtime) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        if self.monitor is not None:
            try:  # another node takes the lead now, not after the lease
                await self.monitor.resign()
            except BackendUnavailable:
                pass
            self.monitor = None
        if self.workers is not None and runtime.worker_index != 0:
            try:  # the last counts; nothing is in flight any more
                assert self.recorder is not None
                self.workers.write(self.recorder, 0)
                if self.ring is not None:
                    self.workers.write_log(self.ring)
            except Exception:
                log.exception("monitoring: final metrics snapshot failed")
        if self.store is not None and self.rollups is not None:
            try:
                await self.rollup()  # keep the partial minute
            except Exception:
                log.exception("monitoring: final rollup failed")
        for notifier in self.notifiers:
            await notifier.stop()
        if self.writer is not None:
            await self.writer.stop()
            self.writer = None
            self._put = None
        if self.store is not None:
            await self.store.close()
            self.store = None

    # data path ------------------------------------------------------------------
    # Both hooks below run once per request (per attempt, for the outcome) and do
    # their work inline: Recorder.observe / Recorder.outcome and accesslog.entry are
    # the same code as functions, each call saved is about a thousand instructions.
    # Change them together (test_monitoring_hotpath checks that they agree).
    @hookimpl
    def lucid_observe_exchange(self, exchange: Any) -> None:
        recorder = self.recorder
        if recorder is not None:  # Recorder.observe
            status = exchange.status
            key = (exchange.route_id, exchange.service, exchange.method, status)
            tally = recorder.entries.get(key)
            if tally is None:
                tally = recorder.entry(key)
            duration = exchange.duration
            bounds = recorder.bounds
            tally[0] += 1
            tally[1] += duration
            tally[3] += exchange.bytes_in
            tally[4] += exchange.bytes_out
            tally[6 + bisect_left(bounds, duration)] += 1
            if 500 <= status < 600:
                tally[5] += 1
            if exchange.instance is not None:
                upstream = exchange.upstream_duration
                tally[2] += upstream
                tally[recorder.upstream_head + bisect_left(bounds, upstream)] += 1
                if exchange.attempts > 1:
                    recorder.retried(exchange)
            clients = recorder.clients
            ckey = (exchange.service, exchange.client_ip)
            n = clients.get(ckey)
            if n is not None:
                clients[ckey] = n + 1
            else:
                recorder.new_client(ckey)
        ring = self.ring
        put = self._put
        if ring is None and put is None:
            return
        if exchange.overrides:
            override = exchange.overrides.get("monitoring")
            if override is not None and not override.access_log:
                return
        identity = exchange.identity  # accesslog.entry
        instance = exchange.instance
        fields = (time.time(), exchange.request_id, exchange.route_id, exchange.service,
                  instance.id if instance else "", exchange.method, exchange.path,
                  exchange.status, exchange.duration, exchange.upstream_duration,
                  exchange.bytes_in, exchange.bytes_out, exchange.client_ip,
                  (identity.get("sub") or identity.get("subject") or "") if identity else "",
                  exchange.attempts, exchange.error)
        if ring is not None:
            ring.append(fields)
        if put is not None:
            put(fields)

    @hookimpl
    def lucid_record_outcome(self, exchange: Any, instance: Any, outcome: Any) -> None:
        recorder = self.recorder
        if recorder is not None:  # Recorder.outcome
            ikey = (exchange.service, instance.id)
            tally = recorder.instances.get(ikey)
            if tally is None:
                tally = recorder.instances[ikey] = [0] * (3 + recorder.nb)
            duration = outcome.duration
            tally[0] += 1
            tally[2] += duration
            tally[3 + bisect_left(recorder.bounds, duration)] += 1
            if outcome.kind != "success":
                recorder.failed(ikey, outcome.kind)

    @hookimpl
    def lucid_observe_event(self, event: Any) -> None:
        if self.recorder is not None:
            self.recorder.observe_event(event.kind, event.data)

    # background -------------------------------------------------------------------
    async def _every(self, seconds: float, job: Callable[[], Awaitable[Any]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("monitoring: background job %s failed", job.__name__)

    async def _flush_log(self) -> None:
        if self.writer is not None:
            await self.writer.flush()

    def _cluster(self) -> Recorder:
        assert self.workers is not None and self.recorder is not None
        return self.workers.merged(self.recorder)[0]

    async def _share(self) -> None:
        assert self.workers is not None and self.recorder is not None
        assert self.runtime is not None
        self.workers.write(self.recorder, self.runtime.counters.get("in_flight", 0))
        if self.ring is not None:
            self.workers.write_log(self.ring)

    async def _tick(self) -> None:
        assert self.recorder is not None
        self.recorder.tick()

    def _node_label(self) -> str | None:
        if not self.config.node_label or self.runtime is None:
            return None
        return self.runtime.cluster.node_id

    def _windows(self) -> set[str]:
        """The windows this node publishes: the last minute, and whatever a rule uses."""
        return {"1m"} | {a.rule.window for a in self.engine.alerts.values()}

    async def _publish(self) -> None:
        """Put this node's figures in Redis; a follower also takes the alert states."""
        monitor = self.monitor
        assert monitor is not None and self.recorder is not None
        try:
            await monitor.publish(node_figures(self.recorder, monitor.node_id,
                                               self._windows(), time.time(),
                                               self.window_sums))
            if not monitor.leading:
                await monitor.read_states(self.engine)
        except BackendUnavailable:
            pass  # logged once by the cluster; the figures expire, then come back

    async def _campaign(self) -> None:
        monitor = self.monitor
        assert monitor is not None
        try:
            await monitor.campaign(self.engine)  # a new leader goes on from the last one
        except BackendUnavailable:
            monitor.step_down()  # nobody can take the lock while Redis is away

    async def cluster_figures(self, now: float) -> ClusterFigures:
        """Every live node's published figures, this node's taken fresh."""
        from lucid.cluster import status

        assert self.monitor is not None and self.recorder is not None
        runtime = self.runtime
        assert runtime is not None
        nodes = (await status(runtime))["nodes"]
        others = [n["node_id"] for n in nodes if n["node_id"] != self.monitor.node_id]
        documents = await self.monitor.read(others)
        mine = node_figures(self.recorder, self.monitor.node_id, self._windows(), now,
                            self.window_sums)
        return ClusterFigures(self.recorder.bounds, [mine, *documents.values()])

    async def evaluate(self) -> list[Any]:
        """Run every rule once; persist and notify the transitions. In a Redis
        cluster only the leader does, on the cluster's figures, and only once the
        alert states are written while it still holds the lock."""
        if self.recorder is None:
            return []
        now = time.time()
        monitor = self.monitor
        if monitor is None:
            transitions = self.engine.evaluate(self.recorder, self.runtime, now)
        else:
            if not monitor.leading:
                return []
            try:
                figures = await self.cluster_figures(now)
                transitions = self.engine.evaluate(figures, self.runtime, now)
                written = await monitor.write_states(self.engine)
            except BackendUnavailable:
                written = False
            if not written:
                # Not written, not sent: step down; whoever leads next (this node
                # too) starts from the states in Redis and sees these changes again.
                monitor.step_down()
                return []
        if self.engine.firing():
            self._alerted = True
        if not transitions:
            return transitions
        if self.store is not None:
            await self.store.record_transitions(
                [(t.alert.rule.name, t.state, t.value, t.alert.rule.severity, t.alert.labels,
                  t.at) for t in transitions], self.config.alert_history)
        for t in transitions:
            if t.state in ("firing", "resolved"):
                payload = alertmanager_payload(t, self.config.external_url)
                for notifier in self.notifiers:
                    notifier.send(payload)
        return transitions

    async def rollup(self) -> None:
        if self.rollups is None or self.store is None:
            return
        interval = self.config.rollup_interval
        now = time.time()
        minute = now - now % interval
        alerting = self._alerted or self.engine.firing()
        self._alerted = False
        rows = self.rollups.take(minute, alerting)
        await self.store.add_rollups(rows, now - self.config.retention)

    def _alert_samples(self) -> list[tuple[str, str, str]]:
        return [(a.rule.name, a.rule.severity, a.state) for a in self.engine.alerts.values()]
