"""Slow (still in CI): distillation really works on a teacher trained in the test on a toy multi-mode task.

A K=2 student running a sparse plan (layer 0 dense, layer 1 frame-local), after a few hundred TDM steps, is
closer to the teacher's 50-step sample distribution than the teacher's own 2-step sampling, measured by energy
distance between sample sets (not per-sample error: distribution matching may send a noise to another mode).
"""

import time

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from toy import TOY_PROMPTS, TOY_SHAPE, sample, train_toy_teacher

from dit_sparse.distill import DistillConfig, Distiller
from dit_sparse.distill.export import load_student
from dit_sparse.distill.metrics import energy_distance
from dit_sparse.plan import SparsePlan

GUIDANCE = 2.0
N = 256  # samples per prompt and set


def _sets(fn, emb, seed):
    out = []
    for p in range(len(TOY_PROMPTS)):
        g = torch.Generator().manual_seed(seed + p)
        noise = torch.randn(N, *TOY_SHAPE, generator=g)
        out.append(fn(emb[p:p + 1].expand(N, -1, -1), noise))
    return out


def _distance(a_sets, b_sets):
    return sum(energy_distance(a, b) for a, b in zip(a_sets, b_sets)) / len(a_sets)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sparse_two_step_student_beats_two_step_teacher_in_energy_distance(tmp_path):
    torch.manual_seed(0)
    start = time.time()
    pipe, _, emb, neg = train_toy_teacher(steps=800, lr=2e-3, seed=0)
    teacher_dir = tmp_path / "teacher"
    pipe.save_pretrained(str(teacher_dir))
    plan = SparsePlan.uniform(pipe.transformer, "diagonal", window=[0, 1, 1]).with_schedule(dense_layers=(0,))
    plan.save(tmp_path / "plan.json")
    (tmp_path / "prompts.txt").write_text("\n".join(TOY_PROMPTS) + "\n")
    trained = time.time()

    cfg = DistillConfig(teacher=str(teacher_dir), plan=str(tmp_path / "plan.json"), block_size=[8, 8],
                        executor="cpu", student_steps=2, guidance=GUIDANCE, prompts=str(tmp_path / "prompts.txt"),
                        frames=2, height=8, width=8, max_steps=250, batch_size=16, fake_updates=3, lr=2e-5,
                        fake_lr=2e-4, ema_decay=0.0, out=str(tmp_path / "run"), checkpoint_every=0,
                        validation=False, seed=0)
    result = Distiller(cfg, progress=False).train()
    distilled = time.time()

    student, info = load_student(result["export"])
    assert student.transformer.attn_processors["blocks.1.attn1.processor"].__class__.__name__ == "SparseProcessor"
    student.set_progress_bar_config(disable=True)
    teacher = pipe.transformer
    stock = FlowMatchEulerDiscreteScheduler(shift=1.0)
    stock.set_timesteps(50)
    grid50 = stock.sigmas.tolist()
    stock.set_timesteps(2)
    stock2 = stock.sigmas.tolist()

    def run_student(e, noise):
        with torch.no_grad():
            return student(prompt_embeds=e, latents=noise, num_inference_steps=2, guidance_scale=1.0,
                           num_frames=2, height=8, width=8, output_type="latent").frames

    ref = _sets(lambda e, n: sample(teacher, e, neg, grid50, GUIDANCE, n), emb, 100)
    ref_again = _sets(lambda e, n: sample(teacher, e, neg, grid50, GUIDANCE, n), emb, 200)
    teacher_2_grid = _sets(lambda e, n: sample(teacher, e, neg, info["sigmas"], GUIDANCE, n), emb, 200)
    teacher_2_stock = _sets(lambda e, n: sample(teacher, e, neg, stock2, GUIDANCE, n), emb, 200)
    students = _sets(run_student, emb, 200)
    d = {
        "teacher 50 steps, independent set (noise floor)": _distance(ref, ref_again),
        "student, 2 steps, sparse, CFG 1": _distance(ref, students),
        "teacher, 2 steps on the student's grid": _distance(ref, teacher_2_grid),
        "teacher, 2 steps on its own scheduler": _distance(ref, teacher_2_stock),
    }
    print(f"\nenergy distance to the teacher's 50-step samples (guidance {GUIDANCE}, {N} samples x "
          f"{len(TOY_PROMPTS)} prompts); teacher training {trained - start:.0f}s, distillation "
          f"{distilled - trained:.0f}s, total {time.time() - start:.0f}s")
    for name, value in d.items():
        print(f"  {name:<50} {value:.4f}")
    assert d["student, 2 steps, sparse, CFG 1"] < d["teacher, 2 steps on the student's grid"]
    assert d["student, 2 steps, sparse, CFG 1"] < d["teacher, 2 steps on its own scheduler"]
