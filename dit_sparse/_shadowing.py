"""Keep the repository's `kernels/` folder from shadowing Hugging Face's `kernels` library.

The source tree keeps the Triton kernels in a top-level `kernels/` folder (installed as `dit_sparse.kernels`).
When the repository root is on `sys.path` (`python -m ...` or `python -c ...` run from the root), `import kernels`
would find that folder, and transformers, which imports Hugging Face's `kernels` at import time when it is
installed, fails with "cannot import name ... from 'kernels'". Importing the installed library first, with the
repository root left out of the search, puts the right module in `sys.modules` for everyone after.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _is_repo_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == REPO_ROOT
    except OSError:
        return False


def prefer_installed_kernels() -> None:
    if "kernels" in sys.modules or not (REPO_ROOT / "kernels" / "__init__.py").is_file():
        return
    saved = list(sys.path)
    unshadowed = [entry for entry in saved if not _is_repo_root(entry)]
    if len(unshadowed) == len(saved):
        return  # the root is not searched: nothing to shadow, and no import to pay for
    sys.path[:] = unshadowed
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed (nothing to shadow), or broken: transformers' business, not ours
    finally:
        sys.path[:] = saved
