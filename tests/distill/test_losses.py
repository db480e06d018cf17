import math

import torch
from distill_helpers import make_distiller

from dit_sparse.distill import losses as L
from dit_sparse.distill import trainer as T


def _assert_proportional(grad: torch.Tensor, direction: torch.Tensor):
    """Per sample: grad = alpha * direction with alpha > 0."""
    for gs, ds in zip(grad.flatten(1), direction.flatten(1)):
        alpha = float(gs @ ds / (ds @ ds))
        assert alpha > 0
        torch.testing.assert_close(gs, alpha * ds, atol=1e-6 * float(gs.abs().max()) + 1e-12, rtol=1e-4)


def test_student_gradient_is_proportional_to_fake_minus_real():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 2, 4, 4, generator=g).requires_grad_(True)
    x0_real = torch.randn(3, 3, 2, 4, 4, generator=g)
    x0_fake = x0_real + 0.1 * torch.randn(3, 3, 2, 4, 4, generator=g)
    for c in (0.0, L.default_huber_c(x0.shape[1:]), 3.0):
        x0.grad = None
        loss, direction = L.student_loss(x0, x0_real, x0_fake, c)
        loss.backward()
        _assert_proportional(x0.grad, x0_fake - x0_real)
        # the normalisation is per sample: mean |x0 - x0_real|
        scale = (x0.detach() - x0_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(direction, (x0_fake - x0_real) / scale)
        # pseudo-Huber gradient: g / (B sqrt(||g||^2 + c^2))
        norm = direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(x0.grad, direction / (3 * torch.sqrt(norm ** 2 + c * c)))


def test_pseudo_huber_and_fake_loss_values():
    d = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(L.pseudo_huber(d, 0.0), torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(L.pseudo_huber(d, 1.0), torch.tensor([math.sqrt(26) - 1, 0.0]))
    assert abs(L.default_huber_c((3, 2, 8, 8)) - 0.00054 * math.sqrt(384)) < 1e-12
    x0, x_t = torch.randn(2, 3, 1, 2, 2), torch.randn(2, 3, 1, 2, 2)
    t = torch.tensor([0.3, 0.7])
    exact = (x_t - x0) / t.view(-1, 1, 1, 1, 1)
    assert float(L.fake_score_loss(exact, x_t, x0, t)) < 1e-12
    assert abs(float(L.fake_score_loss(exact + 1.0, x_t, x0, t)) - 1.0) < 1e-5


def test_student_update_in_the_trainer_pushes_along_fake_minus_real(teacher_dir, tmp_path, monkeypatch):
    """Inside a real student update, d loss / d x0 is proportional to (x0_fake - x0_real) for every sample."""
    seen = {}
    original = T.student_loss

    def spy(x0, x0_real, x0_fake, c):
        x0.retain_grad()
        seen.update(x0=x0, real=x0_real, fake=x0_fake)
        return original(x0, x0_real, x0_fake, c)

    monkeypatch.setattr(T, "student_loss", spy)
    d = make_distiller(teacher_dir, tmp_path, fake_updates=1)
    d.fake_update(0, 0)  # the fake score differs from the teacher after an update, so the direction is not zero
    d.student_update(0)
    assert float((seen["fake"] - seen["real"]).abs().max()) > 0
    _assert_proportional(seen["x0"].grad, seen["fake"] - seen["real"])
