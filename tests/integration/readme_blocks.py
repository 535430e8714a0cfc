"""The README's fenced code blocks, found by the heading they sit under, for the tests that run them.

Why a parser rather than a regular expression: a ``#`` comment inside a shell block looks like a
heading to a regex, and a block added to a section must not shift what the tests run. Headings count
only outside fences; a block belongs to the nearest heading above it (of any level), and blocks are
numbered from 1 within their section, so ``sh_block("## Fine-tuning", 2)`` stays the same block when
another section gains one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    heading: str  # the heading line as written, e.g. "## Try it with curl"
    number: int  # 1-based among this section's blocks of the same language
    language: str  # the fence's info string ("sh", "yaml", "" for none)
    text: str
    line: int  # where the block's first line is in the file (1-based), for error messages


def blocks(path: Path = README) -> list[Block]:
    """Every fenced block of ``path`` with its section heading, in file order."""
    found: list[Block] = []
    heading = ""
    counts: dict[tuple[str, str], int] = {}
    fence: str | None = None
    language = ""
    body: list[str] = []
    start = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if fence is None:
            opened = _FENCE.match(line)
            if opened:
                fence, language, body, start = opened.group(1), opened.group(2), [], number + 1
            elif line.startswith("#") and re.match(r"^#{1,6} ", line):
                heading = line.strip()
        elif _closes(line, fence):
            key = (heading, language)
            counts[key] = counts.get(key, 0) + 1
            found.append(Block(heading, counts[key], language, "\n".join(body) + "\n", start))
            fence = None
        else:
            body.append(line)
    return found


def _closes(line: str, fence: str) -> bool:
    """A closing fence: only the opening fence's character, at least as many of them (CommonMark)."""
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def sh_blocks(heading: str, path: Path = README) -> list[Block]:
    """The ``sh`` blocks directly under ``heading`` (the heading line exactly, e.g. ``"## Fine-tuning"``)."""
    return [block for block in blocks(path) if block.heading == heading and block.language == "sh"]


def sh_block(heading: str, number: int = 1, path: Path = README) -> Block:
    """The ``number``-th ``sh`` block under ``heading``; an AssertionError saying what is there if none."""
    under = sh_blocks(heading, path)
    assert len(under) >= number, f"{path.name} has {len(under)} sh block(s) under {heading!r}, not {number}"
    return under[number - 1]
