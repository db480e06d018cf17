"""Packaging: light imports, sub-packages installed under dit_sparse (never as top-level `kernels` etc.)."""

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout


def test_import_is_light():
    out = _run("import sys, dit_sparse; "
               "print(sorted(m for m in ('triton', 'gradio', 'accelerate') if m in sys.modules))")
    assert out.strip() == "[]"


def test_subpackages_live_under_dit_sparse():
    out = _run(
        "import importlib.util as u, dit_sparse.search, dit_sparse.distill, dit_sparse.demo;"
        "print([u.find_spec(n) is None or 'dit_sparse' not in (u.find_spec(n).origin or '') "
        "for n in ('search', 'distill', 'demo')])"
    )
    assert out.strip() == "[True, True, True]"


def test_python_run_from_the_repository_root_imports_the_installed_kernels_library():
    """`python -m dit_sparse...` from the root puts the root on sys.path, where the `kernels/` source folder would
    shadow Hugging Face's `kernels` library that transformers imports; dit_sparse imports the library first."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import dit_sparse, diffusers, transformers, kernels; from dit_sparse.zoo import load_tiny_shapes; "
            "print(kernels.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    try:
        importlib.metadata.distribution("kernels")  # Hugging Face's library (a dependency of recent transformers)
    except importlib.metadata.PackageNotFoundError:
        return  # nothing to shadow; the imports above still had to work from the root
    assert Path(run.stdout.strip()).parent != root / "kernels"
