"""benchmarks/render_results.py: docs/results.md and the README headline are what the committed result files give."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "render_results.py"


def _benchmarks(name: str):
    """A module of the checkout's benchmarks package (render_results is the script, the others its pieces)."""
    from dit_sparse.cli import checkout_module

    return checkout_module(f"benchmarks.{name}")


def _load_render_results():
    return _benchmarks("render_results")


def test_results_page_and_headline_are_rendered_from_the_result_files():
    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_results_measured_on_other_tiny_shapes_weights_are_flagged(monkeypatch):
    """After a retraining, a result left over from the earlier weights says so instead of passing as current."""
    render_results = _load_render_results()
    import dit_sparse.zoo.pipeline as zoo_pipeline

    current = zoo_pipeline.weights_id()
    sections = _benchmarks("results_sections")
    assert "earlier tiny-shapes weights" not in sections.stale_weights(current, "weights id")
    assert sections.stale_weights(None, "weights id") == ""  # results that do not depend on the weights
    render_results.render()  # unpatched first: a module first imported under the patch would keep the fake id
    monkeypatch.setattr(zoo_pipeline, "weights_id", lambda path=None: "0123456789ab")
    warning = sections.stale_weights(current, "weights id")
    assert f"weights id {current}; shipped now: 0123456789ab" in warning
    assert "earlier tiny-shapes weights" in render_results.render()


def _headline_files() -> list[str]:
    return [name for files in _benchmarks("results_headline").HEADLINES.values() for name in files]


def test_a_changed_number_in_a_result_file_makes_the_headline_stale(tmp_path, monkeypatch, capsys):
    render_results = _load_render_results()
    for name in _headline_files():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    assert render_results.render_headline(tmp_path) == render_results.render_headline()  # same files, same text
    report = tmp_path / "benchmarks" / "results" / "generate-tiny-shapes-cpu" / "report.json"
    result = json.loads(report.read_text())
    report.write_text(json.dumps({**result, "speedup": 1.2345, "sparse_seconds": 3.98}))
    changed = render_results.render_headline(tmp_path)
    assert changed != render_results.render_headline()
    assert "1.23x (4.91 -> 3.98 s)" in changed
    # README.md as committed no longer matches, and --check says that it is the README headline that is stale.
    readme = (ROOT / "README.md").read_text()
    assert render_results.updated_readme(readme, tmp_path) != readme
    monkeypatch.setattr(render_results, "render_headline", lambda root=ROOT: changed)
    monkeypatch.setattr(render_results, "updated_results_page", lambda text: text)  # this test is about the README
    assert render_results.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "README.md headline is stale" in err and "docs/results.md" not in err


def test_the_headline_has_a_short_table_per_hardware_with_every_listed_file_linked():
    render_results = _load_render_results()
    headline = render_results.render_headline()
    lines = headline.splitlines()
    assert lines[0].startswith("| CPU (2-core x86_64") and any(line.startswith("| GPU (NVIDIA H200") for line in lines)
    for name in _headline_files():
        assert f"]: {name}" in headline  # a reference link, relative to the README at the repository root
        assert (ROOT / name).is_file()
    assert len(lines) <= 35 and max(map(len, lines)) <= 120  # README.md: no line over 120, table rows included
    assert "5.82x vs sdpa_cudnn" in headline  # the kernel against the fastest dense baseline of its file


def test_results_page_has_no_line_over_120_characters_outside_tables():
    lines = (ROOT / "docs" / "results.md").read_text().splitlines()
    long = [line for line in lines if len(line) > 120 and not line.startswith("|")]
    assert not long, long[:3]


def test_wrapping_never_starts_a_line_with_a_markdown_block():
    line = "a " + "x" * 117 + " - " + "y" * 117 + " # " + "z" * 117 + " 1. end"  # each mark at a line start
    plain = textwrap.wrap(line, width=120, break_long_words=False, break_on_hyphens=False)
    assert [w[0] for w in plain[1:]] == ["-", "#", "1"]  # where textwrap alone would break
    markdown = _benchmarks("markdown_wrap")
    wrapped = markdown.wrap_line(line)
    assert " ".join(wrapped).split() == line.split()
    assert all(len(w) <= 120 for w in wrapped)
    assert not any(markdown._BLOCK_START.match(w) for w in wrapped[1:])
    table = "| " + " | ".join(["cell"] * 60) + " |"
    assert markdown.wrap_markdown(table) == table  # table rows stay whole
