"""The conformance suite (``lucid.conformance``) itself.

The default test run collects ``lucid/conformance`` (``testpaths``), so every built-in
plugin passes its contracts there. Here: the built-ins' configs cover every capability
and every built-in; a third-party plugin is tested with the one pytest line its author
runs (from a folder with no pytest config, so pytest-asyncio's strict mode); a broken
selector fails the selector contract and nothing else; a bad ``conformance.toml`` is an
error naming the key (the suite's conftest turns it into a usage error).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lucid.conformance.support import (
    CAPABILITY_HOOKS,
    ConformanceFileError,
    builtin_targets,
    load_target,
)
from lucid.testing_internal import builtin_plugins, lucid_env

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "conformance"


def test_the_builtins_cover_every_plugin_and_every_capability() -> None:
    targets = builtin_targets()
    assert sorted(t.plugin for t in targets) == [p.name for p in builtin_plugins()]
    assert set().union(*(t.capabilities for t in targets)) == set(CAPABILITY_HOOKS)
    by_plugin = {t.plugin: t.capabilities for t in targets}
    assert by_plugin["gateway"] == {"router", "registry", "admission"}
    assert by_plugin["circuitbreaker"] == {"failure"}


def run_suite(cwd: Path, *files: str) -> subprocess.CompletedProcess[str]:
    """The plugin author's line, run with the fixture plugins installed. Two pytest
    plugins of Lucid's own test dependencies that the suite does not use are left out:
    loading them costs seconds."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "lucid.conformance",
         *(f"--lucid-conformance={f}" for f in files),
         "-p", "no:cacheprovider", "-p", "no:schemathesis", "-p", "no:hypothesispytest",
         "-q", "-rA"],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=lucid_env(FIXTURE),
    )


def outcomes(output: str) -> dict[str, str]:
    """``test_module::test_name[plugin]`` -> PASSED / FAILED / ERROR, from ``-rA``."""
    found = re.findall(r"^(PASSED|FAILED|ERROR) (?:\S*/)?(test_\w+\.py::\S+)", output, re.M)
    return {test: outcome for outcome, test in found}


def test_third_party_plugins_pass_or_fail_their_contracts(tmp_path: Path) -> None:
    for name in ("keyguard", "spread", "sticky"):
        (tmp_path / f"{name}.toml").write_text((FIXTURE / f"{name}.toml").read_text())
    result = run_suite(tmp_path, "keyguard.toml", "spread.toml", "sticky.toml")
    seen = outcomes(result.stdout)
    failed = {test for test, outcome in seen.items() if outcome != "PASSED"}
    assert failed == {"test_selector.py::test_a_tried_instance_is_never_chosen_again[sticky]"}, (
        result.stdout[-4000:] + result.stderr[-2000:])
    assert "called http://127.0.0.1:" in result.stdout and "twice" in result.stdout
    # keyguard: admission and observer; the selectors: selector only (nothing skipped)
    assert sorted(seen) == sorted([
        "test_admission.py::test_the_admitted_request_reaches_the_upstream[keyguard]",
        "test_admission.py::test_the_refused_request_gets_the_plugins_rejection[keyguard]",
        "test_observer.py::test_every_exchange_is_observed_once_and_answered[keyguard]",
        "test_observer.py::test_events_are_observed_and_requests_keep_being_answered[keyguard]",
        *(f"test_selector.py::{test}[{plugin}]" for plugin in ("spread", "sticky")
          for test in ("test_choices_spread_over_the_instances",
                       "test_a_tried_instance_is_never_chosen_again")),
    ])
    assert result.returncode == 1
    assert "skipped" not in result.stdout


@pytest.mark.parametrize("table,problem", [
    ('[conformance]\nplugin = "nobody"', r"conformance\.plugin: 'nobody' is not an installed"),
    ('[conformance]\nplugin = "gateway"\ncapabilities = ["routing"]',
     r"conformance\.capabilities\.0: Input should be 'router'"),
    ('[conformance]\nplugin = "gateway"\nadmitted = { header = {} }',
     r"conformance\.admitted\.header: Extra inputs"),
    ('[conformance]\nplugin = "ratelimiter"',
     r"conformance\.admitted and conformance\.refused are required"),
    ('[gateway]\n', r"\[conformance\]: Input should be a valid dictionary"),
])
def test_a_bad_conformance_file_names_the_key(tmp_path: Path, table: str, problem: str) -> None:
    path = tmp_path / "conformance.toml"
    path.write_text(table)
    with pytest.raises(ConformanceFileError, match=problem):
        load_target(path)
