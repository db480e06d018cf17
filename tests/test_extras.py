"""A command that needs a missing extra says, in one line and without a traceback, which `pip install -e ".[...]"`
brings it (dit_sparse.extras). A package is hidden by `sys.modules[name] = None`, which makes `import name` fail."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from dit_sparse.extras import EXTRAS, MissingExtra, install_command, missing, require

ROOT = Path(__file__).resolve().parents[1]


def _run(hidden: list[str], call: str, cwd: Path, *, fake_cuda: bool = False) -> subprocess.CompletedProcess:
    """Run `call` (Python that ends the process) in a fresh interpreter where `hidden` packages cannot be imported;
    `fake_cuda`: torch reports a CUDA GPU (the check must come before anything touches it)."""
    code = textwrap.dedent(f"""
        import sys
        for name in {hidden!r}:
            sys.modules[name] = None
        if {fake_cuda!r}:
            import torch
            torch.cuda.is_available = lambda: True
    """) + call
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)


def _cli(argv: list[str]) -> str:
    return f"from dit_sparse.cli import main\nsys.exit(main({argv!r}))\n"


def _module_main(module: str, argv: list[str]) -> str:
    """`python -m module argv...`, after the packages are hidden."""
    return f"import runpy\nsys.argv = [{module!r}] + {argv!r}\nrunpy.run_module({module!r}, run_name='__main__')\n"


CASES = {
    "dit-sparse demo": (["gradio"], _cli(["demo"]), False, "demo"),
    "dit-sparse demo, no matplotlib": (["matplotlib"], _cli(["demo"]), False, "demo"),
    "python -m dit_sparse.demo": (["gradio", "matplotlib"], _module_main("dit_sparse.demo", []), False, "demo"),
    "dit-sparse distill": (["yaml"], _cli(["distill", "--out", "run"]), False, "distill"),
    "dit-sparse distill --config (LoRA)": (["peft"], _cli(["distill", "--config", "run.yaml"]), False, "distill"),
    "python -m dit_sparse.distill": (["yaml"], _module_main("dit_sparse.distill", ["--out", "run"]), False, "distill"),
    "dit-sparse distill --lora-rank": (["peft"], _cli(["distill", "--lora-rank", "2", "--out", "run"]), False,
                                       "distill"),
    "python -m dit_sparse.distill --lora-rank": (["peft"], _module_main("dit_sparse.distill", ["--lora-rank", "2"]),
                                                 False, "distill"),
    "dit-sparse distill --executor triton": (["triton"], _cli(["distill", "--executor", "triton", "--out", "run"]),
                                             False, "triton"),
    "dit-sparse bench kernels on CUDA": (["triton"], _cli(["bench", "kernels", "--out", "bench"]), True, "triton"),
    "dit-sparse bench kernels --device cuda": (["triton"], _cli(["bench", "kernels", "--device", "cuda"]), True,
                                               "triton"),
    "dit-sparse generate --executor triton": (["triton"], _cli(["generate", "--executor", "triton"]), False, "triton"),
    "dit-sparse generate --device cuda --executor triton": (
        ["triton"], _cli(["generate", "--device", "cuda", "--executor", "triton"]), True, "triton"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_missing_extra_is_one_line_naming_its_install_command(case, tmp_path):
    hidden, call, fake_cuda, extra = CASES[case]
    (tmp_path / "run.yaml").write_text("lora_rank: 2\n")
    out = _run(hidden, call, tmp_path, fake_cuda=fake_cuda)
    lines = out.stderr.splitlines()
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert lines[0].endswith(f'pip install -e ".[{extra}]"'), lines[0]
    assert "(not installed)" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"], "nothing is written before the check"


def test_the_messages_name_the_missing_packages(tmp_path):
    out = _run(["gradio", "matplotlib"], _cli(["demo"]), tmp_path)
    assert out.stderr.strip() == ("error: dit-sparse demo needs gradio, matplotlib (not installed): "
                                  'pip install -e ".[demo]"')
    out = _run(["yaml"], _cli(["distill"]), tmp_path)
    assert out.stderr.strip() == 'error: dit-sparse distill needs pyyaml (not installed): pip install -e ".[distill]"'


def test_distill_without_peft_runs_its_checks_when_no_lora_is_asked_for(tmp_path):
    # peft is only for LoRA: without it, a plain run gets past the extra check to its own argument checks
    out = _run(["peft"], _cli(["distill", "--export-only"]), tmp_path)
    assert out.returncode == 2 and "--export-only exports a run's newest checkpoint" in out.stderr, out.stderr[-3000:]


def test_bench_kernels_on_cpu_needs_no_triton(tmp_path):
    # the cpu executor's benchmark imports and starts without triton (the benchmark itself is replaced: it is slow)
    call = ("from dit_sparse.cli import checkout_module\nbench = checkout_module('benchmarks.bench_kernels')\n"
            "bench.main = lambda argv: print('bench', argv) or 0\n") + _cli(["bench", "kernels", "--device", "cpu",
                                                                              "--out", "bench", "--quick"])
    out = _run(["triton"], call, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bench ['--out', 'bench', '--device', 'cpu', '--quick']" in out.stdout


def test_the_cli_itself_needs_no_extra(tmp_path):
    out = _run(["gradio", "matplotlib", "yaml", "peft", "triton"], _cli(["generate", "--steps", "0"]), tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip() == "error: --steps must be a positive number of denoising steps, got 0"


def test_the_kernels_import_guard_names_the_triton_extra(tmp_path):
    call = ("from dit_sparse.extras import MissingExtra\n"
            "try:\n    import dit_sparse.kernels.executor\n"
            "except MissingExtra as e:\n    print(e)\n    sys.exit(3)\n")
    out = _run(["triton"], call, tmp_path)
    assert out.returncode == 3, out.stderr[-3000:]
    assert "needs Triton" in out.stdout and 'pip install -e ".[triton]"' in out.stdout, out.stdout


# -- the registry ----------------------------------------------------------------------------------------------------

def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_registered_extra_is_in_pyproject_with_its_distributions():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, packages in EXTRAS.items():
        assert extra in extras, f"extra {extra!r} is not in pyproject.toml's optional-dependencies"
        listed = {_normalized(re.match(r"[A-Za-z0-9_.-]+", req).group()) for req in extras[extra]}
        for module, dist in packages.items():
            assert _normalized(dist) in listed, f"{dist} (import {module}) is not in the {extra!r} extra: {listed}"


def test_registered_import_names_belong_to_their_distributions():
    provided = packages_distributions()
    for packages in EXTRAS.values():
        for module, dist in packages.items():
            if module in provided:  # installed here
                assert _normalized(dist) in {_normalized(d) for d in provided[module]}, (module, provided[module])


def test_require(monkeypatch):
    require("distill", "yaml", what="x")  # installed with the test extra: no error
    monkeypatch.setitem(sys.modules, "peft", None)
    assert missing("distill") == {"peft": "not installed"}
    with pytest.raises(MissingExtra) as e:
        require("distill", what="the thing")
    assert str(e.value) == 'the thing needs peft (not installed): pip install -e ".[distill]"'
    assert isinstance(e.value, ImportError)
    with pytest.raises(KeyError):
        require("distill", "gradio", what="x")  # not a package of that extra
    with pytest.raises(KeyError):
        install_command("nonesuch")


def test_a_broken_package_is_told_apart_from_a_missing_one(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *args):
        if name == "peft":
            raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingExtra) as e:
        require("distill", "peft", what="x")
    assert str(e.value) == ("x needs peft (fails to import: No module named 'transformers'): "
                            'pip install -e ".[distill]"')


def test_the_triton_executor_without_triton_is_an_executor_error_and_a_missing_extra(monkeypatch):
    from dit_sparse import executors
    from dit_sparse.executors import ExecutorError, get_executor

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(executors.EXECUTORS, "triton", raising=False)
    monkeypatch.setattr(executors, "load_optional_kernels", lambda: None)
    with pytest.raises(ExecutorError) as e:
        get_executor("triton", "cpu")
    assert isinstance(e.value, MissingExtra)
    assert str(e.value) == 'executor \'triton\' needs triton (not installed): pip install -e ".[triton]"'
