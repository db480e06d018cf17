"""The README's own commands, for CI: it runs what the README says, never a copy of it.

    python .ci/readme_commands.py quick-start     # print the quick-start command block
    python .ci/readme_commands.py tests           # print the test command block
    python .ci/readme_commands.py fresh           # fail unless this interpreter's environment is new and empty
    python .ci/readme_commands.py outputs DIR     # fail unless `dit-sparse generate` wrote its files in DIR

Standard library only: it runs in the new virtual environment before anything is installed there.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = {"quick-start": "<!-- ci:quick-start -->", "tests": "<!-- ci:tests -->"}
GENERATE_OUTPUTS = ("report.json", "dense.mp4", "sparse.mp4", "side_by_side.mp4")
# What the plain install must bring by itself; `.[test]` would hide a missing one (accelerate did, once).
NOT_YET_INSTALLED = ("torch", "diffusers", "accelerate", "dit_sparse")


def command(name: str, text: str | None = None) -> str:
    """The bash block that follows the README's marker for `name`, as one line of shell."""
    text = README.read_text() if text is None else text
    marker = MARKERS[name]
    if text.count(marker) != 1:
        raise SystemExit(f"README.md must hold the marker {marker} exactly once (found {text.count(marker)})")
    block = re.match(r"\s*```bash\n(.*?)```", text.split(marker, 1)[1], re.S)
    if block is None:
        raise SystemExit(f"README.md: the marker {marker} must be followed by a ```bash block")
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    return " && ".join(lines)


def check_fresh() -> None:
    present = [name for name in NOT_YET_INSTALLED if importlib.util.find_spec(name) is not None]
    if sys.prefix == sys.base_prefix or present:
        raise SystemExit(f"not a new, empty virtual environment (prefix {sys.prefix}; installed: {present})")
    print(f"new virtual environment {sys.prefix}: none of {', '.join(NOT_YET_INSTALLED)} installed")


def check_outputs(folder: str) -> None:
    out = Path(folder)
    missing = [name for name in GENERATE_OUTPUTS if not (out / name).is_file() or (out / name).stat().st_size == 0]
    if missing:
        raise SystemExit(f"dit-sparse generate did not write {', '.join(missing)} in {out}")
    report = json.loads((out / "report.json").read_text())
    print(f"{out}: {', '.join(GENERATE_OUTPUTS)}; speedup {report['speedup']:.2f}x, PSNR {report['psnr']}")


def main(argv: list[str]) -> None:
    if len(argv) == 1 and argv[0] in MARKERS:
        print(command(argv[0]))
    elif argv == ["fresh"]:
        check_fresh()
    elif len(argv) == 2 and argv[0] == "outputs":
        check_outputs(argv[1])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
