"""The ``[monitoring]`` config section.

Metrics are on by default (that is the point of the plugin, and they are cheap);
the access log, alert rules, notifiers and reports' retention are opt-in or have
defaults that write nothing outside the data dir.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from lucid.config import first_repeat
from lucid.units import ByteSize, Duration

METRICS = (
    "error_rate", "request_rate", "p50_latency", "p95_latency", "p99_latency",
    "healthy_instance_share", "breaker_open", "rejections_rate", "upstream_errors_rate",
)
Metric = Literal[
    "error_rate", "request_rate", "p50_latency", "p95_latency", "p99_latency",
    "healthy_instance_share", "breaker_open", "rejections_rate", "upstream_errors_rate",
]
Comparison = Literal[">", ">=", "<", "<=", "==", "!="]
ALERT_RULE = "alert_rule"  # the definitions kind of alert rules
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,99}$")
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlertRule(Strict):
    """One alert rule: ``metric`` (over ``window``, optionally for one service/route)
    compared with ``threshold`` for at least ``for`` before it fires."""

    name: str = Field(description="unique name, also the alertname label")
    metric: Metric
    op: Comparison = ">"
    threshold: float
    window: Literal["1m", "5m", "1h"] = "1m"
    for_: Duration = Field(0.0, alias="for", description="how long the condition must hold")
    service: str = ""
    route: str = ""
    severity: Literal["info", "warning", "critical"] = "warning"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("letters, digits, '_', '.', ':', '-'; starting with a letter or '_'")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _LABEL.match(key) or key.startswith("__"):
                raise ValueError(f"{key!r} is not a valid label name")
        return value


class Notifier(Strict):
    """Where alert notifications go: an Alertmanager-compatible webhook, or the log."""

    type: Literal["webhook", "log"]
    url: HttpUrl | None = None
    timeout: Duration = Field(5.0, gt=0)
    backoff_initial: Duration = Field(0.5, gt=0, description="first retry delay")
    backoff_max: Duration = Field(30.0, gt=0, description="retry delay cap")
    max_queue: int = Field(10000, ge=1, description="notifications kept while the receiver is down")

    @model_validator(mode="after")
    def _url(self) -> Notifier:
        if self.type == "webhook" and self.url is None:
            raise ValueError("a webhook notifier needs a url")
        if self.type == "log" and self.url is not None:
            raise ValueError("a log notifier takes no url")
        return self


class AccessLog(Strict):
    """One JSON line per request, written by a background thread."""

    enabled: bool = False
    target: Literal["stdout", "file"] = "stdout"
    path: str = Field("", description="file path (relative to data_dir) when target = 'file'")
    max_bytes: ByteSize = Field(10 * 2**20, ge=1024)
    backups: int = Field(5, ge=0, le=100)

    @model_validator(mode="after")
    def _path(self) -> AccessLog:
        if self.target == "file" and not self.path:
            raise ValueError("target = 'file' needs a path")
        return self


class MonitoringConfig(Strict):
    """``[monitoring]``: every field has a default; metrics are on unless ``metrics = false``."""

    metrics: bool = Field(True, description="record request metrics (Prometheus and JSON)")
    metrics_public: bool = Field(
        False, description="with server.admin_secret set, serve GET /metrics without a token "
        "(as most exporters do); by default Prometheus sends a viewer token")
    buckets: list[float] = Field(
        default_factory=lambda: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
        description="latency histogram bucket bounds, seconds",
    )
    log_buffer: int = Field(1000, ge=0, le=1_000_000,
                            description="recent requests kept for GET /monitoring/logs")
    access_log: AccessLog = Field(default_factory=AccessLog)
    evaluation_interval: Duration = Field(5.0, gt=0, description="how often alert rules run")
    alerts: list[AlertRule] = Field(default_factory=list)
    notifiers: list[Notifier] = Field(default_factory=list)
    external_url: str = Field("", description="generatorURL/externalURL in webhook payloads")
    rollup_interval: Duration = Field(60.0, gt=0, description="length of one report rollup")
    retention: Duration = Field(30 * 86400.0, gt=0, description="how long rollups are kept")
    alert_history: int = Field(1000, ge=1, description="alert transitions kept in SQLite")
    max_clients: int = Field(1000, ge=1, description="distinct clients counted per rollup")
    node_label: bool = Field(
        False, description="add a 'node' label (the cluster node_id) to every series on "
        "GET /metrics; off, a Prometheus scraping every node sums them as they are")
    cluster_interval: Duration = Field(
        1.0, gt=0, le=60, description="with a Redis [cluster] backend: how often each node "
        "publishes its figures (GET /monitoring/cluster, cluster-wide alert rules)")
    leader_lease: Duration = Field(
        3.0, ge=0.3, le=60, description="with a Redis [cluster] backend: how long the alert "
        "leader's lock lasts unrenewed (renewed every sixth); another node takes over "
        "within about this long after the leader dies")

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, value: list[float]) -> list[float]:
        if not value or any(b <= 0 for b in value) or sorted(set(value)) != value:
            raise ValueError("give increasing, positive, distinct bounds")
        return value

    @model_validator(mode="after")
    def _unique(self) -> MonitoringConfig:
        if repeat := first_repeat(rule.name for rule in self.alerts):
            index, name = repeat
            raise ValueError(f"alerts[{index}].name = {name!r}: used twice")
        return self


class RouteMonitoring(Strict):
    """Per-route: ``plugins = { monitoring = { access_log = false } }``."""

    access_log: bool = True
