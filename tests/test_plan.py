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


# -- files that are not plain plan documents -----------------------------------------------------------------------
@pytest.mark.parametrize("text,key", [
    ('{"format": "dit-sparse-plan", "format": "dit-sparse-plan"}', "format"),
    # a `skip` entry above the real one used to be dropped silently: the last one won
    ('{"modules": {"blocks.0.attn1": {"strategy": "skip"}, "blocks.0.attn1": {"strategy": "dense"}}}',
     "blocks.0.attn1"),
    ('{"modules": {"blocks.0.attn1": {"strategy": "diagonal", "window": [1, 1, 1], "window": [0, 1, 1]}}}',
     "window"),
])
def test_a_key_given_twice_anywhere_is_an_error_naming_it(tmp_path, text, key):
    path = tmp_path / "dup.plan.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=f"duplicate key '{key}'"):
        SparsePlan.load(path)


@pytest.mark.parametrize("text,message", [
    ('{"version": ' + "9" * 5000 + "}", "not a usable JSON document"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_absurd_json_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "odd.plan.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=message):
        SparsePlan.load(path)


def test_devices_and_pipes_are_refused_before_reading(tmp_path):
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    for path in (fifo, Path("/dev/zero")):  # /dev/zero would be read until the memory runs out
        with pytest.raises(PlanError, match="not a regular file"):
            SparsePlan.load(path)


# -- the schedule's two units --------------------------------------------------------------------------------------
LEVELS = [1.0, 0.9, 0.75, 0.6, 0.45, 0.3, 0.2, 0.1]


@pytest.mark.parametrize("first,last", [(0.0, 0), (0.25, 0), (0.3, 2), (0.0, 3), (1.0, 0), (0.0, 8), (0.5, 5)])
def test_in_noise_units_runs_exactly_the_same_steps_dense(first, last):
    steps = Schedule(dense_first=first, dense_last_steps=last)
    noise = steps.in_noise_units(LEVELS)
    assert not noise.counts_steps and noise.calibrated_noise == tuple(LEVELS)
    assert [noise.dense_at_noise(v) for v in LEVELS] == [steps.dense_at_step(i, len(LEVELS))
                                                        for i in range(len(LEVELS))]
    # A timestep rounded on its way to the transformer (bf16 keeps about 3 significant digits) lands alike.
    assert [noise.dense_at_noise(v * (1 + 3e-3)) for v in LEVELS[1:]] == [noise.dense_at_noise(v)
                                                                          for v in LEVELS[1:]]


def test_a_version_2_schedule_round_trips_and_says_which_steps_run_dense(tmp_path):
    plan = SparsePlan.from_json(plan_json(schedule={"dense_first": 0.25, "dense_last_steps": 1}))
    noise = SparsePlan(plan.model, plan.modules, plan.default, plan.schedule.in_noise_units(LEVELS))
    again = SparsePlan.load(noise.save(tmp_path / "p.json"))
    assert again == noise and again.to_json()["version"] == 2
    assert again.schedule.dense_steps_text().endswith("8-step grid it was measured on: steps 0, 1, 7")
    assert "counted in steps" in plan.schedule.dense_steps_text()


def test_version_1_files_keep_their_meaning_and_refuse_version_2_keys():
    v1 = SparsePlan.from_json(plan_json())
    assert v1.schedule.counts_steps and v1.schedule.dense_first == 0.25
    with pytest.raises(PlanError, match=r"\$.schedule.dense_above: unknown key in a version 1 plan"):
        SparsePlan.from_json(plan_json(schedule={"dense_above": 0.8}))
    with pytest.raises(PlanError, match="use one unit"):
        SparsePlan.from_json(plan_json(version=2, schedule={"dense_first": 0.2, "dense_above": 0.8}))
    with pytest.raises(PlanError, match="dense_below: must be a noise level"):
        SparsePlan.from_json(plan_json(version=2, schedule={"dense_below": 1.5}))
    with pytest.raises(PlanError, match="reads versions 1, 2"):
        SparsePlan.from_json(plan_json(version=3))
