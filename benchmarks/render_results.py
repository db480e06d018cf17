"""Render the measured results from the committed result files (numbers are never typed by hand).

Every result file under benchmarks/results/ and dit_sparse/zoo/results/ is rendered, with its command, hardware and
versions, into docs/results.md between its markers (wrapped to 120 columns outside tables); README.md gets a headline
table per hardware between its headline markers, from the files named in HEADLINES.

    python benchmarks/render_results.py          # rewrite docs/results.md and the README headline
    python benchmarks/render_results.py --check  # exit 1, naming the file, if either is not what the files give
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root, appended, makes `benchmarks` importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown_wrap import wrap_markdown
from benchmarks.results_headline import render_headline
from benchmarks.results_sections import ROOT, render

RESULTS_PAGE = Path("docs") / "results.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"
RESULTS_PAGE_TEMPLATE = f"""# Measured results

Rendered by `python benchmarks/render_results.py` from the files in `benchmarks/results/` and
`dit_sparse/zoo/results/`; a test (`tests/test_results_render.py`) checks that re-rendering reproduces this page.

{START}
{END}
"""


def _fill(text: str, start: str, end: str, body: str, name: str) -> str:
    """text with body between the markers start and end."""
    if start not in text or end not in text:
        raise SystemExit(f"{name} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def updated_results_page(text: str | None) -> str:
    """docs/results.md with every result rendered between its markers (the page is created when missing)."""
    return _fill(RESULTS_PAGE_TEMPLATE if text is None else text, START, END, wrap_markdown(render()),
                 str(RESULTS_PAGE))


def updated_readme(text: str, root: Path = ROOT) -> str:
    """README.md with the headline between its markers."""
    return _fill(text, HEADLINE_START, HEADLINE_END, render_headline(root), "README.md")


def rendered() -> dict[Path, str]:
    """Each file this script writes, with the text the result files give it."""
    page = ROOT / RESULTS_PAGE
    return {page: updated_results_page(page.read_text() if page.is_file() else None),
            ROOT / "README.md": updated_readme((ROOT / "README.md").read_text())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a rendered file is stale; write nothing")
    args = parser.parse_args(argv)
    stale = 0
    for path, new in rendered().items():
        old = path.read_text() if path.is_file() else None
        if new == old:
            continue
        if args.check:
            stale += 1
            what = "results section" if path.name == "results.md" else "headline"
            print(f"{path.relative_to(ROOT)} {what} is stale: run python benchmarks/render_results.py",
                  file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(new)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
