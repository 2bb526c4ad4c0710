"""README.md's code blocks run as printed.

Every fenced block of README.md is either a ```python block, which runs here, or carries
``<!-- not run: REASON -->`` (an HTML comment, one or more lines) ending on the line right before its
fence. A python block with ``<!-- continues -->`` right before its fence runs after the block before
it, in the same namespace;
any other python block starts a group of its own. Each group runs in a fresh interpreter (as a
reader would paste it into one), as ``__main__``, with the current directory a temporary folder, so
``./unison-runs`` goes there; a failure names the README line of the block that raised.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(not run:\s*\S.*?|continues)\s*-->$", re.DOTALL)
GROUP_TIMEOUT_S = 240

# Runs the blocks given as JSON ([[line, source], ...]) in one namespace; a failure exits with 1 after
# printing the line of the block that raised (its traceback names "README.md line N" too).
RUNNER = """
import json, sys, traceback
blocks = json.loads(sys.argv[1])
namespace = {"__name__": "__main__"}
for line, source in blocks:
    try:
        exec(compile(source, f"README.md line {line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"README_BLOCK_FAILED {line}", file=sys.stderr)
        sys.exit(1)
"""


@dataclass
class Block:
    line: int  # the line of the opening fence, 1-based
    lang: str
    source: str
    marker: str | None  # "continues", "not run: ...", or None


def parse(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, each with the marker comment right before its fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md line {start + 1}: a code block that never closes")
        before = MARKER.match(comment_before(lines, start))
        blocks.append(Block(start + 1, opening.group(1), "\n".join(lines[start + 1 : i]) + "\n",
                            before.group(1) if before else None))
        i += 1
    return blocks


def comment_before(lines: list[str], fence: int) -> str:
    """The HTML comment (possibly over several lines) that ends on the line right before ``fence``."""
    end = fence - 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return ""
    first = end
    while first > 0 and "<!--" not in lines[first]:
        first -= 1
    return " ".join(line.strip() for line in lines[first : end + 1])


def groups(blocks: list[Block]) -> list[list[Block]]:
    """The python blocks to run, grouped: a ``continues`` block joins the group of the block before it."""
    result: list[list[Block]] = []
    previous_ran = False
    for block in blocks:
        if block.marker and block.marker.startswith("not run:"):
            previous_ran = False
            continue
        if block.lang != "python":
            raise AssertionError(
                f"README.md line {block.line}: a ```{block.lang} block without <!-- not run: REASON -->; "
                "make it a python block that runs, or say why it cannot")
        if block.marker == "continues":
            if not previous_ran:
                raise AssertionError(
                    f"README.md line {block.line}: <!-- continues --> follows no python block that runs")
            result[-1].append(block)
        else:
            result.append([block])
        previous_ran = True
    return result


def run_group(group: list[Block], cwd: Path, timeout: float = GROUP_TIMEOUT_S) -> None:
    """Run one group in a fresh interpreter in ``cwd``; fail naming the README line that failed."""
    payload = json.dumps([[block.line, block.source] for block in group])
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}  # Spark's Python workers: this interpreter
    try:
        done = subprocess.run([sys.executable, "-c", RUNNER, payload], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        lines = ", ".join(str(block.line) for block in group)
        raise AssertionError(f"README.md blocks at lines {lines} ran past {timeout} s") from e
    if done.returncode != 0:
        failed = re.findall(r"README_BLOCK_FAILED (\d+)", done.stderr)
        where = f"line {failed[-1]}" if failed else f"the group starting at line {group[0].line}"
        raise AssertionError(f"README.md code block at {where} failed (exit {done.returncode}):\n"
                             f"{done.stderr[-6000:]}")


README_GROUPS = groups(parse(README.read_text(encoding="utf-8")))


@pytest.mark.parametrize("group", README_GROUPS, ids=[f"line-{g[0].line}" for g in README_GROUPS])
def test_readme_block_runs(group: list[Block], tmp_path: Path) -> None:
    run_group(group, tmp_path)


def test_readme_has_python_blocks_to_run() -> None:
    assert sum(len(g) for g in README_GROUPS) >= 5


SAMPLE = """# sample

```python
x = 1
```

<!-- continues -->
```python
assert x == 1
y = undefined_name
```

<!-- not run: a synopsis
     over two lines -->
```bash
tool --flag
```

```python
assert "x" not in globals()   # a fresh namespace
```
"""


def test_a_broken_block_fails_naming_its_line(tmp_path: Path) -> None:
    parsed = groups(parse(SAMPLE))
    assert [[b.line for b in g] for g in parsed] == [[3, 8], [19]]
    with pytest.raises(AssertionError, match=r"code block at line 8 failed[\s\S]*undefined_name"):
        run_group(parsed[0], tmp_path)
    run_group(parsed[1], tmp_path)


def test_an_unmarked_shell_block_is_an_error() -> None:
    with pytest.raises(AssertionError, match="line 1: a ```bash block without"):
        groups(parse("```bash\nls\n```\n"))
