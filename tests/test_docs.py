"""The documentation's code runs: README.md and docs/*.md.

* Every fenced ```python block is executed, each in a fresh namespace and in its own temporary
  working directory (the blocks use the built-in digits model and small sizes, so each takes
  seconds on a CPU).
* Every command in a fenced ```bash block that runs ``advfast`` (a line starting with ``advfast``,
  a segment of an ``&&`` chain, or ``torchrun ... -m advfast``) is parsed by
  ``advfast.cli.build_parser()`` without running it; a block preceded by ``<!-- run -->`` is also
  run, through ``advfast.cli.main``, in a temporary directory.
* A block that is a fragment says so, and only that excludes it: the fence info string
  (```python fragment) or an HTML comment ``<!-- fragment -->`` on the line before the fence.
* Every relative link (figures included) points at a file that exists, and every ``#anchor`` at a
  heading of the page it names.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*(.*)$")
MARK = re.compile(r"^\s*<!--\s*([\w-]+)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int           # 1-based line of the opening fence
    lang: str
    flags: set[str]     # words after the language, and the mark on the line before
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        words = info.split()
        lang = words[0].lower() if words else ""
        flags = set(words[1:])
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(before)
        if mark:
            flags.add(mark.group(1))
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[:3]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        found.append(Block(page, i + 1, lang, flags, "\n".join(body) + "\n"))
        i = j + 1
    return found


BLOCKS = [b for page in PAGES for b in blocks_of(page)]
PYTHON = [b for b in BLOCKS if b.lang in ("python", "py") and "fragment" not in b.flags]
BASH = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell") and "fragment" not in b.flags]


def advfast_commands(code: str) -> list[list[str]]:
    """The argument lists of every advfast invocation in a shell block (without 'advfast')."""
    logical, pending = [], ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        logical.append(pending + raw)
        pending = ""
    if pending:
        logical.append(pending)
    commands = []
    for line in logical:
        tokens = shlex.split(line, comments=True)
        segment: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", "||", ";", "|"):
                if segment and segment[0] == "advfast":
                    commands.append(segment[1:])
                elif "-m" in segment and segment[segment.index("-m") + 1:][:1] == ["advfast"]:
                    commands.append(segment[segment.index("-m") + 2:])
                segment = []
            else:
                segment.append(token)
    return commands


def test_the_pages_have_code():
    """The extraction finds the blocks (a broken fence parser would pass everything)."""
    assert (ROOT / "README.md").is_file()
    assert len(PYTHON) >= 5, [b.id for b in PYTHON]
    assert sum(len(advfast_commands(b.code)) for b in BASH) >= 5


def test_only_marked_fragments_are_excluded(tmp_path):
    """The two marks exclude a block; nothing else does."""
    page = tmp_path / "page.md"
    page.write_text("```python\nran = 1\n```\n\n```python fragment\nnot run\n```\n\n"
                    "<!-- fragment -->\n```python\nnot run either\n```\n\n<!-- run -->\n"
                    "```bash\nadvfast toy --grid 3 \\\n    --seed 1 && echo done\n```\n",
                    encoding="utf-8")
    found = blocks_of(page)
    assert [(b.lang, "fragment" in b.flags) for b in found] == [
        ("python", False), ("python", True), ("python", True), ("bash", False)]
    assert "run" in found[3].flags
    assert advfast_commands(found[3].code) == [["toy", "--grid", "3", "--seed", "1"]]


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__", "__file__": str(tmp_path / "block.py")}
    code = compile(block.code, block.id, "exec")
    exec(code, namespace)  # noqa: S102 - the documentation's own examples


@pytest.mark.parametrize("block", BASH, ids=lambda b: b.id)
def test_bash_block_parses(block, tmp_path, monkeypatch):
    from advfast.cli import build_parser, main

    commands = advfast_commands(block.code)
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as stop:
            assert stop.code == 0, f"{block.id}: `advfast {shlex.join(argv)}` does not parse"
    if "run" in block.flags:
        assert commands, f"{block.id} is marked run but holds no advfast command"
        monkeypatch.chdir(tmp_path)
        for argv in commands:
            assert main(argv) == 0, f"{block.id}: `advfast {shlex.join(argv)}` failed"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            bad.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
            bad.append(f"{target}: no heading #{anchor}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)
