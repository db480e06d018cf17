"""The small stateful pieces of a distillation run that every checkpoint saves (the EMA of the student, the
counters), one micro-batch's random draws, and the seeds and learning-rate warm-up they come from."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch


class EMA:
    """Exponential moving average of the student's trainable parameters (fp32 shadows, warm-up (1+n)/(10+n))."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for n, p in named_params:
            self.shadow[n].lerp_(p.detach().float(), 1 - d)

    @contextlib.contextmanager
    def applied(self, named_params):
        """Temporarily put the averages into the parameters."""
        saved = {n: p.detach().clone() for n, p in named_params}
        with torch.no_grad():
            for n, p in named_params:
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named_params:
                    p.copy_(saved[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


class TrainState:
    """Counters that must survive a resume."""

    def __init__(self):
        self.step = 0
        self.fake_updates = 0
        self.elapsed = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "fake_updates": self.fake_updates, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.fake_updates, self.elapsed = state["step"], state["fake_updates"], state["elapsed"]


@dataclass
class Batch:
    emb: torch.Tensor  # (B, L, D)
    k: int  # the rollout step whose prediction is used
    x: torch.Tensor  # (B, C, F, H, W) initial noise
    rollout_noise: list[torch.Tensor] | None  # fresh noise per re-noise (eta < 1)
    u: torch.Tensor  # (B,) uniform, places t in its interval
    z: torch.Tensor  # (B, C, F, H, W) noise of the diffusion to t


def seed_of(*parts: int) -> int:
    """One 63-bit seed from integers (seed, step, phase, ...): distinct parts give independent streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def lr_lambda(warmup: int):
    """LambdaLR factor: a linear warm-up over `warmup` scheduler steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
