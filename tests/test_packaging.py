"""Packaging: light imports, sub-packages installed under dit_sparse (never as top-level `kernels` etc.)."""

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout


def test_import_is_light():
    out = _run("import sys, dit_sparse; print(sorted(m for m in ('triton', 'gradio', 'accelerate') if m in sys.modules))")
    assert out.strip() == "[]"


def test_subpackages_live_under_dit_sparse():
    out = _run(
        "import importlib.util as u, dit_sparse.search, dit_sparse.distill, dit_sparse.demo;"
        "print([u.find_spec(n) is None or 'dit_sparse' not in (u.find_spec(n).origin or '') "
        "for n in ('search', 'distill', 'demo')])"
    )
    assert out.strip() == "[True, True, True]"
