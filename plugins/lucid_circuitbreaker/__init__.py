"""Lucid's circuit breaker plugin: states, sliding windows, slow calls, fallbacks, ejection."""

LUCID_CAPABILITY = "circuitbreaker"


class CircuitBreakerPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY
