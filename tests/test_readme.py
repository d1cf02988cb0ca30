"""Every ```bash and ```python block of README.md and docs/*.md runs verbatim, as a new user would run it.

A block preceded by the HTML comment ``<!-- evefx: slow -->`` is too slow for CI (training runs,
benchmarks, installs) and is only checked for being well formed; lines starting with ``make`` are
skipped (``make test`` is what runs this). Blocks run in a scratch folder that looks like a fresh
clone after ``make``: the repository's tracked top-level entries are linked into it, and
``.venv/bin/python`` / ``.venv/bin/evefx`` are small scripts that start the interpreter running the
tests, so what the blocks write (``demo.onnx``, ``report.json``, ``out/``) lands in the scratch folder.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SLOW = "<!-- evefx: slow -->"
_FENCE = re.compile(r"^```(\w+)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    slow: bool

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced ``bash``/``python`` blocks of ``path``, with the slow marker of the line above each."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        if lang in ("bash", "python"):
            out.append(Block(path, start + 1, lang, "\n".join(lines[start + 1:end]) + "\n", above == SLOW))
        i = end + 1
    return out


ALL = [b for path in DOCS for b in blocks(path)]

# blocks that fail for a reason filed elsewhere: ``{block id prefix: reason}``; they run, and pass or xfail
KNOWN: dict[str, str] = {}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A scratch folder that looks like the repository after ``make``: its tracked entries, and .venv/bin."""
    root = tmp_path_factory.mktemp("clone")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for top in sorted({t.split("/")[0] for t in tracked}):
        (root / top).symlink_to(ROOT / top)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, command in (("python", f'exec {shlex.quote(sys.executable)} "$@"'),
                          ("evefx", f'exec {shlex.quote(sys.executable)} -m evefx "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{command}\n")
        (bin_dir / name).chmod(0o755)
    return root


def _env(clone: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="120", PYTHONPATH=str(clone))
    return env


def test_the_docs_have_blocks_and_markers_where_needed():
    assert len(ALL) >= 10
    for b in ALL:
        if b.lang == "python":
            ast.parse(b.code)  # even slow blocks are valid Python
        text = b.code
        if any(w in text for w in ("bench/", "examples/quantization.py", "examples/spiking.py", "examples/pruning.py",
                                   "examples/search.py", "evefx demo", "evefx search", "pip install")):
            assert b.slow, f"{b.id} runs for minutes: mark it {SLOW}"
        assert not re.search(r"(^|\s)evefx (validate|schema|transform|inspect|export|search|demo)\b", text) or \
            ".venv/bin/evefx" in text or b.path.name == "search.md", \
            f"{b.id}: a bare `evefx` is not on PATH after `make`; write .venv/bin/evefx"


@pytest.mark.parametrize("block", [b for b in ALL if not b.slow], ids=lambda b: b.id)
def test_block_runs_verbatim(block: Block, clone: Path):
    if block.lang == "bash":
        code = "set -e\n" + "\n".join(line for line in block.code.splitlines() if not line.lstrip().startswith("make "))
        argv = ["bash", "-c", code]
    else:
        argv = [str(clone / ".venv" / "bin" / "python"), "-c", block.code]
    proc = subprocess.run(argv, cwd=clone, env=_env(clone), capture_output=True, text=True, timeout=300)
    known = next((why for prefix, why in KNOWN.items() if block.id.startswith(prefix)), None)
    if known and proc.returncode != 0 and "ExportError" in proc.stderr:
        pytest.xfail(known)
    assert proc.returncode == 0, f"{block.id} failed:\n{block.code}\n--- stderr\n{proc.stderr[-3000:]}\n--- stdout\n{proc.stdout[-2000:]}"
