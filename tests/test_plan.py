"""Plan JSON: round trip, builders, and errors that name the JSON path of the problem."""

import os
import stat
from pathlib import Path

import pytest

from dit_sparse import HeadStrategy, PlanError, Schedule, SparsePlan
from dit_sparse.plan import ModelFingerprint

MODEL = ModelFingerprint("WanTransformer3DModel", 2, 2, 16)


def plan_json(**overrides):
    data = {
        "format": "dit-sparse-plan",
        "version": 1,
        "model": {"transformer_class": "WanTransformer3DModel", "num_layers": 2, "num_heads": 2, "head_dim": 16},
        "calibration": {"prompts": 3},
        "default": {"strategy": "dense"},
        "schedule": {"dense_first": 0.25, "dense_layers": [0], "refresh_interval": 3},
        "modules": {
            "blocks.0.attn1": {"strategy": "diagonal", "window": [1, 0.25, 2]},
            "blocks.1.attn1": [{"strategy": "skip"},
                               {"strategy": "block_adaptive", "tau": 0.8, "rescale": True, "fp8": True}],
        },
    }
    data.update(overrides)
    return data


def test_round_trip(tmp_path):
    plan = SparsePlan.from_json(plan_json())
    path = plan.save(tmp_path / "p.json")
    again = SparsePlan.load(path)
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert again.strategy_for("blocks.0.attn1", 1) == "diagonal"
    assert again.strategy_for("blocks.1.attn1", 0) == "skip"
    spec = again.spec_for("blocks.1.attn1", 1)
    assert spec.rescale and spec.fp8 and spec.param_dict["tau"] == 0.8
    assert spec.param_dict["cap"] == 0.25  # default filled in
    assert again.strategy_for("blocks.9.attn1", 0) == "dense"  # the default where the plan says nothing
    assert again.schedule == Schedule(0.25, 0, (0,), 3)


def test_int_and_float_windows_survive_json(tmp_path):
    plan = SparsePlan.from_json(plan_json())
    window = SparsePlan.load(plan.save(tmp_path / "p.json")).spec_for("blocks.0.attn1", 0).param_dict["window"]
    assert window == (1, 0.25, 2) and isinstance(window[0], int) and isinstance(window[1], float)


@pytest.mark.parametrize(
    "mutate,path_fragment",
    [
        (lambda d: d["modules"]["blocks.0.attn1"].update(strategy="wiggle"), "$.modules['blocks.0.attn1'].strategy"),
        (lambda d: d["modules"]["blocks.0.attn1"].update(window=[1, 2]), "$.modules['blocks.0.attn1'].window"),
        (lambda d: d["modules"]["blocks.0.attn1"].update(window=[1, 2.5, 1]), "$.modules['blocks.0.attn1'].window"),
        (lambda d: d["modules"]["blocks.0.attn1"].update(widow=[1, 1, 1]), "$.modules['blocks.0.attn1'].widow"),
        (lambda d: d["modules"]["blocks.1.attn1"][1].update(tau=1.5), "$.modules['blocks.1.attn1'][1].tau"),
        (lambda d: d["modules"]["blocks.1.attn1"][0].update(rescale=True), "$.modules['blocks.1.attn1'][0].rescale"),
        (lambda d: d["modules"]["blocks.1.attn1"][0].update(strategy="reuse", rescale=True),
         "$.modules['blocks.1.attn1'][0].rescale"),
        (lambda d: d["modules"]["blocks.1.attn1"][0].update(strategy="reuse", fp8=True),
         "$.modules['blocks.1.attn1'][0].fp8"),
        (lambda d: d["modules"]["blocks.1.attn1"].append({"strategy": "dense"}), "$.modules['blocks.1.attn1']"),
        (lambda d: d["schedule"].update(dense_first=2), "$.schedule.dense_first"),
        (lambda d: d["schedule"].update(refresh_every=2), "$.schedule.refresh_every"),
        (lambda d: d["schedule"].update(dense_layers=[d["model"]["num_layers"]]), "$.schedule.dense_layers"),
        (lambda d: d["model"].update(num_heads=0), "$.model.num_heads"),
        (lambda d: d.update(version=7), "$.version"),
        (lambda d: d.update(extra=1), "$.extra"),
        (lambda d: d.update(format="other"), "$.format"),
    ],
)
def test_errors_name_the_json_path(mutate, path_fragment):
    data = plan_json()
    mutate(data)
    with pytest.raises(PlanError) as err:
        SparsePlan.from_json(data)
    assert path_fragment in str(err.value)


def test_wrong_head_count_says_both_numbers():
    data = plan_json()
    data["modules"]["blocks.1.attn1"] = [{"strategy": "dense"}] * 3
    with pytest.raises(PlanError, match="3 head strategies, but the model has 2 heads"):
        SparsePlan.from_json(data)


def test_malformed_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "dit-sparse-plan", ')
    with pytest.raises(PlanError, match="not valid JSON"):
        SparsePlan.load(path)
    with pytest.raises(PlanError, match="not found"):
        SparsePlan.load(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="is a directory"):
        SparsePlan.load(tmp_path)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfegarbage")
    with pytest.raises(PlanError, match="not UTF-8"):
        SparsePlan.load(tmp_path / "binary.json")
    with pytest.raises(TypeError, match="from_json"):
        SparsePlan.load(plan_json())


def test_a_head_outside_the_model_is_an_error_not_another_head():
    plan = SparsePlan.from_json(plan_json())
    for head in (-1, plan.model.num_heads):
        with pytest.raises(IndexError, match="does not exist"):
            plan.spec_for("blocks.0.attn1", head)


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(PlanError, match="known: .*block_adaptive.*diagonal"):
        HeadStrategy.make("wiggle")


def test_reuse_forecast_order_is_one_or_two_and_defaults_to_one():
    assert HeadStrategy.make("reuse").param_dict["order"] == 1
    assert HeadStrategy.make("reuse", order=2).param_dict["order"] == 2
    for bad in (0, 3, 1.5, True, "2"):
        with pytest.raises(PlanError, match=r"\$.order: must be 1 or 2"):
            HeadStrategy.make("reuse", order=bad)


def test_save_is_atomic(tmp_path, monkeypatch):
    plan = SparsePlan.from_json(plan_json())
    path = plan.save(tmp_path / "p.json")
    before = path.read_text()

    real_write = Path.write_text

    def half_then_boom(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_boom)
    with pytest.raises(OSError):
        plan.with_schedule(dense_first=0.5).save(path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left behind


def test_saved_plan_has_ordinary_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = SparsePlan.from_json(plan_json()).save(tmp_path / "p.json")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # shareable, not mkstemp's private 0600


def test_builders():
    plan = SparsePlan(MODEL, {}, HeadStrategy.make("dense"))
    plan = plan.with_module("blocks.1.attn1", HeadStrategy.make("diagonal", window=[0, 1, 1]))
    plan = plan.with_schedule(dense_first=0.1)
    assert plan.strategy_for("blocks.1.attn1", 1) == "diagonal"
    assert plan.schedule.dense_first == 0.1
    with pytest.raises(PlanError, match="head strategies for a model with 2 heads"):
        plan.with_module("blocks.0.attn1", [HeadStrategy.make("dense")] * 3)
