"""What a model adapter is: one model family's token layout and pre-attention math, nothing else.

The contract a model family provides (tests/adapters/adapter_checks.py is its test):

- `transformer_classes`, the diffusers classes it serves, and `covered_pattern`, the names of the self-attention
  modules a plan covers (group "layer", or group 1, the layer index; see `covered_modules` for two stacks);
- `grid(transformer, inputs)`: the video token grid of a forward, from the transformer's own arguments
  (`latent_grid` gives it for latents patchified by a fixed patch size);
- `attention(attend, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, *, tokens, **kwargs)`:
  redo the family's pre-attention math for a covered module from what diffusers passed its processor, call
  `attend(q, k, v, text)` with (B, S, H, D) tensors and, for a joint sequence, the TextTokens saying where its text
  sits, and finish as the stock processor does. `tokens` is the call's TokenLayout: the grid and how many video
  tokens the sequence holds;
- `sees_text(...)`: whether that call's attention sees text tokens, before it runs (the default reads it off the
  inputs); and where the family differs from the defaults, its timestep convention, stock processor and whether a
  module's output follows its attention affinely.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..layout import Grid
from ..plan import ModelFingerprint

# attend(q, k, v, text=None) -> (B, S, H, D): the module's plan, bound by the processor to its grid, step and state.
AttendFn = Callable[..., torch.Tensor]


def _square_patch(config) -> tuple[int, int, int]:
    return 1, config.patch_size, config.patch_size


@dataclass(frozen=True)
class LatentGrid:
    """A grid read off the latents' shape over a fixed patch: the `axes` of hidden_states that hold frames, rows and
    columns (None: the latents have one frame), and `patch(config)`, the (frames, rows, cols) of latents per token.
    A last partial patch of frames makes a token (`ceil_frames`), as most families pad; rows and columns floor."""

    axes: tuple[int | None, int, int]
    patch: Callable[[Any], tuple[int, int, int]] = _square_patch
    ceil_frames: bool = True

    def of(self, transformer: torch.nn.Module, inputs: inspect.BoundArguments) -> Grid:
        shape = inputs.arguments["hidden_states"].shape
        frames, height, width = (1 if axis is None else shape[axis] for axis in self.axes)
        pt, ph, pw = self.patch(transformer.config)
        return Grid(-(-frames // pt) if self.ceil_frames else frames // pt, height // ph, width // pw)


@dataclass(frozen=True)
class TokenLayout:
    """The tokens of one covered attention call: `grid`, the whole video's token grid, and `video_tokens`, how many
    of them the call's sequence holds (under context parallelism, this rank's shard; else grid.num_tokens)."""

    grid: Grid
    video_tokens: int

    def text_length(self, seq_len: int) -> int:
        """Tokens of a sequence of `seq_len` that are not video: the text of a joint sequence given as one."""
        return seq_len - self.video_tokens


class ModelAdapter:
    """Subclasses name their transformer classes, the self-attention modules a plan covers, where the grid
    comes from, and how to turn an attention module's inputs into (q, k, v) and back."""

    family: str = ""
    transformer_classes: tuple[str, ...] = ()
    # Module-name pattern of the self-attentions the plan covers: group "layer" (else group 1) is the layer index
    # within its stack. Modules that match its group "second" (single-stream blocks, SD3.5's second attention) are
    # numbered after every block of `transformer_blocks`, in forward order.
    covered_pattern: str = ""

    def covered_modules(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        """(module name, layer index) of every covered self-attention, in forward order."""
        first, second = [], []
        for name, _ in transformer.named_modules():
            match = re.fullmatch(self.covered_pattern, name)
            if match is None:
                continue
            groups = match.groupdict()
            if groups.get("second") is not None:
                second.append(name)
            else:
                first.append((name, int(groups["layer"] if "layer" in groups else match.group(1))))
        offset = len(transformer.transformer_blocks) if second else 0
        return first + [(name, offset + k) for k, name in enumerate(second)]

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

    latent_grid: LatentGrid | None = None  # where the grid is the latents' shape over a fixed patch

    def grid(self, transformer: torch.nn.Module, inputs: inspect.BoundArguments) -> Grid:
        """Video tokens per (frames, rows, cols) for this forward call, from the transformer's own inputs."""
        if self.latent_grid is None:
            raise NotImplementedError(f"{type(self).__name__} says neither its latent_grid nor how to find the grid")
        return self.latent_grid.of(transformer, inputs)

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

    # The processor the family runs in every attention module, "package.module.Class" (imported when first needed:
    # diffusers imports triton); None: each module's own default processor class.
    stock_processor_class: str | None = None

    def stock_processor(self, attn: torch.nn.Module):
        """A fresh instance of the processor the family uses for this module (for pass-through)."""
        if self.stock_processor_class is not None:
            module, name = self.stock_processor_class.rsplit(".", 1)
            return getattr(importlib.import_module(module), name)()
        cls = getattr(attn, "_default_processor_cls", None)
        if cls is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()
        return cls()

    def output_follows_attention(self, attn: torch.nn.Module) -> bool:
        """Whether the module's output depends on its input only through attention, by an affine map (the output
        projection): then a wholly reused module may keep and extrapolate its output instead of its attention's."""
        return True

    def sees_text(self, tokens: TokenLayout, hidden_states: torch.Tensor, encoder_hidden_states=None) -> bool:
        """Whether a covered module's attention sees text tokens in this call: text given beside the video, or
        within its sequence (more tokens than video ones). The processor asks before the call."""
        return encoder_hidden_states is not None or hidden_states.shape[1] > tokens.video_tokens

    def attention(self, attend: AttendFn, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                  rotary=None, *, tokens: TokenLayout, **kwargs) -> Any:
        """Redo the family's pre-attention math for a covered module, call `attend`, and finish like the stock
        processor (output projection, splitting text back out)."""
        raise NotImplementedError


class ImageAdapter(ModelAdapter):
    """An image family: latents (B, C, H, W), one frame, a square patch."""

    latent_grid = LatentGrid((None, 2, 3))


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
