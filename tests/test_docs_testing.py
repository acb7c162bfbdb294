"""``docs/testing.md`` runs: its Python blocks are complete test modules that pass
with the kit's fixtures; its TOML blocks load (the pytest setup, and a
``conformance.toml`` whose ``[conformance]`` table is valid)."""

from __future__ import annotations

import importlib.util
import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from lucid.conformance.support import ConformanceTable

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


@pytest.mark.parametrize("index", [0, 1])
async def test_the_python_blocks_pass_as_a_plugin_authors_tests(
    index: int, tmp_path: Path, lucid_upstream: Any, lucid_gateway: Any,
) -> None:
    """Each block is a complete test module: imported, its tests are called with the
    kit's fixtures they name (in this test's event loop, as pytest would)."""
    modules = blocks("python")
    assert len(modules) == 2
    path = tmp_path / f"test_doc_block_{index}.py"
    path.write_text(modules[index])
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [f for name, f in vars(module).items() if name.startswith("test_")]
    assert tests
    for test in tests:
        kit = {"lucid_upstream": lucid_upstream, "lucid_gateway": lucid_gateway}
        fixtures = {n: kit[n] for n in inspect.signature(test).parameters}
        await test(**fixtures)
