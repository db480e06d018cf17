import json

import pytest
import torch
from distill_helpers import make_distiller

import dit_sparse
from dit_sparse.distill.export import load_student, verify_export
from dit_sparse.distill.sigmas import sigma_grid
from dit_sparse.plan import SparsePlan
from dit_sparse.zoo import TinyShapesPipeline


def _generate(pipe, steps, emb, seed=0):
    out = pipe(prompt_embeds=emb, num_inference_steps=steps, guidance_scale=1.0, num_frames=2, height=8, width=8,
               generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.frames


@pytest.mark.parametrize("lora", [0, 4])
def test_export_is_a_pipeline_with_plan_and_the_training_grid(teacher_dir, tmp_path, lora):
    d = make_distiller(teacher_dir, tmp_path / "run", max_steps=2, lora_rank=lora)
    d.train()
    path = d.export()
    assert ({"model_index.json", "plan.json", "distill.json", "transformer", "scheduler"}
            <= {p.name for p in path.iterdir()})
    info = json.loads((path / "distill.json").read_text())
    assert info["student_steps"] == 2 and info["guidance_scale"] == 1.0
    assert info["sigmas"] == sigma_grid(2, 1.0, 0.5).tolist() == [1.0, 0.5, 0.0]
    verify_export(path)
    assert SparsePlan.load(path / "plan.json") == d.plan

    # loadable by the pipeline class, then dit_sparse.apply, like any diffusers pipeline
    pipe = TinyShapesPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(2)
    assert torch.equal(pipe.scheduler.sigmas, sigma_grid(2, 1.0, 0.5))
    weights = d.student_state()
    for k, v in pipe.transformer.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    emb, _ = pipe.encode_prompt(["a red circle moving left on a dark background"], do_classifier_free_guidance=False)
    dit_sparse.apply(pipe, SparsePlan.load(path / "plan.json"), executor="cpu", block_size=(8, 8))
    exported = _generate(pipe, 2, emb)

    # the same samples as the trained student (EMA weights, plan, grid) inside the trainer
    named = d.roles.named_student_parameters()
    with d.ema.applied(named):
        d.roles.new_rollout()
        scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
        ref = _generate(d.samples.pipeline(d.roles.student, scheduler), 2, emb)
    tol = 1e-5 if lora else 0.0  # LoRA is merged into the exported weights
    torch.testing.assert_close(exported, ref, rtol=0, atol=tol)

    # load_student applies the plan with the training executor and block size
    student, info = load_student(path)
    student.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_generate(student, 2, emb), exported, rtol=0, atol=0)


def test_generate_command_runs_the_exported_student(teacher_dir, tmp_path):
    from dit_sparse.cli import main

    d = make_distiller(teacher_dir, tmp_path / "run", max_steps=1)
    d.train()
    path = d.export()
    out = tmp_path / "gen"
    code = main(["generate", "--model", str(path), "--steps", "2", "--guidance", "1", "--plan",
                 str(path / "plan.json"), "--frames", "2", "--height", "8", "--width", "8", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    # (generate applies the plan with the executor's default blocks, dense on this 32-token toy grid)
    assert report["steps"] == 2 and report["frames_shape"] == [2, 8, 8, 3]


def test_the_shipped_coordinate_channel_architecture_distills_and_exports(tmp_path):
    """tiny-shapes ships TinyShapesTransformer (a Wan subclass with coordinate input channels): it must be a valid
    teacher, and its student must export as a pipeline that loads and generates."""
    from dataclasses import replace

    from distill_helpers import FAST_TEACHER

    from dit_sparse.zoo.model import build_pipeline
    from dit_sparse.zoo.transformer import TinyShapesTransformer

    teacher = tmp_path / "coords-teacher"
    build_pipeline(replace(FAST_TEACHER, coordinate_channels=True), seed=0).save_pretrained(str(teacher))
    d = make_distiller(teacher, tmp_path / "run", max_steps=1)
    assert isinstance(d.roles.student, TinyShapesTransformer)
    d.train()
    path = d.export()
    verify_export(path)
    pipe = TinyShapesPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.transformer, TinyShapesTransformer)
    emb = torch.zeros(1, 16, 16)
    frames = _generate(pipe, 2, emb)
    assert frames.shape[1] == 3 and torch.isfinite(frames).all()
