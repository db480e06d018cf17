"""TDM losses: the fake score's regression on the student's samples, and the student's distribution-matching loss.

Shapes: samples (B, ...); every loss is a scalar mean over the batch.
"""

from __future__ import annotations

import math

import torch

from .sigmas import velocity_target

HUBER_SCALE = 0.00054  # c = 0.00054 sqrt(d), as in consistency-model training (Song & Dhariwal 2023)


def fake_score_loss(v_fake: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """|| F(x_t) - (x_t - x0) / t ||^2, mean over every element: denoising score matching on the student's x0."""
    target = velocity_target(x_t.float(), x0.float(), t)
    return torch.mean((v_fake.float() - target) ** 2)


def default_huber_c(sample_shape) -> float:
    """c = 0.00054 sqrt(d) for samples with d = prod(sample_shape) elements."""
    return HUBER_SCALE * math.sqrt(math.prod(sample_shape))


def pseudo_huber(d: torch.Tensor, c: float) -> torch.Tensor:
    """Per sample sqrt(||d||^2 + c^2) - c, shape (B,). Its gradient is d / sqrt(||d||^2 + c^2)."""
    sq = d.float().flatten(1).pow(2).sum(1)
    return torch.sqrt(sq + c * c) - c


def matching_direction(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                       eps: float = 1e-8) -> torch.Tensor:
    """g = (x0_fake - x0_real) / mean|x0 - x0_real| per sample (the normalised DMD gradient), no grad, (B, ...)."""
    with torch.no_grad():
        x0, x0_real, x0_fake = x0.float(), x0_real.float(), x0_fake.float()
        scale = (x0 - x0_real).abs().flatten(1).mean(1).clamp_min(eps)
        return (x0_fake - x0_real) / scale.view(-1, *([1] * (x0.ndim - 1)))


def student_loss(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, c: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_G = pseudo_huber(x0 - stopgrad(x0 - g)), mean over the batch; returns (loss, g).

    The value of x0 - stopgrad(x0 - g) is g, so dL/dx0 = g / (B sqrt(||g||^2 + c^2)) per sample: the student's
    gradient is proportional to (x0_fake - x0_real) and moves x0 towards the teacher's prediction. The loss value
    is a surrogate (about ||g||) and is not expected to fall; judge the run by the fake-score loss and samples.
    """
    g = matching_direction(x0, x0_real, x0_fake)
    target = (x0.float() - g).detach()
    return pseudo_huber(x0.float() - target, c).mean(), g
