"""The tiny-shapes transformer with coordinate input channels: Wan's, plus where each pixel is.

RoPE is relative and pixel space has no VAE padding, so a plain WanTransformer3DModel cannot see where a token
is; the data's motions depend on it (objects kept in frame: "moving left" starts right and ends left).
Saved pipelines name this module in ``model_index.json``; diffusers imports it to load the component and looks up
``ModelMixin`` here to find the loading method, hence the import below.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, WanTransformer3DModel  # noqa: F401 (ModelMixin: see the module docstring)


def coordinate_planes(frames: int, height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """(3, F, H, W): each pixel's frame, row and column centre, normalised to [-1, 1] (independent of the size)."""
    axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) / n * 2 - 1 for n in (frames, height, width)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


class TinyShapesTransformer(WanTransformer3DModel):
    """WanTransformer3DModel whose forward appends :func:`coordinate_planes` to its (B, 3, F, H, W) input, the way
    Wan's image-to-video model takes conditioning channels; attention and everything after it are Wan's."""

    # Wan's own signature, spelled out: SparseProcessor binds the forward's arguments by name to read the timestep
    # (dense warm-up steps, calibration); behind *args it would see none.
    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict=True, attention_kwargs=None):
        b, _, f, h, w = hidden_states.shape
        planes = coordinate_planes(f, h, w, hidden_states.device, hidden_states.dtype)
        return super().forward(torch.cat([hidden_states, planes.expand(b, -1, -1, -1, -1)], 1), timestep,
                               encoder_hidden_states, encoder_hidden_states_image, return_dict, attention_kwargs)
