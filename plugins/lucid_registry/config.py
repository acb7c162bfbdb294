"""The ``[registry]`` config section and the payload models of the admin API.

One set of models serves both: a service declared in TOML and one registered through
``POST /registry/services`` are validated by the same rules, so an operator never
meets two dialects. Every field has a default, so an absent ``[registry]`` is inert.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lucid.config import first_repeat
from lucid.model import parse_upstream_url
from lucid.passive import PassiveConfig
from lucid.units import Duration

NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
Status = Literal["passing", "warning", "critical"]
STATUSES = ("passing", "warning", "critical", "maintenance")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpCheck(Strict):
    """An active check: ``GET <instance><path>`` every ``interval`` (± ``jitter``)."""

    path: str = Field("/health", description="requested on the instance's base URL")
    interval: Duration = Field(10.0, ge=0.1, le=3600)
    timeout: Duration = Field(2.0, gt=0, le=300)
    expected_statuses: list[int] = Field(
        default_factory=list, description="statuses that pass; empty: any 2xx"
    )
    healthy_threshold: int = Field(1, ge=1, le=100, description="passes needed to go passing")
    unhealthy_threshold: int = Field(2, ge=1, le=100, description="failures to go critical")
    jitter: float = Field(0.1, ge=0, le=0.5, description="fraction of the interval, random ±")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("expected_statuses")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return value


class CheckSpec(Strict):
    """How a service's instances are judged. Nothing set: they stay as registered."""

    ttl: Duration | None = Field(
        None, ge=1, le=86400, description="critical unless renewed within this time"
    )
    deregister_after: Duration | None = Field(
        None, ge=1, le=86400 * 30,
        description="remove an instance critical this long (registered ones, not static)",
    )
    http: HttpCheck | None = None


class InstanceSpec(Strict):
    """One instance as registered: where it is and how it is described."""

    id: str = Field("", pattern=r"^([A-Za-z0-9][A-Za-z0-9._:-]{0,127})?$",
                    description="defaults to host:port")
    url: str = Field(description="scheme://host:port")
    weight: int = Field(1, ge=1, le=10_000)
    zone: str = Field("", max_length=64)
    metadata: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    status: Status = "passing"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme, host, port = parse_upstream_url(value)
        return f"{scheme}://{host}:{port}"

    @model_validator(mode="after")
    def _default_id(self) -> InstanceSpec:
        if not self.id:
            self.id = self.url.split("://", 1)[1]
        return self


class InstanceUpdate(Strict):
    """``PUT /registry/services/{id}/instances/{iid}``: replaces where and how it is
    described (its id and health are kept)."""

    url: str
    weight: int = Field(1, ge=1, le=10_000)
    zone: str = Field("", max_length=64)
    metadata: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme, host, port = parse_upstream_url(value)
        return f"{scheme}://{host}:{port}"


def _instances(value: Any) -> Any:
    if isinstance(value, list):
        return [{"url": v} if isinstance(v, str) else v for v in value]
    return value


def _unique_ids(instances: list[InstanceSpec]) -> list[InstanceSpec]:
    if repeat := first_repeat(instance.id for instance in instances):
        raise ValueError(f"instance id {repeat[1]!r} appears twice")
    return instances


class ServiceBody(Strict):
    """What describes a service, apart from its name and instances."""

    metadata: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    check: CheckSpec = Field(default_factory=CheckSpec)


class StaticService(ServiceBody):
    """``[registry.services.<name>]``: a service declared in the config (static)."""

    instances: list[InstanceSpec] = Field(default_factory=list)

    @field_validator("instances", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        return _instances(value)

    @field_validator("instances")
    @classmethod
    def _unique(cls, value: list[InstanceSpec]) -> list[InstanceSpec]:
        return _unique_ids(value)


class ServiceRegistration(StaticService):
    """``POST /registry/services``."""

    id: str = Field(pattern=NAME)


class ServiceUpdate(ServiceBody):
    """``PUT /registry/services/{id}``: replaces metadata, tags and check."""


class HealthReport(Strict):
    """``POST /registry/services/{id}/health``: a heartbeat, renewing the instance's TTL."""

    instance: str = Field(min_length=1, max_length=128)
    status: Status = "passing"
    note: str = Field("", max_length=1024)


class BatchHeartbeat(Strict):
    """One entry of ``POST /registry/health``."""

    service: str = Field(min_length=1, max_length=128)
    instance: str = Field(min_length=1, max_length=128)
    status: Status = "passing"
    note: str = Field("", max_length=1024)


class HealthBatch(Strict):
    """``POST /registry/health``: heartbeats for many instances in one request."""

    heartbeats: list[BatchHeartbeat] = Field(min_length=1, max_length=1000)


class Maintenance(Strict):
    """``PUT /registry/services/{id}/instances/{iid}/maintenance``."""

    enabled: bool
    reason: str = Field("", max_length=1024)


# ``[registry.passive]`` is the older spelling of the core's ``[server.passive]`` (passive
# health now covers every instance, whichever plugin declared it): same fields, and
# set alone it configures the gateway's passive health.
Passive = PassiveConfig


class RegistryConfig(Strict):
    """``[registry]``: static services, passive health and limits of the admin API."""

    services: dict[str, StaticService] = Field(default_factory=dict)
    passive: Passive = Field(default_factory=Passive,
                             description="alias of [server.passive]; set one of them")
    check_concurrency: int = Field(
        32, ge=1, le=1024, description="active HTTP checks in flight at once"
    )
    max_wait: Duration = Field(300.0, gt=0, le=600, description="longest blocking query")

    @field_validator("services")
    @classmethod
    def _names(cls, value: dict[str, StaticService]) -> dict[str, StaticService]:
        import re

        for name in value:
            if not re.match(NAME, name):
                raise ValueError(f"service name {name!r} must match {NAME}")
        return value
