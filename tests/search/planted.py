"""A tiny transformer whose heads have planted attention patterns, and the adapter that lets dit-sparse run it.

Each head's scores are content (random q.k of the hidden states) plus a positional term built from one-hot
encodings of frame, row and column, so that any box-shaped pattern is exact through a dot product:
q = [content, onehot(f_i) @ Mf, onehot(y_i) @ My, onehot(x_i) @ Mx], k = [content, onehot(f_j), onehot(y_j),
onehot(x_j)]. Kinds:

- diagonal: |df| <= 1 and |dy| <= 1 (any column)     -> matches diagonal(window=[1, 0.125, 0.125])
- temporal: the same row in every frame (dy = 0)        -> matches multi_diagonal(window=[0, 0])
- columns: every key of the first frame                 -> matches vertical_stripe (first frame)
- dense: content only                                    -> dense
- zero: the value projection of the head is zero         -> skip
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import Attention

from dit_sparse.adapters import ADAPTERS, ModelAdapter, register_adapter
from dit_sparse.layout import Grid

FAMILY = {"diagonal": "diagonal", "temporal": "multi_diagonal", "columns": "vertical_stripe", "dense": "dense",
          "zero": "skip"}
KINDS = ("diagonal", "temporal", "columns", "dense", "zero", "diagonal", "temporal", "columns")
FAR = -30.0  # score outside a planted box: exp(-30) ~ 1e-13
CONTENT_DIMS = 8


class PlantedTransformer(torch.nn.Module):
    """hidden_states (B, C, F, H, W) -> (B, F*H*W, C); each block adds its attention output."""

    def __init__(self, grid: Grid, layers: int = 4, heads: int = 8, channels: int = 32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.grid = grid
        self.head_dim = CONTENT_DIMS + grid.frames + grid.height + grid.width
        self.blocks = torch.nn.ModuleList()
        for layer in range(layers):
            block = torch.nn.Module()
            attn = Attention(query_dim=channels, heads=heads, dim_head=self.head_dim, bias=False)
            with torch.no_grad():
                for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / math.sqrt(lin.weight.shape[1]))
            kinds = [KINDS[(h + layer) % len(KINDS)] for h in range(heads)]
            with torch.no_grad():
                for h, kind in enumerate(kinds):
                    if kind == "zero":
                        attn.to_v.weight[h * self.head_dim:(h + 1) * self.head_dim] = 0
            attn.planted_kinds = kinds
            block.attn = attn
            self.blocks.append(block)

    def forward(self, hidden_states, timestep=None):
        x = hidden_states.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block.attn(x)
        return x


def _box(size: int, reach: int | None) -> torch.Tensor:
    """(size, size) 0 where |i - j| <= reach (everything when reach is None), FAR elsewhere."""
    if reach is None:
        return torch.zeros(size, size)
    idx = torch.arange(size)
    return torch.where((idx[:, None] - idx[None, :]).abs() <= reach, 0.0, FAR)


def planted_qkv(attn, hidden_states: torch.Tensor, grid: Grid):
    """q, k, v (B, S, H, D) with each head's planted pattern; scores already account for 1/sqrt(D)."""
    b, s, _ = hidden_states.shape
    heads, d = attn.heads, attn.to_q.out_features // attn.heads
    content_q = attn.to_q(hidden_states).view(b, s, heads, d)[..., :CONTENT_DIMS]
    content_k = attn.to_k(hidden_states).view(b, s, heads, d)[..., :CONTENT_DIMS]
    v = attn.to_v(hidden_states).view(b, s, heads, d)
    coords = grid.coords()
    onehots = [torch.nn.functional.one_hot(coords[:, i], n).float()
               for i, n in enumerate((grid.frames, grid.height, grid.width))]
    first_frame = torch.full((grid.frames, grid.frames), FAR)
    first_frame[:, 0] = 0.0
    boxes = {
        "diagonal": (_box(grid.frames, 1), _box(grid.height, 1), _box(grid.width, None)),
        "temporal": (_box(grid.frames, None), _box(grid.height, 0), _box(grid.width, None)),
        "columns": (first_frame, _box(grid.height, None), _box(grid.width, None)),
        "dense": (_box(grid.frames, None), _box(grid.height, None), _box(grid.width, None)),
    }
    boxes["zero"] = boxes["dense"]
    q_heads, k_heads = [], []
    scale = math.sqrt(d)
    for h, kind in enumerate(attn.planted_kinds):
        content = 1.5 if kind == "dense" else 0.7
        q_pos = torch.cat([oh @ m for oh, m in zip(onehots, boxes[kind])], dim=-1) * scale
        k_pos = torch.cat(onehots, dim=-1)
        q_heads.append(torch.cat([content_q[:, :, h] * content * scale / math.sqrt(CONTENT_DIMS),
                                  q_pos.expand(b, -1, -1)], dim=-1))
        k_heads.append(torch.cat([content_k[:, :, h], k_pos.expand(b, -1, -1)], dim=-1))
    return torch.stack(q_heads, 2), torch.stack(k_heads, 2), v


class PlantedAdapter(ModelAdapter):
    family = "planted"
    transformer_classes = ("PlantedTransformer",)
    covered_pattern = r"blocks\.(\d+)\.attn"

    def grid(self, transformer, inputs):
        return Grid(*inputs.arguments["hidden_states"].shape[2:])

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None,
                  *, tokens=None, **kwargs):
        # The processor passes the call's TokenLayout as `tokens`; before it did, the grid was on `attend`.
        grid = tokens.grid if tokens is not None else attend.grid
        q, k, v = planted_qkv(attn, hidden_states, grid)
        return attn.to_out[0](attend(q, k, v).flatten(2))


def register():
    register_adapter(PlantedAdapter)


def unregister():
    for name in PlantedAdapter.transformer_classes:
        ADAPTERS.pop(name, None)


def runner(model: PlantedTransformer, steps: int, branches: int = 2, seed: int = 0):
    """run(i, on_step) for dit_sparse.search.calibrate: `steps` denoising steps x `branches` calls each."""
    grid = model.grid

    def run(i, on_step):
        gen = torch.Generator().manual_seed(seed + 1000 * i)
        for step in range(steps):
            t = torch.tensor([999.0 * (1 - step / steps)])
            for _ in range(branches):
                x = torch.randn(1, model.blocks[0].attn.to_q.in_features, grid.frames, grid.height, grid.width,
                                generator=gen)
                model(hidden_states=x, timestep=t)
            on_step()

    return run
