"""What a model adapter is: one model family's token layout and pre-attention math, nothing else."""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

import torch

from ..layout import Grid
from ..plan import ModelFingerprint

# attend(q, k, v, text) -> (B, S, H, D); bound by the processor to the module's plan, grid, step and caches.
AttendFn = Callable[..., torch.Tensor]


class ModelAdapter:
    """Subclasses name their transformer classes, the self-attention modules a plan covers, where the grid
    comes from, and how to turn an attention module's inputs into (q, k, v) and back."""

    family: str = ""
    transformer_classes: tuple[str, ...] = ()
    # Module-name pattern of the self-attentions the plan covers; group 1 is the layer index within its stack.
    covered_pattern: str = ""

    def covered_modules(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        """(module name, layer index) of every covered self-attention, in forward order."""
        found = []
        for name, _ in transformer.named_modules():
            match = re.fullmatch(self.covered_pattern, name)
            if match:
                found.append((name, self.layer_index(name, match)))
        return found

    def layer_index(self, name: str, match: re.Match) -> int:
        return int(match.group(1))

    def fingerprint(self, transformer: torch.nn.Module) -> ModelFingerprint:
        modules = dict(transformer.named_modules())
        names = self.covered_modules(transformer)
        if not names:
            raise ValueError(f"{type(transformer).__name__} has no self-attention module matching "
                             f"{self.covered_pattern!r}")
        attn = modules[names[0][0]]
        heads = attn.heads
        head_dim = self.head_dim(attn)
        return ModelFingerprint(type(transformer).__name__, len(names), heads, head_dim)

    def head_dim(self, attn: torch.nn.Module) -> int:
        return attn.to_q.out_features // attn.heads

    def grid(self, transformer: torch.nn.Module, inputs: inspect.BoundArguments) -> Grid:
        """Video tokens per (frames, rows, cols) for this forward call, from the transformer's own inputs."""
        raise NotImplementedError

    # The family's timestep convention, as its pipeline passes the timestep to the transformer: the value at pure
    # noise, and whether timesteps rise during denoising (Mochi's do). Schedulers count in thousandths throughout.
    timestep_at_pure_noise: float = 1000.0
    timestep_rises: bool = False

    def timestep(self, inputs: inspect.BoundArguments) -> float | None:
        """The timestep of this forward as passed (its largest element: per-token timesteps, as in Wan 2.2's
        expanded ones, give clean conditioning frames 0)."""
        t = inputs.arguments.get("timestep")
        if t is None:
            return None
        return float(torch.as_tensor(t).detach().float().max())

    def noise_level(self, timestep: float | None) -> float | None:
        """The noise level (1 pure noise, 0 a clean sample) of a timestep as this family's pipeline passes it."""
        if timestep is None:
            return None
        level = timestep / self.timestep_at_pure_noise
        return 1.0 - level if self.timestep_rises else level

    def scheduler_noise_levels(self, scheduler) -> list[float] | None:
        """The noise level of every step in a diffusers scheduler's `timesteps` (after set_timesteps)."""
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or not len(timesteps):
            return None
        levels = torch.as_tensor(timesteps).detach().double().flatten() / 1000.0
        return (1.0 - levels if self.timestep_rises else levels).tolist()

    def stock_processor(self, attn: torch.nn.Module):
        """A fresh instance of the processor the family uses for this module (for pass-through)."""
        cls = getattr(attn, "_default_processor_cls", None)
        if cls is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()
        return cls()

    def output_follows_attention(self, attn: torch.nn.Module) -> bool:
        """Whether the module's output depends on its input only through attention, by an affine map (the output
        projection): then a wholly reused module may keep and extrapolate its output instead of its attention's."""
        return True

    def attention(self, attend: AttendFn, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                  rotary=None, **kwargs) -> Any:
        """Redo the family's pre-attention math for a covered module, call `attend`, and finish like the stock
        processor (output projection, splitting text back out)."""
        raise NotImplementedError


def patched_grid(shape: tuple[int, int, int], patch: tuple[int, int, int]) -> Grid:
    frames, height, width = shape
    pt, ph, pw = patch
    return Grid(-(-frames // pt), height // ph, width // pw)


def project_heads(attn, hidden_states: torch.Tensor):
    """q, k, v (B, S, H, D) from a diffusers attention's to_q/to_k/to_v, with its per-head q/k norms."""
    return _heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))


def project_added_heads(attn, encoder_hidden_states: torch.Tensor):
    """The text stream's q, k, v (B, S, H, D) of a joint attention (add_*_proj, norm_added_*)."""
    return _heads(attn, encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                  (attn.norm_added_q, attn.norm_added_k))


def _heads(attn, states: torch.Tensor, projections, norms):
    query, key, value = (proj(states).unflatten(2, (attn.heads, -1)) for proj in projections)
    norm_q, norm_k = norms
    return (query if norm_q is None else norm_q(query)), (key if norm_k is None else norm_k(key)), value


def two_stack_modules(transformer, pattern: str) -> list[tuple[str, int]]:
    """Double-stream blocks (`transformer_blocks`) numbered first, then the single-stream stack after them.

    `pattern` must capture the stack name as group 1 and the index within it as group 2.
    """
    double, single = [], []
    for name, _ in transformer.named_modules():
        match = re.fullmatch(pattern, name)
        if match:
            (double if match.group(1) == "transformer_blocks" else single).append((name, int(match.group(2))))
    offset = len(transformer.transformer_blocks)
    return double + [(n, offset + i) for n, i in single]
