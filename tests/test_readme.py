"""The README stays true: its minimal example runs as written and CI runs its test command."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _load(path: Path):
    """A script that is not a package module, loaded from its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _api_example() -> str:
    section = README.split("## Use it", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_api_example_runs_as_written_at_the_repository_root():
    """Pasted into Python where a user stands after `pip install -e .` (the root, which is first on sys.path)."""
    code = _api_example()
    assert len(code.strip().splitlines()) <= 15
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "diagonal" in run.stdout and "density" in run.stdout
    assert (ROOT / "out" / "my.plan.json").is_file()


def test_ci_runs_the_readme_commands_extracted_from_it():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = _load(ROOT / ".ci" / "readme_commands.py")
    quick, tests = commands.command("quick-start"), commands.command("tests")
    # The plain install, exactly: no extra may bring what the main job needs.
    assert quick == "pip install torch==2.13.0 && pip install -e . && dit-sparse generate"
    assert "pytest" in tests and "pip install -e \".[test]\"" in tests
    assert "readme_commands.py quick-start" in ci and "readme_commands.py tests" in ci
    assert "python -m venv" in ci and "readme_commands.py fresh" in ci and "readme_commands.py outputs" in ci
    assert quick not in ci and tests not in ci  # never a copy of the README's commands
    assert "ruff check ." in ci


def test_readme_command_extraction_refuses_a_missing_or_doubled_marker():
    commands = _load(ROOT / ".ci" / "readme_commands.py")
    text = "<!-- ci:tests -->\n```bash\npip install -e .\npytest -q\n```\n"
    assert commands.command("tests", text) == "pip install -e . && pytest -q"
    for bad in ("", text + text, "<!-- ci:tests -->\nno block\n"):
        with pytest.raises(SystemExit):
            commands.command("tests", bad)


def test_pre_commit_runs_the_lint_ci_runs_with_the_same_ruff():
    pre_commit = (ROOT / ".pre-commit-config.yaml").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"(ruff==[0-9.]+)"', pyproject).group(1)
    assert f'"{pinned}"' in pre_commit and "entry: ruff check" in pre_commit
    for rule in ('"F"', '"E"', '"I"', '"B"'):  # pyflakes, pycodestyle errors, import order, bugbear
        assert rule in pyproject.split("[tool.ruff.lint]", 1)[1].split("\n[", 1)[0]


def test_readme_is_a_front_door():
    lines = README.splitlines()
    assert len(lines) <= 210
    for heading in ("## Quick start", "## Use it", "## How it works", "## Supported models", "## Strategies",
                    "## Commands", "## Results", "## Repository layout"):
        assert heading in lines, heading
    assert "python -m pytest" not in README  # no caveat: it works like pytest


def test_hand_written_markdown_stays_within_120_columns():
    docs = ROOT / "docs"
    written = [ROOT / "README.md",
               *(docs / name for name in ("usage.md", "tiny-shapes.md", "gpu.md", "results.md", "reliability.md"))]
    for path in written:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if path.name == "results.md" and line.startswith("|"):
                continue  # rendered table rows cannot wrap
            if re.fullmatch(r"\s*(\d+\. )?`tests/[^` ]+`,?", line):
                continue  # one test's name, which cannot wrap
            assert len(line) <= 120, f"{path.relative_to(ROOT)}:{number} has {len(line)} characters"


def _load_render_results():
    """The sections of docs/results.md, as benchmarks/render_results.py renders them."""
    from dit_sparse.cli import checkout_module

    return checkout_module("benchmarks.results_sections")


def test_benchmark_tables_from_earlier_tiny_shapes_weights_are_flagged():
    """Every result that records a weights id (evaluation, attention, bench e2e, compare_uniform) is flagged
    when the id is not the shipped one."""
    render_results = _load_render_results()
    from dit_sparse.zoo.pipeline import weights_id

    e2e = {"model": "tiny-shapes", "date": "2026-12-03", "hardware": {"cpus": 2, "machine": "x86_64",
                                                                    "processor": ""},
           "versions": {"torch": "t", "diffusers": "d"}, "prompts": 1, "seeds": [0], "steps": None,
           "device": "cpu", "dtype": "float32",
           "results": [{"plan": "dense", "seconds": 1.0, "attention_seconds": 0.5, "speedup": 1.0,
                        "attention_speedup": 1.0, "executed_density": 1.0, "psnr": float("inf"), "ssim": 1.0,
                        "caption_accuracy": 0.5}]}
    path = render_results.ROOT / "benchmarks" / "results" / "x.json"
    for weights, flagged in ((weights_id(), False), ("0123456789ab", True), (None, False)):
        text = render_results.section(render_results.render_e2e, path, {**e2e, "weights_id": weights})
        assert ("earlier tiny-shapes weights (weights id 0123456789ab" in text) is flagged
    compare_path = render_results.ROOT / "benchmarks" / "results" / "search-tiny-shapes" / "compare.json"
    compare = json.loads(compare_path.read_text())
    for weights, flagged in ((weights_id(), False), ("0123456789ab", True)):
        text = render_results.section(render_results.render_search_compare, compare_path,
                                      {**compare, "weights_id": weights})
        assert ("earlier tiny-shapes weights (weights id 0123456789ab" in text) is flagged


def test_a_default_row_run_with_another_default_plan_is_flagged():
    render_results = _load_render_results()
    from dit_sparse.plan_spec import default_plan_id

    row = {"plan": "default", "seconds": 1.0, "attention_seconds": 0.5, "speedup": 1.2, "attention_speedup": 1.3,
           "executed_density": 0.7, "psnr": 30.0, "ssim": 0.9, "caption_accuracy": 0.5}
    e2e = {"model": "tiny-shapes", "date": "2026-12-03", "hardware": {"cpus": 2, "machine": "x86_64",
                                                                    "processor": ""},
           "versions": {"torch": "t", "diffusers": "d"}, "prompts": 1, "seeds": [0], "steps": None,
           "device": "cpu", "dtype": "float32", "results": [row]}
    path = render_results.ROOT / "benchmarks" / "results" / "x.json"
    shipped = default_plan_id("TinyShapesPipeline")
    for recorded, note in ((shipped, None), ("0123456789ab", "(plan id 0123456789ab)"), (None, "not recorded which")):
        text = "\n".join(render_results.render_e2e(path, {**e2e, "default_plan_id": recorded}))
        assert (f"not the one shipped now (plan id {shipped})" in text) is (note is not None)
        assert note is None or note in text
    other = {**e2e, "results": [{**row, "plan": "diagonal"}]}  # no default row: nothing to say
    assert "shipped now" not in "\n".join(render_results.render_e2e(path, {**other, "default_plan_id": None}))


def test_attribute_sensitivity_is_rendered_at_the_highest_noise_level():
    render_results = _load_render_results()
    sentence = render_results._sensitivity_sentence({"colour": {"0.6": 0.1, "0.95": 0.375}, "motion": {"0.6": 0.002,
                                                                                                     "0.95": 0.012}})
    assert "sigma 0.95" in sentence and "colour 0.375, motion 0.012" in sentence
    assert render_results._sensitivity_sentence(None) == ""  # evaluations written before it was measured


def test_word_choice_is_rendered_against_chance():
    render_results = _load_render_results()
    sentence = render_results._word_choice_sentence(
        {"shape": {"0.9": 0.7, "0.7": 0.5}, "motion": {"0.9": 0.0, "0.7": 0.1},
         "chance": {"shape": 0.3333, "motion": 0.1429}})
    assert "shape 70% at sigma 0.9, 50% at sigma 0.7 (chance 33%)" in sentence
    assert "motion 0% at sigma 0.9, 10% at sigma 0.7 (chance 14%)" in sentence
    assert render_results._word_choice_sentence(None) == ""


def test_every_test_the_reliability_page_names_exists():
    """docs/reliability.md backs each case with a test; a renamed or deleted test must not leave it pointing nowhere."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(named) >= 44
    for path, test in named:
        assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), f"{path}::{test}"
    rows = re.findall(r"^\| (\d+) \|", text, re.M)
    listed = re.findall(r"^(\d+)\. ", text, re.M)
    assert rows == listed == [str(i) for i in range(1, len(rows) + 1)]
