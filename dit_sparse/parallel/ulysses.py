"""Ulysses: trade a sequence shard of every head for the whole sequence of some heads, and back.

Each rank holds (B, s_r, H, D). One all-to-all gives it the whole sequence of heads [rank * H/N, (rank + 1) * H/N).
Shards may differ in length by a token (diffusers' `ulysses_anything` split: `tensor_split`), so what arrives is a
list of per-rank pieces. A joint sequence arrives as each rank's own [text, video] (or [video, text]) pieces; they
are put back in model order, all text then all video (or the reverse), because a plan's layouts index video tokens
in grid order. Where the model's cp_plan leaves the text whole on every rank (HunyuanVideo: its padded text keeps
its mask), only the video is exchanged: each rank takes its heads of the text, and after attention gathers every
rank's heads of the text's output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..attend import TextTokens


def gather_sequence(x: torch.Tensor, group, lengths: list[int]) -> list[torch.Tensor]:
    """(B, s, H, D) this rank's shard of every head -> every rank's shard (lengths[i] tokens) of this rank's heads:
    a list of (B, lengths[i], H/N, D)."""
    size = len(lengths)
    b, s, h, d = x.shape
    per_rank = h // size
    send = x.reshape(b, s, size, per_rank, d).permute(2, 0, 1, 3, 4).reshape(-1)
    counts = [b * n * per_rank * d for n in lengths]
    received = x.new_empty(sum(counts))
    dist.all_to_all_single(received, send, output_split_sizes=counts, input_split_sizes=[b * s * per_rank * d] * size,
                           group=group)
    return [piece.view(b, n, per_rank, d) for piece, n in zip(received.split(counts), lengths)]


def scatter_sequence(pieces: list[torch.Tensor], group, rank: int) -> torch.Tensor:
    """Inverse of gather_sequence: every rank's piece of this rank's heads -> (B, s, H, D) this rank's shard of every
    head."""
    size = len(pieces)
    b, s, per_rank, d = pieces[rank].shape
    send = torch.cat([piece.reshape(-1) for piece in pieces])
    received = send.new_empty(size * b * s * per_rank * d)
    dist.all_to_all_single(received, send, output_split_sizes=[b * s * per_rank * d] * size,
                           input_split_sizes=[piece.numel() for piece in pieces], group=group)
    return received.view(size, b, s, per_rank, d).permute(1, 2, 0, 3, 4).reshape(b, s, size * per_rank, d)


def in_model_order(pieces: list[torch.Tensor], text: TextTokens | None,
                   text_lengths: list[int] | None) -> tuple[torch.Tensor, TextTokens | None]:
    """Per-rank [text, video] pieces (text_lengths[i] text tokens in piece i) -> (B, S, h, D) all text then all video
    (model order), and the whole sequence's TextTokens."""
    if text is None:
        return torch.cat(pieces, 1), None
    texts, videos = [], []
    for piece, length in zip(pieces, text_lengths):
        video, text_part = TextTokens(length, text.first).slices(piece.shape[1])
        texts.append(piece[:, text_part])
        videos.append(piece[:, video])
    parts = [torch.cat(texts, 1), torch.cat(videos, 1)]
    return torch.cat(parts if text.first else parts[::-1], 1), TextTokens(sum(text_lengths), text.first)


def in_rank_order(joined: torch.Tensor, text: TextTokens | None, text_lengths: list[int] | None,
                  video_lengths: list[int]) -> list[torch.Tensor]:
    """Inverse of in_model_order: (B, S, h, D) in model order -> the per-rank pieces."""
    if text is None:
        return list(joined.split(video_lengths, 1))
    video, text_part = TextTokens(sum(text_lengths), text.first).slices(joined.shape[1])
    texts, videos = joined[:, text_part].split(text_lengths, 1), joined[:, video].split(video_lengths, 1)
    return [torch.cat([t, v] if text.first else [v, t], 1) for t, v in zip(texts, videos)]


def gather_video(x: torch.Tensor, text: TextTokens, group, video_lengths: list[int], rank: int) -> torch.Tensor:
    """Text whole on every rank: (B, s_v + T, H, D) this rank's [video shard, all text] (in model order) ->
    (B, S_v + T, H/N, D), the whole video and the text, of this rank's heads."""
    b, s, h, d = x.shape
    video, text_part = text.slices(s)
    per_rank = h // len(video_lengths)
    whole_video = torch.cat(gather_sequence(x[:, video], group, video_lengths), 1)
    own_text = x[:, text_part, rank * per_rank:(rank + 1) * per_rank]
    return torch.cat([own_text, whole_video] if text.first else [whole_video, own_text], 1)


def scatter_video(out: torch.Tensor, text: TextTokens, group, video_lengths: list[int], rank: int) -> torch.Tensor:
    """Inverse of gather_video for the output: this rank's video shard of every head, and all text of every head."""
    video, text_part = text.slices(out.shape[1])
    own_video = scatter_sequence(list(out[:, video].split(video_lengths, 1)), group, rank)
    pieces = [torch.empty_like(out[:, text_part]) for _ in video_lengths]
    dist.all_gather(pieces, out[:, text_part].contiguous(), group=group)
    whole_text = torch.cat(pieces, 2)
    return torch.cat([whole_text, own_video] if text.first else [own_video, whole_text], 1)
