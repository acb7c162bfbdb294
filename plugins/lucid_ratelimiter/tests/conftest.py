"""Fixtures of the rate limiter's tests."""

# A private redis-server per test, for limits counted in Redis (lucid.testing_redis).
from lucid.testing_redis import lucid_redis  # noqa: F401
