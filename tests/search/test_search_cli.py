"""`dit-sparse search` end to end on a tiny pipeline, and its bad-input errors: clear message, exit status 2,
nothing written."""

import json
import os

import pytest
import torch
from search_helpers import synthetic_stats

from dit_sparse import SparsePlan, UnsupportedModelError, apply, remove
from dit_sparse.cli import main
from dit_sparse.layout import Grid
from dit_sparse.search import SearchConfig, search
from dit_sparse.search.candidates import default_candidates
from dit_sparse.search.cost import measure_cost


def test_search_on_a_tiny_pipeline_writes_plan_report_and_stats(tiny_pipe, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right on a dark background\n\n# a comment\n")
    result = search(tiny_pipe, SearchConfig(prompts=prompts, steps=3, frames=4, height=32, width=32, dense_first=0.0,
                    calib_steps=2, cost="flop", out=tmp_path / "tiny.plan.json", max_error=0.3, progress=False))
    st = result.stats
    assert st.info["branches"] == ["cond", "uncond"] and st.info["calls_per_step"] == 2
    assert st.grid == Grid(4, 16, 16) and st.info["prompts"] == ["a red circle moving right on a dark background"]
    assert st.info["sample_steps"] == [0, 2]
    sensitivity = st.info["layer_sensitivity"]
    assert len(sensitivity) == 2 and all(v > 0 for v in sensitivity)
    assert result.solution.plan.calibration["error_weights"] == "layer sensitivity"
    for key in ("plan", "report", "png", "stats"):
        assert result.paths[key].exists(), key
    plan = SparsePlan.load(result.paths["plan"])
    apply(tiny_pipe, plan)
    try:
        out = tiny_pipe("a red circle moving right on a dark background", num_inference_steps=2, num_frames=4,
                        output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    finally:
        remove(tiny_pipe)
    assert torch.isfinite(out).all()


def test_cli_resolves_from_stats_and_reports(tmp_path, capsys):
    stats = synthetic_stats().save(tmp_path / "tiny.stats.json")
    out = tmp_path / "x.plan.json"
    assert main(["search", "--stats", str(stats), "--cost", "flop", "--target-speedup", "2", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "target is binding" in printed and "wrote plan" in printed
    assert json.loads(out.read_text())["calibration"]["predicted"]["attention_speedup"] >= 2.0


def test_empty_prompt_file_is_a_clear_error(tmp_path, capsys):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n  \n")
    out = tmp_path / "out"
    assert main(["search", "--prompts", str(prompts), "--out", str(out / "p.plan.json"), "--quiet"]) == 2
    assert "has no prompt" in capsys.readouterr().err
    assert not out.exists()


def test_infeasible_budget_writes_nothing_unless_asked(tmp_path, capsys):
    stats = synthetic_stats().save(tmp_path / "tiny.stats.json")
    out = tmp_path / "p.plan.json"
    args = ["search", "--stats", str(stats), "--cost", "flop", "--target-speedup", "8", "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot reach attention speedup 8x" in err and "--allow-closest" in err
    assert sorted(os.listdir(tmp_path)) == ["tiny.stats.json"]
    assert main(args + ["--allow-closest"]) == 0
    assert out.exists() and "closest plan" in out.with_name("p.report.md").read_text()


def test_unsupported_model_is_a_clear_error(tmp_path, capsys):
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    model_dir = tmp_path / "dit"
    dit.save_config(model_dir / "transformer")
    (model_dir / "model_index.json").write_text(json.dumps(
        {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    stats = synthetic_stats().save(tmp_path / "s.stats.json")
    assert main(["search", "--model", str(model_dir), "--stats", str(stats), "--cost", "flop", "--quiet",
                 "--out", str(tmp_path / "p.plan.json")]) == 2
    assert "no adapter for DiTTransformer2DModel" in capsys.readouterr().err
    with pytest.raises(UnsupportedModelError, match="supported transformers"):
        search(type("Pipe", (), {"transformer": dit})(), SearchConfig(prompts=["a cat"], out=tmp_path / "q.plan.json",
               cost="flop", progress=False))
    assert not (tmp_path / "p.plan.json").exists() and not (tmp_path / "q.plan.json").exists()


def test_missing_shipped_weights_are_a_clear_error(tmp_path, monkeypatch, capsys):
    import dit_sparse.zoo

    monkeypatch.setattr(dit_sparse.zoo, "WEIGHTS_DIR", tmp_path / "gone")
    stats = synthetic_stats().save(tmp_path / "s.stats.json")
    assert main(["search", "--model", "tiny-shapes", "--stats", str(stats), "--cost", "flop", "--quiet",
                 "--out", str(tmp_path / "p.plan.json")]) == 2
    assert "shipped weights are missing" in capsys.readouterr().err
    assert not (tmp_path / "p.plan.json").exists()


def test_bad_budgets_are_clear_errors(tmp_path, capsys):
    stats = synthetic_stats().save(tmp_path / "s.stats.json")
    for args, message in ((["--target-speedup", "2", "--target-density", "0.3"], "not both"),
                          (["--max-error", "-1"], "--max-error must be"),
                          (["--dense-first", "1.0"], "--dense-first must be"),
                          (["--dense-layers", "7"], "no covered layer 7")):
        assert main(["search", "--stats", str(stats), "--cost", "flop", "--quiet",
                     "--out", str(tmp_path / "p.plan.json")] + args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "p.plan.json").exists()


def test_out_that_is_a_directory_is_refused_before_any_work(tmp_path, capsys):
    stats = synthetic_stats().save(tmp_path / "s.stats.json")
    folder = tmp_path / "plans"
    folder.mkdir()
    assert main(["search", "--stats", str(stats), "--cost", "flop", "--quiet", "--out", str(folder)]) == 2
    assert f"--out {folder} is a directory; --out takes the plan's file path" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["plans", "s.stats.json"] and not os.listdir(folder)


def test_measured_cost_table_is_cached(tmp_path, monkeypatch):
    grid = Grid(2, 4, 8)
    cands = default_candidates(grid, 16, 16)
    first = measure_cost(cands, grid, 16, 16, 1, 2, 8, cache_dir=tmp_path, rounds=1)
    files = list((tmp_path / "cost").glob("*.json"))
    assert len(files) == 1 and first.kind == "measured" and first.dense_layer > 0
    assert all(first.head_time(c, 0.5) >= 0 for c in cands)
    assert any(c.rescale and c.dynamic for c in cands) and first.covers(cands)  # re-scaled ones are timed too

    import dit_sparse.search.cost as cost

    monkeypatch.setattr(cost._Bench, "run", lambda *a, **k: pytest.fail("timed again despite the cache"))
    again = measure_cost(cands, grid, 16, 16, 1, 2, 8, cache_dir=tmp_path)
    assert again.per_head == first.per_head


def _no_model_load(monkeypatch):
    import dit_sparse.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))


def test_mistyped_model_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """--model ./mymodel was the hub's error about repository ids."""
    monkeypatch.chdir(tmp_path)
    _no_model_load(monkeypatch)
    assert main(["search", "--model", "./mymodel", "--quiet", "--out", str(tmp_path / "p.plan.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model: no such model folder ./mymodel (and it is not a hub id: ")
    assert err.count("\n") == 1 and sorted(os.listdir(tmp_path)) == []


def test_read_only_out_is_found_before_calibrating(tmp_path, capsys, monkeypatch):
    import errno

    import dit_sparse.atomic as atomic
    import dit_sparse.search.api as api

    _no_model_load(monkeypatch)
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "p.plan.json"
    assert main(["search", "--quiet", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: could not write to the folder of --out {out.parent}: not a directory "
                                       "(checked before any work; give a writable --out)\n")

    def read_only(folder):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic, "_probe", read_only)
    monkeypatch.setattr(api, "_cost_for_stats", lambda *a, **k: pytest.fail("the candidates were timed"))
    stats = synthetic_stats().save(tmp_path / "s.stats.json")
    out = tmp_path / "ro" / "p.plan.json"
    for extra in ([], ["--stats", str(stats)], ["--reuse-schedule", "--min-psnr", "20"]):
        assert main(["search", "--quiet", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err == f"error: could not write to the folder of --out {out.parent}: read-only file system (checked " \
                      "before any work; give a writable --out)\n"


def test_a_late_write_failure_is_one_line_and_keeps_the_plan(tmp_path, capsys, monkeypatch):
    import errno
    from pathlib import Path

    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".p.report.md."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    stats = synthetic_stats().save(tmp_path / "s.stats.json")
    out = tmp_path / "p.plan.json"
    assert main(["search", "--stats", str(stats), "--cost", "flop", "--max-error", "0.1", "--quiet",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: could not write {tmp_path / 'p.report.md'}: no space left on device\n"
    assert SparsePlan.load(out).modules  # the plan written before the report is kept
    assert sorted(os.listdir(tmp_path)) == ["p.plan.json", "p.report.png", "s.stats.json"]


def test_statistics_are_written_before_solving(tiny_pipe, tmp_path, monkeypatch):
    """A fault in the solver (or later) keeps the calibration: re-solve with --stats."""
    import dit_sparse.search.api as api

    def broken_solver(*args, **kwargs):
        raise ValueError("a solver fault")

    monkeypatch.setattr(api, "solve", broken_solver)
    with pytest.raises(api.SearchError, match="a solver fault"):
        search(tiny_pipe, SearchConfig(prompts=["a red circle moving right on a dark background"], steps=2, frames=2,
               height=16, width=16, dense_first=0.0, calib_steps=1, cost="flop", out=tmp_path / "t.plan.json",
               progress=False))
    assert sorted(os.listdir(tmp_path)) == ["t.stats.json"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option", ["--prompts", "--stats"])
@pytest.mark.parametrize("kind", ["binary", "fifo", "device"])
def test_input_files_that_are_not_text_are_one_line(tmp_path, capsys, monkeypatch, option, kind):
    """A binary file was a UnicodeDecodeError; a FIFO or /dev/zero was "no such file"."""
    _no_model_load(monkeypatch)
    path = tmp_path / "input"
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path = "/dev/zero"
    assert main(["search", option, str(path), "--cost", "flop", "--quiet", "--out", str(tmp_path / "p.plan.json")]) == 2
    err = capsys.readouterr().err
    reason = "is not a text file (not UTF-8 at byte 0)" if kind == "binary" else "is not a regular file"
    assert err.startswith(f"error: {option}: {path} {reason}") and err.count("\n") == 1
