"""Fuzz the admin API from its own OpenAPI document with schemathesis: every operation
of every built-in plugin, against a real ``lucid serve`` with an admin secret and an
admin token (so writes get past authentication and do run), zero 5xx.

Bounded for CI: a fixed number of examples per operation, derandomized (the same
cases every run, so a failure reproduces), no shrinking database. Each operation gets
valid cases aimed at objects that exist (so a PUT replaces, a DELETE deletes), valid
cases with generated path parameters, and invalid ("negative") cases.
"""

from __future__ import annotations

import re
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

EXAMPLES = 40  # per operation, ~60 operations: ~15 s on two cores
# Server-sent event streams never end, so there is no response to check: the registry's
# ``events`` endpoints are left out (their query parsing is shared with the blocking
# queries, which are fuzzed, with ``max_wait`` cut so a generated ``wait`` is short).
STREAMS = re.compile(r"/events$")


def test_the_admin_api_answers_no_5xx_to_generated_requests(
        lucid_process: Any, every_plugin: Any) -> None:
    text, token, created, parameters = every_plugin
    process = lucid_process(text + '\n[registry]\nmax_wait = "100ms"\n')
    base = process.admin_url
    auth = {"Authorization": f"Bearer {token}"}
    session = requests.Session()
    for path, body in created:
        assert session.post(base + path, json=body, headers=auth, timeout=30).status_code == 201
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", timeout=30)
    failures: list[str] = []
    operations = 0
    # deletions last, so the updates before them find the objects to update
    ordered = sorted((result.ok() for result in schema.get_all_operations()),
                     key=lambda operation: operation.method.upper() == "DELETE")
    for operation in ordered:
        if STREAMS.search(operation.path):
            continue
        operations += 1
        names = re.findall(r"\{(\w+)\}", operation.path)
        existing = {name: parameters[name] for name in names if name in parameters}
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE, path_parameters=existing),
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE))

        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                             database=None, phases=[hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=strategy)
        def run(case: Any) -> None:
            response = case.call(base_url=base, session=session, headers=auth, timeout=30)
            case.validate_response(response, checks=[not_a_server_error])

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis: a FailureGroup
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert operations >= 50, operations
    assert not failures, "\n\n".join(failures)
    assert "Traceback" not in process.output
