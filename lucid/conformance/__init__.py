"""The conformance suite: the contract every implementation of a capability must pass.

Run it against your plugin with one line, from your project::

    python -m pytest --pyargs lucid.conformance --lucid-conformance=tests/conformance.toml

and without ``--lucid-conformance`` against Lucid's built-in plugins (the configs in
``lucid/conformance/builtins/``). One test module per capability (``test_router``,
``test_registry``, ``test_selector``, ``test_admission``, ``test_failure``,
``test_observer``); each runs once per plugin under test that has the capability.
Everything goes through a real gateway, two loopback upstreams and a real client,
with only the public kit (:mod:`lucid.testing`). ``docs/testing.md`` describes the
``conformance.toml`` file; :mod:`lucid.conformance.support` reads it.
"""
