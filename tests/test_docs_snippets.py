"""Every ```python block of README.md and docs/*.md runs as it is written.

Each block runs alone in a fresh interpreter (a subprocess, repository root as the working folder,
CPU only), so a block cannot lean on names defined by an earlier one. Test ids are
``<file>:<n>``: the n-th ``python`` block of the file, counted from 1 (the failure message gives the
line). A block that imports an optional package (diffusers, matplotlib, ...) is skipped with the
reason when that package is missing, and only then. Blocks that are not meant to run (signatures,
shell commands, multi-process ``torchrun`` examples) are fenced as ``text`` or ``bash``, not
``python``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Packages a block may need that the test environment may lack: skip (with the reason) when missing.
OPTIONAL = ("diffusers", "matplotlib", "natten", "nuwa_pytorch", "triton")

_OPEN = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")


class Block(NamedTuple):
    file: str  # relative to the repository root
    index: int  # 1-based among the file's python blocks
    line: int  # 1-based line of the opening fence
    code: str


def python_blocks(path: Path) -> List[Block]:
    """The ```python blocks of a Markdown file (indented fences too, their indent removed)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: List[Block] = []
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m.group("indent"), i + 1
        j = start
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.name}:{start}: unclosed ```python block")
        body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[start:j]]
        out.append(Block(str(path.relative_to(ROOT)), len(out) + 1, start, "\n".join(body) + "\n"))
        i = j + 1
    return out


BLOCKS = [b for f in DOC_FILES for b in python_blocks(f)]


def _needs(code: str) -> List[str]:
    found = []
    for mod in OPTIONAL:
        if re.search(rf"^\s*(import|from)\s+{mod}\b|^\s*import\s+.*\b{mod}\b", code, re.M) or re.search(
            rf"from\s+\S*integrations\.{mod}\b", code
        ):
            found.append(mod)
    return found


def test_blocks_found():
    """The extractor sees the documentation's examples (README has some)."""
    assert any(b.file == "README.md" for b in BLOCKS)
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.file}:{b.index}" for b in BLOCKS])
def test_python_block_runs(block: Block, tmp_path):
    for mod in _needs(block.code):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{block.file}:{block.index} needs {mod}, which is not installed")
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        CUDA_VISIBLE_DEVICES="",  # the docs' examples run on the CPU
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        MPLBACKEND="Agg",
    )
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        numbered = "\n".join(f"{n:4d}  {ln}" for n, ln in enumerate(block.code.splitlines(), 1))
        pytest.fail(
            f"{block.file}:{block.index} (the ```python block at line {block.line}) exited with "
            f"{proc.returncode}\n--- code\n{numbered}\n--- stderr (tail)\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
