"""Lucid's rate limiter plugin: token bucket, sliding and fixed windows, quotas, headers."""

LUCID_CAPABILITY = "ratelimiter"


class RateLimiterPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY
