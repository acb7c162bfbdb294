"""Lucid's own tests use the same fixtures plugin authors get from ``lucid.testing``."""

import os

import pytest


@pytest.fixture(autouse=True)
def no_lucid_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LUCID_*`` overrides from the shell running the tests must not leak into them
    (gateway subprocesses inherit the environment)."""
    for name in list(os.environ):
        if name.upper().startswith("LUCID_"):
            monkeypatch.delenv(name)
