"""Flow-matching maths computed directly from sigma, and the student's sigma grid.

Convention (rectified flow, as diffusers' FlowMatchEulerDiscreteScheduler and Wan): a sample at noise level
sigma in [0, 1] is ``x = (1 - sigma) x0 + sigma eps``; the network predicts the velocity ``v = eps - x0`` and is
called with ``timestep = 1000 sigma``. Every function here takes sigma itself: nothing is looked up by integer
timestep in a scheduler (a public implementation that did so silently got sigma ~ 0.006 for integers the
multistep scheduler did not hold).

Shapes: samples are (B, C, F, H, W) (any (B, ...) works); sigmas are python floats, 0-d tensors or (B,) tensors
and are broadcast over the sample dimensions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def _b(sigma, like: torch.Tensor) -> torch.Tensor:
    """sigma as a tensor broadcastable against `like` (B, ...), in float32 on its device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if s.ndim == 0:
        return s
    return s.reshape(-1, *([1] * (like.ndim - 1)))


def timestep(sigma, batch: int | None = None, device=None) -> torch.Tensor:
    """The network's timestep for sigma: ``1000 * sigma`` computed in float32 (as the scheduler does), shape (B,)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    t = s * NUM_TRAIN_TIMESTEPS
    if batch is not None and t.ndim == 0:
        t = t.expand(batch)
    return t


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps."""
    s = _b(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching target: v = eps - x0."""
    return eps - x0


def pred_x0_eps(v: torch.Tensor, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """From a velocity prediction at (x, sigma): x0 = x - sigma v, eps = x + (1 - sigma) v."""
    s = _b(sigma, x)
    return x - s * v, x + (1 - s) * v


def x0_from(v: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x - sigma v."""
    return x - _b(sigma, x) * v


def velocity_target(x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """The velocity that maps x_t at level t back to x0: (x_t - x0) / t (the fake score's regression target)."""
    return (x_t - x0) / _b(t, x_t)


def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma_next, eta: float, z: torch.Tensor | None = None) -> torch.Tensor:
    """One step of the student's rollout: ``(1 - s') x0 + s' (eta eps + sqrt(1 - eta^2) z)``.

    eta = 1 is the deterministic Euler step of FlowMatchEulerDiscreteScheduler; eta = 0 is its
    ``stochastic_sampling`` step (fresh noise z).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    noise = eps if eta == 1.0 else eta * eps + math.sqrt(1.0 - eta * eta) * z
    return add_noise(x0, noise, sigma_next)


def diffuse(x_mid: torch.Tensor, sigma_mid, t, z: torch.Tensor) -> torch.Tensor:
    """Move a sample at level sigma_mid to a higher level t >= sigma_mid along the forward process.

    With r = (1 - t) / (1 - sigma_mid): x_t = r x_mid + sqrt(t^2 - (r sigma_mid)^2) z. If x_mid = (1 - s) x0 +
    s n, then x_t has mean (1 - t) x0 and standard deviation t around it (the same marginal as adding noise to x0
    at level t directly).
    """
    s = _b(sigma_mid, x_mid)
    tt = _b(t, x_mid)
    r = (1 - tt) / (1 - s)
    extra = (tt * tt - (r * s) ** 2).clamp_min(0.0).sqrt()
    return r * x_mid + extra * z


def sample_in_interval(low, high, u: torch.Tensor, min_sigma: float = 0.0) -> torch.Tensor:
    """t = max(low, min_sigma) + (high - max(low, min_sigma)) u for u in [0, 1): inside [low, high), shape of u.

    min_sigma keeps t away from 0 in the last interval, where the fake score's target (x_t - x0) / t divides by t.
    """
    lo = torch.clamp(torch.as_tensor(low, dtype=torch.float32, device=u.device), min=min_sigma)
    hi = torch.as_tensor(high, dtype=torch.float32, device=u.device)
    return lo + (hi - lo) * u


# -- the student's sigma grid ---------------------------------------------------------------------------------
def shift_sigma(u, shift: float):
    """The scheduler's static shift: shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def closed_form_grid(num_steps: int, shift: float = 1.0, terminal: float | None = None) -> list[float]:
    """The step boundaries in exact arithmetic (float64), for checking: K + 1 values from 1 down to 0.

    The scheduler starts from a linear ramp between sigma_max = 1 and its smallest training sigma (1/1000
    shifted), shifts it, and with `terminal` stretches it affinely in (1 - sigma) so that the last level is
    `terminal`. At shift 1 and terminal 1/K this is 1, (K-1)/K, ..., 1/K, 0.
    """
    n = NUM_TRAIN_TIMESTEPS
    smin = shift_sigma(1.0 / n, shift)
    ramp = [1.0 + (smin - 1.0) * k / (num_steps - 1) for k in range(num_steps)] if num_steps > 1 else [1.0]
    shifted = [shift_sigma(u, shift) for u in ramp]
    if terminal:
        scale = (1 - shifted[-1]) / (1 - terminal)
        shifted = [1 - (1 - s) / scale for s in shifted]
    return shifted + [0.0]


def sigma_grid(num_steps: int, shift: float = 1.0, terminal: float | None = None) -> torch.Tensor:
    """The student's K + 1 step boundaries sigma_0 = 1 > ... > sigma_{K-1} > sigma_K = 0, float32 (K + 1,).

    Bit-identical to ``make_scheduler(K, shift, terminal)`` after ``set_timesteps(K)`` (``scheduler.sigmas``): the
    same float64 ramp, shift and stretch, rounded to float32 once, so the exported sampler visits exactly the
    levels the student was trained at.
    """
    if num_steps < 1:
        raise ValueError(f"the student needs at least one step, got {num_steps}")
    if terminal is not None and not 0.0 < terminal < 1.0:
        raise ValueError(f"terminal sigma must be in (0, 1), got {terminal}")
    if terminal and num_steps == 1:
        raise ValueError("a one-step grid has no terminal level to stretch to; leave terminal unset")
    n = NUM_TRAIN_TIMESTEPS
    # The scheduler's sigma_min is its smallest training sigma computed in float32 torch ops, then read back.
    ends = torch.tensor([float(n), 1.0], dtype=torch.float32) / n
    ends = shift * ends / (1 + (shift - 1) * ends)
    sigma_max, sigma_min = float(ends[0]), float(ends[1])
    ts = np.linspace(sigma_max * n, sigma_min * n, num_steps)
    sig = ts / n
    sig = shift * sig / (1 + (shift - 1) * sig)
    if terminal:
        one_minus = 1 - sig
        sig = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    grid = torch.from_numpy(sig).to(torch.float32)
    return torch.cat([grid, torch.zeros(1)])


def default_terminal(num_steps: int) -> float | None:
    """Evenly spaced levels 1, (K-1)/K, ..., 1/K at shift 1 (the stock ramp would spend its last step at 0.001)."""
    return 1.0 / num_steps if num_steps > 1 else None


def make_scheduler(num_steps: int, shift: float = 1.0, terminal: float | None = None, stochastic: bool = False):
    """A FlowMatchEulerDiscreteScheduler whose ``set_timesteps(num_steps)`` reproduces ``sigma_grid`` exactly."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift,
                                                shift_terminal=terminal, stochastic_sampling=stochastic)
    scheduler.set_timesteps(num_steps)
    return scheduler


def check_scheduler(scheduler, num_steps: int, grid: torch.Tensor) -> None:
    """Raise if `scheduler` at `num_steps` steps does not visit exactly the training grid."""
    scheduler.set_timesteps(num_steps)
    sig = scheduler.sigmas.detach().cpu().to(torch.float32)
    if sig.shape != grid.shape or not torch.equal(sig, grid):
        raise ValueError(f"the scheduler's sigmas {sig.tolist()} differ from the training grid {grid.tolist()}")
    if not torch.equal(scheduler.timesteps.detach().cpu().float(), timestep(grid[:-1])):
        raise ValueError("the scheduler's timesteps are not 1000 x the training sigmas")
