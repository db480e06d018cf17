"""Statistics: saved atomically, reloaded exactly, refused for another model; re-solving takes seconds."""

import json
import os
import time

import numpy as np
import pytest
from search_helpers import TINY_SHAPES, synthetic_stats

from dit_sparse.plan import ModelFingerprint, SparsePlan
from dit_sparse.search import SearchConfig, SearchError, StatsError, search
from dit_sparse.search.stats import CalibrationStats


def test_round_trip(stats, tmp_path):
    path = stats.save(tmp_path / "s.stats.json")
    back = CalibrationStats.load(path)
    assert back.fingerprint == stats.fingerprint and back.grid == stats.grid
    assert [c.key for c in back.candidates] == [c.key for c in stats.candidates]
    assert np.allclose(back.error, stats.error, rtol=1e-5) and np.allclose(back.density, stats.density, rtol=1e-5)
    assert back.columns == stats.columns and back.info == stats.info
    per_head = next(i for i, c in enumerate(back.candidates) if c.per_head)
    assert back.spec(0, 0, per_head).param_dict["columns"] == (1000,)


def test_save_is_atomic(stats, tmp_path, monkeypatch):
    path = tmp_path / "s.stats.json"
    stats.save(path)
    before = path.read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dumps", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic_stats(seed=1).save(path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["s.stats.json"]  # no temporary file left behind


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(StatsError, match="no statistics file"):
        CalibrationStats.load(tmp_path / "missing.json")
    (tmp_path / "plan.json").write_text(json.dumps({"format": "dit-sparse-plan"}))
    with pytest.raises(StatsError, match="not a dit-sparse search statistics file"):
        CalibrationStats.load(tmp_path / "plan.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(StatsError, match="not valid JSON"):
        CalibrationStats.load(tmp_path / "bad.json")


def test_stats_from_another_model_are_refused(tmp_path):
    other = synthetic_stats(ModelFingerprint("CogVideoXTransformer3DModel", 4, 4, 32))
    path = other.save(tmp_path / "other.stats.json")
    with pytest.raises(StatsError, match=r"another model than 'tiny-shapes'.*transformer_class: stats have "
                                         r"'CogVideoXTransformer3DModel', model has 'TinyShapesTransformer'"):
        search("tiny-shapes", SearchConfig(stats=path, out=tmp_path / "p.plan.json", cost="flop", progress=False))
    assert not (tmp_path / "p.plan.json").exists()


def test_resolving_from_stats_takes_seconds_and_writes_plan_and_report(stats, tmp_path):
    path = stats.save(tmp_path / "tiny.stats.json")
    start = time.perf_counter()
    loose = search("tiny-shapes", SearchConfig(stats=path, max_error=0.2, out=tmp_path / "a.plan.json", cost="flop",
                   progress=False))
    tight = search(None, SearchConfig(stats=path, max_error=0.02, out=tmp_path / "b.plan.json", cost="flop",
                                      progress=False))
    assert time.perf_counter() - start < 20
    assert loose.solution.metrics["attention_speedup"] > tight.solution.metrics["attention_speedup"]
    assert tight.solution.metrics["relative_l2_error"] <= 0.02
    for result in (loose, tight):
        assert set(result.paths) == {"plan", "report", "png"}
        assert all(p.exists() for p in result.paths.values())
        plan = SparsePlan.load(result.paths["plan"])
        assert plan.model == TINY_SHAPES
        assert plan.calibration["source"] == "dit-sparse search"
    report = loose.paths["report"].read_text()
    assert "error budget" in report and "| layer | head | strategy |" in report and "a.report.png" in report
    with pytest.raises(SearchError, match="--steps 30 differs from the statistics"):
        search(None, SearchConfig(stats=path, steps=30, out=tmp_path / "c.plan.json", cost="flop", progress=False))
    # Re-scaled errors were measured for the statistics' refresh interval (5): another one needs a new calibration.
    with pytest.raises(SearchError, match="--refresh-interval 3 differs from the statistics \\(5\\)"):
        search(None, SearchConfig(stats=path, refresh_interval=3, out=tmp_path / "c.plan.json", cost="flop",
                                  progress=False))
    assert "re-scaled variants, scored over residual ages 0-4" in report
