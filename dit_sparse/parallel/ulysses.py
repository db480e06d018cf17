"""Ulysses: trade a sequence shard of every head for the whole sequence of some heads, and back.

Each rank holds (B, S/N, H, D). One all-to-all gives it (B, S, H/N, D): the whole sequence of heads
[rank * H/N, (rank + 1) * H/N). A joint sequence arrives as each rank's own [text, video] (or [video, text]) pieces
one after another; they are put back in model order, all text then all video (or the reverse), because a plan's
layouts index video tokens in grid order. Where the model's cp_plan leaves the text whole on every rank
(HunyuanVideo: its padded text keeps its mask), only the video is exchanged: each rank takes its heads of the
text, and after attention gathers every rank's heads of the text's output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..attend import TextTokens


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x (N, ...) contiguous: piece i goes to rank i; returns what every rank sent this one, in rank order."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def gather_sequence(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(B, s, H, D) sequence shard of all heads -> (B, N, s, H/N, D): every rank's shard of this rank's heads."""
    b, s, h, d = x.shape
    pieces = x.reshape(b, s, size, h // size, d).permute(2, 0, 1, 3, 4).contiguous()
    return _all_to_all(pieces, group).transpose(0, 1)


def scatter_sequence(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Inverse of gather_sequence: (B, N, s, H/N, D) -> (B, s, H, D), this rank's shard of every head."""
    b, n, s, hl, d = x.shape
    back = _all_to_all(x.transpose(0, 1).contiguous(), group)  # (N, B, s, hl, D): head group i of my shard
    return back.permute(1, 2, 0, 3, 4).reshape(b, s, n * hl, d)


def in_model_order(pieces: torch.Tensor, text: TextTokens | None) -> tuple[torch.Tensor, TextTokens | None]:
    """(B, N, s, h, D) per-rank [text, video] pieces -> (B, N*s, h, D) all text then all video (model order)."""
    b, n, s, h, d = pieces.shape
    if text is None:
        return pieces.reshape(b, n * s, h, d), None
    video, text_part = text.slices(s)
    parts = [pieces[:, :, text_part].reshape(b, -1, h, d), pieces[:, :, video].reshape(b, -1, h, d)]
    joined = torch.cat(parts if text.first else parts[::-1], 1)
    return joined, TextTokens(text.length * n, text.first)


def in_rank_order(joined: torch.Tensor, text: TextTokens | None, size: int) -> torch.Tensor:
    """Inverse of in_model_order, given the local TextTokens: (B, N*s, h, D) -> (B, N, s, h, D)."""
    b, total, h, d = joined.shape
    if text is None:
        return joined.reshape(b, size, total // size, h, d)
    full_text = text.length * size
    text_part = joined[:, :full_text] if text.first else joined[:, total - full_text:]
    video = joined[:, full_text:] if text.first else joined[:, :total - full_text]
    pieces = [text_part.reshape(b, size, text.length, h, d), video.reshape(b, size, -1, h, d)]
    return torch.cat(pieces if text.first else pieces[::-1], 2)



def gather_video(x: torch.Tensor, text: TextTokens, group, size: int, rank: int) -> torch.Tensor:
    """Text whole on every rank: (B, s_v + T, H, D) this rank's [video shard, all text] (in model order) ->
    (B, N * s_v + T, H/N, D), the whole video and the text, of this rank's heads."""
    b, s, h, d = x.shape
    video, text_part = text.slices(s)
    per_rank = h // size
    whole_video = gather_sequence(x[:, video], group, size).reshape(b, -1, per_rank, d)
    own_text = x[:, text_part, rank * per_rank:(rank + 1) * per_rank]
    return torch.cat([own_text, whole_video] if text.first else [whole_video, own_text], 1)


def scatter_video(out: torch.Tensor, text: TextTokens, group, size: int) -> torch.Tensor:
    """Inverse of gather_video for the output: this rank's video shard of every head, and all text of every head."""
    b, total, per_rank, d = out.shape
    video, text_part = text.slices(total)
    own_video = scatter_sequence(out[:, video].reshape(b, size, -1, per_rank, d), group, size)
    pieces = [torch.empty_like(out[:, text_part]) for _ in range(size)]
    dist.all_gather(pieces, out[:, text_part].contiguous(), group=group)
    whole_text = torch.cat(pieces, 2)
    return torch.cat([whole_text, own_video] if text.first else [own_video, whole_text], 1)
