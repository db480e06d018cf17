"""Markdown wrapped to the 120 columns of the rendered pages, never starting a new block by accident."""

from __future__ import annotations

import re
import textwrap

WIDTH = 120

# A wrapped line must not start with what would turn it into a list item, heading, quote, table row, HTML block,
# code fence or setext underline.
_BLOCK_START = re.compile(r"([-+*]|\d+[.)])(\s|$)|[#>|<]|```|~~~|[-=]+\s*$")


def wrap_line(line: str) -> list[str]:
    """One Markdown line as lines of at most WIDTH characters (a word longer than that keeps its own line); a line
    that starts with something Markdown would read as a new block takes the word before it along."""
    lines = textwrap.wrap(line, width=WIDTH, break_long_words=False, break_on_hyphens=False) or [line]
    i = 1
    while i < len(lines):
        head, _, last = lines[i - 1].rpartition(" ")
        if _BLOCK_START.match(lines[i]) and head:
            lines[i - 1:] = [head] + textwrap.wrap(f"{last} {' '.join(lines[i:])}", width=WIDTH,
                                                   break_long_words=False, break_on_hyphens=False)
        else:
            i += 1
    return lines


def wrap_markdown(text: str) -> str:
    """Every line over WIDTH characters wrapped, except table rows (they cannot wrap)."""
    out = []
    for line in text.split("\n"):
        out.extend([line] if len(line) <= WIDTH or line.startswith("|") else wrap_line(line))
    return "\n".join(out)
