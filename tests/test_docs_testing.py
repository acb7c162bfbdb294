"""``docs/testing.md`` runs: its pytest setup block is the configuration its Python
blocks (complete test modules) run under, in a project of their own; its
``conformance.toml`` block loads, and its ``[conformance]`` table is valid."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from lucid.conformance.support import ConformanceTable
from lucid.testing_internal import lucid_env

DOC = Path(__file__).resolve().parents[1] / "docs" / "testing.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def blocks(language: str) -> list[str]:
    return [text for lang, text in BLOCK.findall(DOC.read_text()) if lang == language]


def test_every_block_is_python_or_toml() -> None:
    assert {lang for lang, _ in BLOCK.findall(DOC.read_text())} == {"python", "toml"}


def test_the_toml_blocks_load_and_the_conformance_table_is_valid() -> None:
    setup, conformance = (tomllib.loads(text) for text in blocks("toml"))
    assert setup["tool"]["pytest"]["ini_options"]["asyncio_mode"] == "auto"
    table = ConformanceTable.model_validate(conformance.pop("conformance"))
    assert (table.plugin, table.admitted and table.admitted.headers) == (
        "apikey", {"x-api-key": "demo-key"})
    assert conformance["gateway"]["services"]["conformance"]["instances"] == [
        "{upstream}", "{upstream2}"]


def test_the_python_blocks_pass_as_a_plugin_authors_tests(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(blocks("toml")[0])
    modules = blocks("python")
    assert len(modules) == 2
    for n, text in enumerate(modules):
        (tmp_path / f"test_doc_block_{n}.py").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "no:schemathesis", "-p", "no:hypothesispytest", "-W", "error"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=lucid_env(),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(modules)} passed" in result.stdout
