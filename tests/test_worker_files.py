"""What a proxy worker other than worker 0 opens: it serves no admin API, so it keeps
no audit log (``audit.db`` is worker 0's alone)."""

from __future__ import annotations

from lucid.runtime import Runtime, load_plugins_and_config
from lucid.testing import write_config


async def test_a_worker_without_the_admin_api_opens_no_audit_log(tmp_path):
    path = write_config("", tmp_path)
    plugin_set, config = load_plugins_and_config(path)
    runtime = Runtime(plugin_set, config, path)
    runtime.worker_index = 1
    await runtime.start()
    try:
        assert runtime.audit is None
        assert (runtime.data_dir / "definitions.db").exists()  # it did start
        assert not (runtime.data_dir / "audit.db").exists()
    finally:
        await runtime.stop()
    first = Runtime(plugin_set, config, path)  # worker 0 does keep it
    await first.start()
    try:
        assert first.audit is not None
        assert (first.data_dir / "audit.db").exists()
    finally:
        await first.stop()
