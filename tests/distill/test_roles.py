"""Which network runs the plan, and parameter isolation between the three roles."""

import pytest
import torch
from distill_helpers import make_distiller

from dit_sparse.processor import SparseProcessor


def _count_forwards(module):
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    return counter, module.register_forward_pre_hook(hook)


def _processors(module):
    return [m.processor for m in module.modules() if hasattr(m, "processor") and hasattr(m, "to_q")]


def test_plan_runs_in_every_student_forward_and_in_no_teacher_or_fake_forward(teacher_dir, tmp_path):
    d = make_distiller(teacher_dir, tmp_path, fake_updates=2)
    roles = d.roles
    covered = len(d.plan.modules)
    assert covered == 2
    # only the student's self-attention carries the plan
    assert all(not isinstance(p, SparseProcessor) for p in _processors(roles.teacher) + _processors(roles.fake))
    student_attn1 = [m.processor for n, m in roles.student.named_modules() if n.endswith("attn1")]
    assert student_attn1 and all(isinstance(p, SparseProcessor) for p in student_attn1)

    counts = {}
    handles = []
    for name, module in (("student", roles.student), ("teacher", roles.teacher), ("fake", roles.fake)):
        counts[name], h = _count_forwards(module)
        handles.append(h)
    before = roles.sparse_calls
    for _ in range(2):
        d.train_step()
    for h in handles:
        h.remove()
    assert counts["student"]["n"] > 0 and counts["teacher"]["n"] > 0 and counts["fake"]["n"] > 0
    # every student forward ran the plan in every covered layer; teacher and fake forwards added nothing
    assert roles.sparse_calls - before == covered * counts["student"]["n"]
    # the density the processor executed is below dense: the plan was really sparse
    assert roles.processor.stats.executed_density < 0.99

    # direct calls: a teacher or fake forward never touches the plan
    x, emb = torch.randn(2, 3, 2, 8, 8), d.embeds[:2]
    before = roles.sparse_calls
    roles.teacher_velocity(x, torch.tensor([0.5, 0.7]), emb, d.negative, 3.0)
    with torch.no_grad():
        roles.fake_velocity(x, 0.5, emb, wrapped=False)
    assert roles.sparse_calls == before
    with torch.no_grad():
        roles.student_velocity(x, d.sigmas[1], emb)
    assert roles.sparse_calls == before + covered


def test_all_dense_plan_student_equals_teacher_exactly(teacher_dir, tmp_path):
    d = make_distiller(teacher_dir, tmp_path, plan="dense")
    x, emb = torch.randn(2, 3, 2, 8, 8), d.embeds[:2]
    with torch.no_grad():
        for sigma in d.sigmas[:-1]:
            a = d.roles.student_velocity(x, sigma, emb)
            b = d.roles.student_velocity(x, sigma, emb, wrapped=True)
            t = d.roles.teacher_velocity(x, sigma, emb, None, 1.0)
            assert torch.equal(a, t) and torch.equal(b, t)
    assert d.roles.sparse_calls > 0  # the (dense) plan still ran in the student


def test_sparse_plan_changes_the_student(teacher_dir, tmp_path):
    d = make_distiller(teacher_dir, tmp_path)
    x, emb = torch.randn(2, 3, 2, 8, 8), d.embeds[:2]
    with torch.no_grad():
        s = d.roles.student_velocity(x, 0.5, emb)
        t = d.roles.teacher_velocity(x, 0.5, emb, None, 1.0)
    assert float((s - t).abs().max()) > 1e-4


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(module, snap):
    return any(not torch.equal(v, snap[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("lora", [0, 4])
def test_parameter_isolation(teacher_dir, tmp_path, lora):
    d = make_distiller(teacher_dir, tmp_path, lora_rank=lora)
    roles = d.roles
    teacher_params = [p for n, p in roles.teacher.named_parameters() if "lora_" not in n]
    assert teacher_params and all(not p.requires_grad for p in teacher_params)
    teacher = {n: p.detach().clone() for n, p in roles.teacher.named_parameters() if "lora_" not in n}
    if lora:
        assert roles.student is roles.teacher  # the teacher is the base model with adapters off
        assert {n for n, _ in roles.named_student_parameters()} and all(
            "lora_" in n for n, _ in roles.named_student_parameters())

    def teacher_unchanged():
        for n, p in roles.teacher.named_parameters():
            if "lora_" not in n:
                assert torch.equal(p, teacher[n]), n
                assert p.grad is None, n

    student, fake = _snapshot(roles.student), _snapshot(roles.fake)
    d.fake_update(0, 0)
    assert _changed(roles.fake, fake)
    assert not _changed(roles.student, student)
    teacher_unchanged()
    assert all(p.grad is None for p in roles.student.parameters())

    fake = _snapshot(roles.fake)
    d.student_update(0)
    assert _changed(roles.student, student)
    assert not _changed(roles.fake, fake)
    assert all(p.grad is None for p in roles.fake.parameters())
    teacher_unchanged()

    for _ in range(2):
        d.train_step()
    teacher_unchanged()


def test_lora_student_starts_as_teacher_and_teacher_calls_skip_plan_and_adapters(teacher_dir, tmp_path):
    d = make_distiller(teacher_dir, tmp_path, plan="dense", lora_rank=4)
    roles = d.roles
    x, emb = torch.randn(2, 3, 2, 8, 8), d.embeds[:2]
    with torch.no_grad():
        assert torch.equal(roles.student_velocity(x, 0.5, emb), roles.teacher_velocity(x, 0.5, emb, None, 1.0))
    d.train_step()
    calls = roles.sparse_calls
    with torch.no_grad():
        s = roles.student_velocity(x, 0.5, emb)
        t = roles.teacher_velocity(x, 0.5, emb, None, 1.0)
        s_again = roles.student_velocity(x, 0.5, emb)
    assert float((s - t).abs().max()) > 0  # the adapters moved the student, and were off for the teacher
    assert torch.equal(s, s_again)  # and are back on afterwards, with the plan
    assert roles.sparse_calls == calls + 2 * len(d.plan.modules)


def test_a_plan_that_reuses_outputs_across_steps_is_refused(teacher_dir, tmp_path):
    from dit_sparse.distill.roles import RoleError

    with pytest.raises(RoleError, match="reuses attention outputs across denoising steps"):
        make_distiller(teacher_dir, tmp_path, plan="reuse")
