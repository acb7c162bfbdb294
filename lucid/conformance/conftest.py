"""Which plugins the suite tests (``--lucid-conformance=FILE``, else the built-ins) and
the ``harness`` fixture each contract test gets: a running gateway on the plugin's
config with two loopback upstreams and a spy (:mod:`lucid.conformance.support`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from lucid.conformance.support import (
    CAPABILITY_HOOKS,
    ConformanceFileError,
    Harness,
    Target,
    builtin_targets,
    load_target,
    running,
)

_TARGETS = pytest.StashKey[list[Target]]()
HERE = Path(__file__).parent


def targets(config: pytest.Config) -> list[Target]:
    """The plugins under test, read once per session."""
    if _TARGETS not in config.stash:
        paths = config.getoption("lucid_conformance", default=None) or []
        try:
            if paths:
                chosen = [load_target(config.invocation_params.dir / p) for p in paths]
                if len({t.plugin for t in chosen}) < len(chosen):
                    raise ConformanceFileError("two files name the same plugin")
                config.stash[_TARGETS] = chosen
            else:
                config.stash[_TARGETS] = builtin_targets()
        except ConformanceFileError as exc:
            raise pytest.UsageError(f"lucid conformance: {exc}") from None
    return config.stash[_TARGETS]


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A capability no plugin under test has is not collected (rather than skipped)."""
    if collection_path.parent == HERE and collection_path.name.startswith("test_"):
        capability = collection_path.stem.removeprefix("test_")
        if capability in CAPABILITY_HOOKS and not any(
                capability in t.capabilities for t in targets(config)):
            return True
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each contract test runs once per plugin under test with its module's capability."""
    if "target" in metafunc.fixturenames:
        capability = metafunc.module.CAPABILITY
        chosen = [t for t in targets(metafunc.config) if capability in t.capabilities]
        metafunc.parametrize("target", chosen, ids=[t.plugin for t in chosen])


@pytest_asyncio.fixture
async def harness(target: Target, tmp_path: Path) -> AsyncIterator[Harness]:
    """A gateway running ``target`` with two loopback upstreams and the spy."""
    async with running(target, tmp_path) as harness:
        yield harness
