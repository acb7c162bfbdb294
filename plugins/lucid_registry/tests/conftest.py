"""A private redis-server per test, for the registry in cluster mode."""

from lucid.testing_redis import lucid_redis  # noqa: F401
