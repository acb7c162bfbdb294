"""Lucid's monitoring plugin: Prometheus metrics, alerts, dashboard, access logs, reports."""

LUCID_CAPABILITY = "monitoring"


class MonitoringPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY
