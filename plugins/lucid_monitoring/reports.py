"""Per-minute rollups (persisted) and the reports built from them.

Every ``rollup_interval`` the plugin turns what the recorder counted since the last
rollup into one row per (service, route), one per service (``route = "*"``, carrying
its top clients) and one for the whole gateway (``service = ""``, ``route = "*"``,
written even without traffic: availability is the share of those minutes during which
no alert was firing).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from lucid_monitoring.metrics import COUNT, DURATION_SUM, ERRORS, HEAD, Recorder, figures

PERIODS = {"hour": 3600.0, "day": 86400.0}
TOP_CLIENTS = 10


class Rollups:
    """Takes rollup rows out of a recorder: deltas since the previous rollup."""

    def __init__(self, recorder: Recorder,
                 other_clients: Callable[[], dict[tuple[str, str], int]] | None = None):
        self.recorder = recorder
        # server.workers > 1: the other workers' client counts since the last rollup
        self.other_clients = other_clients
        self._last: dict[Any, list[float]] = {}

    def take(self, minute: float, alerting: bool) -> list[tuple[Any, ...]]:
        rec = self.recorder
        nb = rec.nb
        groups: dict[tuple[str, str], list[float]] = {}
        for key, entry in list(rec.view().routes.items()):
            snapshot = list(entry[:HEAD + nb])
            previous = self._last.get(key)
            self._last[key] = snapshot
            delta = snapshot if previous is None else [a - b for a, b in
                                                        zip(snapshot, previous, strict=True)]
            if not delta[COUNT]:
                continue
            route, service = key[0], key[1]
            for group in ((service, route), (service, "*")):
                agg = groups.get(group)
                if agg is None:
                    groups[group] = list(delta)
                else:
                    for i, v in enumerate(delta):
                        agg[i] += v
        clients: dict[str, dict[str, int]] = {}
        taken = rec.take_clients()
        if self.other_clients is not None:
            for client, n in self.other_clients().items():
                taken[client] = taken.get(client, 0) + n
        for (service, ip), n in taken.items():
            clients.setdefault(service, {})[ip] = n
        rows = []
        flag = 1 if alerting else 0
        for (service, route), agg in sorted(groups.items()):
            top = {}
            if route == "*":
                top = dict(sorted(clients.get(service, {}).items(),
                                  key=lambda kv: -kv[1])[:TOP_CLIENTS])
            rows.append((minute, service, route, int(agg[COUNT]), int(agg[ERRORS]),
                         agg[DURATION_SUM], json.dumps(agg[HEAD:HEAD + nb]), json.dumps(top),
                         flag))
        if ("", "*") not in groups:
            rows.append((minute, "", "*", 0, 0, 0.0, json.dumps([0] * nb), "{}", flag))
        return rows


def build_report(rows: list[dict[str, Any]], bounds: tuple[float, ...], period: str
                 ) -> list[dict[str, Any]]:
    """One entry per period bucket: per-service and per-route figures, availability."""
    size = PERIODS[period]
    nb = len(bounds) + 1
    buckets: dict[float, dict[tuple[str, str], dict[str, Any]]] = {}
    minutes: dict[float, list[bool]] = {}
    for row in rows:
        start = row["minute"] - row["minute"] % size
        if row["service"] == "" and row["route"] == "*":
            minutes.setdefault(start, []).append(row["alerting"])
            if not row["requests"]:
                continue
        groups = buckets.setdefault(start, {})
        agg = groups.setdefault((row["service"], row["route"]), {
            "requests": 0, "errors": 0, "buckets": [0] * nb, "clients": {}})
        agg["requests"] += row["requests"]
        agg["errors"] += row["errors"]
        counts = row["buckets"]
        if len(counts) == nb:
            for i, v in enumerate(counts):
                agg["buckets"][i] += v
        for ip, n in row["clients"].items():
            agg["clients"][ip] = agg["clients"].get(ip, 0) + n
    report = []
    for start in sorted(set(buckets) | set(minutes)):
        flags = minutes.get(start, [])
        services: dict[str, dict[str, Any]] = {}
        for (service, route), agg in sorted(buckets.get(start, {}).items()):
            if service == "" and route == "*":
                continue
            fig = figures(bounds, agg["requests"], agg["errors"], agg["buckets"], size)
            fig.pop("rps")
            if route == "*":
                top = sorted(agg["clients"].items(), key=lambda kv: -kv[1])[:TOP_CLIENTS]
                services.setdefault(service, {"routes": {}}).update(
                    fig, top_clients=[{"client": ip, "requests": n} for ip, n in top])
            else:
                services.setdefault(service, {"routes": {}})["routes"][route] = fig
        report.append({
            "start": start, "end": start + size,
            "minutes": len(flags),
            "availability": round(1 - sum(flags) / len(flags), 4) if flags else None,
            "services": services,
        })
    return report


def to_csv(report: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["start", "end", "service", "route", "requests", "error_rate", "p50_ms",
                     "p95_ms", "p99_ms", "availability", "top_clients"])
    for period in report:
        for service, data in period["services"].items():
            top = ";".join(f"{c['client']}={c['requests']}" for c in data.get("top_clients", []))
            writer.writerow([period["start"], period["end"], service, "*",
                             data.get("requests", 0), data.get("error_rate"),
                             data.get("p50_ms"), data.get("p95_ms"), data.get("p99_ms"),
                             period["availability"], top])
            for route, fig in data["routes"].items():
                writer.writerow([period["start"], period["end"], service, route,
                                 fig["requests"], fig["error_rate"], fig["p50_ms"],
                                 fig["p95_ms"], fig["p99_ms"], period["availability"], ""])
    return out.getvalue()
