"""Packaging: light imports, sub-packages installed under dit_sparse (never as top-level `kernels` etc.)."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path


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


ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_SOURCE_FOLDERS = ("kernels", "search", "distill", "demo", "benchmarks", "tools")


def _run_at_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command run where a user stands after `git clone` and `pip install -e .`: the repository root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_libraries_import_before_dit_sparse_at_the_repository_root():
    """`python -c` at the root puts the root first on sys.path. Its `kernels/` folder must not stand in for Hugging
    Face's `kernels` library, which transformers imports, whatever is imported first."""
    code = ("import torch, transformers; from diffusers import WanTransformer3DModel; import kernels, dit_sparse; "
            "import dit_sparse.kernels.naive; print(getattr(kernels, '__file__', None))")
    run = _run_at_root("-c", code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not run.stdout.strip().startswith(str(ROOT / "kernels")), run.stdout


def test_python_m_pytest_works_at_the_repository_root():
    run = _run_at_root("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_plan.py", "-k", "round_trip",
                       timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert " passed" in run.stdout


def test_no_source_folder_at_the_root_is_a_package_named_like_an_installed_library():
    """The fix for the `kernels` clash itself: a root folder that is a regular package (has __init__.py) is
    importable as a top-level package from the root, so its name must not be any installed distribution's."""
    installed = importlib.metadata.packages_distributions()
    assert not (ROOT / "kernels" / "__init__.py").exists()  # Hugging Face's kernels comes with transformers
    for name in TOP_LEVEL_SOURCE_FOLDERS:
        if (ROOT / name / "__init__.py").exists():
            assert name not in installed or installed[name] == ["dit-sparse"], (name, installed.get(name))


def test_benchmarks_load_from_the_checkout_with_the_root_appended_to_sys_path():
    """`dit-sparse bench` imports benchmarks/ of the editable install's checkout; the root goes after the installed
    libraries on sys.path, so that its kernels/ folder cannot stand in for the installed `kernels` library."""
    code = ("import sys, torch; from pathlib import Path; from dit_sparse.cli import checkout_module; "
            "bench = checkout_module('benchmarks.bench_kernels'); import kernels; "
            "libraries = str(Path(torch.__file__).parents[1]); root = str(Path(bench.__file__).parents[1]); "
            "print(sys.path.index(root) > sys.path.index(libraries), bench.__file__, "
            "getattr(kernels, '__file__', None))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell has it
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/", env=env)
    appended, bench, kernels = run.stdout.split()
    assert appended == "True" and bench == str(ROOT / "benchmarks" / "bench_kernels.py")
    assert not kernels.startswith(str(ROOT))


def test_bench_outside_a_source_checkout_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import dit_sparse.cli as cli

    monkeypatch.setattr(cli, "checkout_root", lambda: tmp_path)  # as in a non-editable install: no benchmarks/
    for command in (["e2e"], ["speed"], ["kernels", "--device", "cpu"]):
        assert cli.main(["bench", *command, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "dit-sparse bench runs from a source checkout" in err
        assert "`pip install -e .`" in err
