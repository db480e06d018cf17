"""The README stays true: its minimal example runs as written and CI runs its test command."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_minimal_example_runs_as_written(capsys):
    section = README.split("A minimal example that runs as written", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README-example", "exec"), {})
    printed = capsys.readouterr().out
    assert "diagonal" in printed and "executed" in printed


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    pytest_part = test_command.split("&&")[-1].strip()
    assert pytest_part in ci
    assert "pip install --quiet torch==2.13.0" in ci
    assert "dit-sparse generate" in blocks[0]


def test_results_section_is_rendered_from_the_result_files():
    import subprocess
    import sys

    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render_results.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def _load_render_results():
    """benchmarks/render_results.py is a script, not a package module: load it from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_measured_on_other_tiny_shapes_weights_are_flagged(monkeypatch):
    """After a retraining, a result left over from the earlier weights says so instead of passing as current."""
    render_results = _load_render_results()
    import dit_sparse.zoo.pipeline as zoo_pipeline

    current = zoo_pipeline.weights_id()
    assert "earlier tiny-shapes weights" not in render_results.stale_weights(current, "weights id")
    assert render_results.stale_weights(None, "weights id") == ""  # results that do not depend on the weights
    render_results.render()  # unpatched first: a module first imported under the patch would keep the fake id
    monkeypatch.setattr(zoo_pipeline, "weights_id", lambda path=None: "0123456789ab")
    warning = render_results.stale_weights(current, "weights id")
    assert f"weights id {current}; shipped now: 0123456789ab" in warning
    assert "earlier tiny-shapes weights" in render_results.render()


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
    from dit_sparse.generate import default_plan_id

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
