"""Engine options: gradient checkpointing, gradient accumulation, mixed precision, stochastic rollouts."""

import pytest
import torch
from distill_helpers import make_distiller


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_gradient_checkpointing_gives_the_same_updates(teacher_dir, tmp_path):
    plain = make_distiller(teacher_dir, tmp_path / "a")
    ckpt = make_distiller(teacher_dir, tmp_path / "b", gradient_checkpointing=True)
    assert ckpt.roles.student.gradient_checkpointing and ckpt.roles.fake.gradient_checkpointing
    a, b = plain.train_step(), ckpt.train_step()
    assert a["loss_fake"] == pytest.approx(b["loss_fake"], rel=1e-5)
    assert a["loss_student"] == pytest.approx(b["loss_student"], rel=1e-5)
    pa, pb = _params(plain.roles.student), _params(ckpt.roles.student)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_draws_one_batch_per_micro_step(teacher_dir, tmp_path):
    d = make_distiller(teacher_dir, tmp_path, grad_accum=2, batch_size=1)
    drawn = []
    original = d.draw

    def spy(g):
        batch = original(g)
        drawn.append(batch.x.shape[0])
        return batch

    d.draw = spy
    rec = d.train_step()
    assert drawn == [1] * (2 * (d.cfg.fake_updates + 1))
    assert rec["step"] == 1 and d.opt_g.state_dict()["state"]  # one optimizer step after two micro-batches


def test_bf16_mixed_precision_and_stochastic_rollout_train(teacher_dir, tmp_path):
    d = make_distiller(teacher_dir, tmp_path, mixed_precision="bf16", eta=0.0)
    assert d.roles.teacher.dtype == torch.bfloat16  # the frozen teacher is held in half precision
    rec = d.train_step()
    assert all(torch.isfinite(torch.tensor(rec[k])) for k in ("loss_fake", "loss_student"))
    assert d.step_scheduler.config.stochastic_sampling  # eta = 0 ships the fresh-noise sampler
