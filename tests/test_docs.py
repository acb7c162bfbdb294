"""Every code block in ``docs/*.md`` runs here, so the docs cannot drift from the code.

The convention, stated for authors in ``docs/plugin_hooks.md`` ("How this page is
tested"): a comment on the line before a block says what it is.

* ``<!-- example: NAME file: PATH -->``: the block is the file ``PATH`` of the example
  project ``NAME`` (one per page and name). The project is written to a temporary
  folder; its ``pyproject.toml`` entry points become a real installed distribution;
  its modules are imported; its ``cluster.toml`` passes ``lucid check`` with the
  plugin installed; its ``test_*.py`` files pass pytest in a subprocess.
* ``<!-- not-run: REASON -->``: not run; the reason must say why.

An unmarked block is run as its language says (python executed, toml validated as a
``cluster.toml`` or parsed as a ``pyproject.toml`` fragment, json parsed, sh lines
checked to be ``lucid`` commands and options that exist); any other unmarked block
fails. The pages are globbed, so a page added later is covered too.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from lucid.conformance.support import ConformanceTable
from lucid.testing import write_config
from lucid.testing_internal import lucid_env, run_lucid

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^<!--\s*(?P<body>.*?)\s*-->$")
EXAMPLE = re.compile(r"^example:\s*(?P<name>[\w.-]+)\s+file:\s*(?P<path>[\w./-]+)$")
NOT_RUN = re.compile(r"^not-run:\s*(?P<reason>.+)$")
PYPROJECT_TABLES = {"project", "tool", "build-system"}


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    lang: str
    text: str
    marker: str

    @property
    def where(self) -> str:
        return f"{self.doc.name}:{self.line}"


def read_blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of a page, each with the comment on the line before it."""
    lines = doc.read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith(opening["fence"]):
            end += 1
        before = index - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marked = MARKER.match(lines[before].strip()) if before >= 0 else None
        found.append(Block(doc, index + 1, opening["lang"].lower(),
                           "\n".join(lines[index + 1:end]) + "\n",
                           marked["body"] if marked else ""))
        index = end + 1
    return found


BLOCKS = [b for doc in sorted(DOCS.glob("*.md")) for b in read_blocks(doc)]
EXAMPLES: dict[tuple[str, str], dict[str, Block]] = {}
for _block in BLOCKS:
    if (_m := EXAMPLE.match(_block.marker)) is not None:
        EXAMPLES.setdefault((_block.doc.name, _m["name"]), {})[_m["path"]] = _block
SINGLE = [b for b in BLOCKS if not EXAMPLE.match(b.marker)]


def test_the_docs_have_runnable_blocks() -> None:
    """The glob finds the pages, and the plugin guide's complete example is there."""
    assert (DOCS / "plugin_hooks.md").exists()
    maintenance = EXAMPLES[("plugin_hooks.md", "maintenance")]
    assert {"pyproject.toml", "maintenance.py", "test_maintenance.py",
            "cluster.toml"} <= set(maintenance)
    for block in BLOCKS:
        marker = block.marker
        assert not marker or EXAMPLE.match(marker) or NOT_RUN.match(marker), (
            f"{block.where}: unknown marker <!-- {marker} -->")


@pytest.mark.parametrize("block", SINGLE, ids=[b.where for b in SINGLE])
def test_block_runs(block: Block, tmp_path: Path) -> None:
    if (reason := NOT_RUN.match(block.marker)) is not None:
        assert len(reason["reason"].split()) >= 3, f"{block.where}: say why it is not run"
        return
    if block.lang == "python":
        run_python(block, ["-c", block.text], tmp_path)
    elif block.lang == "toml":
        check_toml(block, tmp_path)
    elif block.lang == "json":
        json.loads(block.text)
    elif block.lang in ("sh", "shell", "bash", "console"):
        check_shell(block)
    else:
        pytest.fail(f"{block.where}: a {block.lang or 'plain'} block cannot run; mark it "
                    "<!-- not-run: why --> or <!-- example: NAME file: PATH -->")


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=[f"{d}:{n}" for d, n in sorted(EXAMPLES)])
def test_example_project_runs(key: tuple[str, str], tmp_path: Path) -> None:
    files = EXAMPLES[key]
    project = tmp_path / key[1]
    for path, block in files.items():
        target = project / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text)
    if "pyproject.toml" in files:
        install_entry_points(project, tomllib.loads(files["pyproject.toml"].text))
    modules = [path.removesuffix(".py").replace("/", ".") for path in files
               if path.endswith(".py") and not Path(path).name.startswith("test_")]
    if modules:
        imports = "\n".join(f"import {m}" for m in modules)
        run_python(files[f"{modules[0].replace('.', '/')}.py"], ["-c", imports], project)
    if "cluster.toml" in files:
        config = write_config(files["cluster.toml"].text, tmp_path / "check")
        checked = run_lucid("check", "--config", str(config), installed=(project,))
        assert checked.returncode == 0, f"{files['cluster.toml'].where}:\n{checked.stderr}"
    if any(Path(path).name.startswith("test_") for path in files):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
            capture_output=True, text=True, timeout=300, cwd=project, env=lucid_env(project))
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        assert result.returncode == 0, f"{key}:\n{result.stdout}\n{result.stderr}"
        assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary


def install_entry_points(project: Path, pyproject: dict[str, object]) -> None:
    """The ``[project.entry-points.lucid]`` table as an installed distribution in
    ``project`` (a ``.dist-info`` beside the modules), as ``pip install`` would make it."""
    meta = pyproject.get("project")
    assert isinstance(meta, dict), "an example's pyproject.toml needs [project]"
    name = str(meta["name"])
    group = meta.get("entry-points", {}).get("lucid", {})
    assert group, "an example's pyproject.toml declares [project.entry-points.lucid]"
    info = project / f"{name.replace('-', '_')}-{meta.get('version', '0')}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {meta.get('version', '0')}\n")
    (info / "entry_points.txt").write_text(
        "[lucid]\n" + "".join(f"{k} = {v}\n" for k, v in group.items()))


def run_python(block: Block, args: list[str], cwd: Path) -> None:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            timeout=120, cwd=cwd, env=lucid_env(cwd))
    assert result.returncode == 0, f"{block.where}:\n{result.stderr}"


def check_toml(block: Block, tmp_path: Path) -> None:
    """A ``pyproject.toml`` fragment parses; a ``conformance.toml`` has a valid
    ``[conformance]`` table (the plugin it names is not installed here; the rest of
    the file is checked by ``tests/test_docs_testing.py``); anything else is a
    ``cluster.toml`` the built-in plugins accept."""
    data = tomllib.loads(block.text)
    if set(data) & PYPROJECT_TABLES:
        return
    if "conformance" in data:
        ConformanceTable.model_validate(data["conformance"])
        return
    config = write_config(data, tmp_path)
    checked = run_lucid("check", "--config", str(config))
    assert checked.returncode == 0, f"{block.where}:\n{checked.stderr}"


def check_shell(block: Block) -> None:
    """Each command is a ``lucid`` command whose subcommand and options exist, or runs
    pytest; anything else needs a marker."""
    for line in block.text.splitlines():
        line = line.strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        if words[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]) or (
                words[:1] == ["pytest"]):
            continue
        assert words[0] == "lucid", (
            f"{block.where}: {line!r} is not a lucid command; mark the block "
            "<!-- not-run: why -->")
        command = [w for w in words[1:] if not w.startswith("-")][:2]
        for depth in (2, 1):  # `lucid config export`, else `lucid serve`
            helped = run_lucid(*command[:depth], "--help")
            if helped.returncode == 0:
                break
        assert helped.returncode == 0, f"{block.where}: no command `lucid {command[0]}`"
        for option in (w.split("=")[0] for w in words if w.startswith("-")):
            assert option in helped.stdout, f"{block.where}: `{line}` has no {option}"


def test_an_unmarked_block_that_does_not_run_fails(tmp_path: Path) -> None:
    """The checks refuse what would not run: a shell line that is not Lucid's, an
    option a command lacks, a config section nobody defines, a block of no language;
    a not-run marker needs its reason."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```sh", "curl http://127.0.0.1:8080/", "```",
        "```sh", "lucid config export --no-such-option", "```",
        "```toml", "[nosuchplugin]", "x = 1", "```",
        "```", "plain text", "```",
        "<!-- not-run: no -->", "```python", "raise SystemExit(1)", "```",
        "<!-- not-run: it needs a Redis server -->", "```python", "raise SystemExit(1)", "```",
    ]) + "\n")
    curl, option, toml, plain, unexplained, explained = read_blocks(page)
    for block in (curl, option, toml, unexplained):
        with pytest.raises(AssertionError):
            test_block_runs(block, tmp_path / str(block.line))
    with pytest.raises(pytest.fail.Exception, match="mark it"):
        test_block_runs(plain, tmp_path)
    test_block_runs(explained, tmp_path)  # skipped with its reason, nothing raised
