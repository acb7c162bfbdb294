"""A private redis-server per test, for cluster scope (lucid.testing_redis)."""

from lucid.testing_redis import lucid_redis  # noqa: F401
