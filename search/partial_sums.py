"""Exact candidate outputs on sampled query rows from softmax partial sums, without a new attention per candidate.

For sampled query rows, per key block kb, relative to one maximum per row:

    Z[r, kb] = sum_{j in kb} exp(s_rj - m_r),    U[r, kb] = sum_{j in kb} exp(s_rj - m_r) v_j

at full resolution and, for pooled candidates, over keys mean-pooled 2, 4 and 8 times (each pooled key gets
+ln(n), as the executors do). Any layout's exact output on those rows is then ``sum_kb U[level(kb)] / sum_kb
Z[level(kb)]`` over the blocks it visits: a (rows x key blocks x head_dim) reduction per candidate. Text keys of
joint models are always included (the processor attends them densely).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dit_sparse.layout import MAX_LEVEL, block_sizes, ln_group_sizes, num_blocks, pool_tokens

from .errors import CalibrationError


def level_density(levels: torch.Tensor, seq: int, block_q: int, block_k: int) -> torch.Tensor:
    """(B, H) fraction of dense work of a level map (B, H, NQ, NK) (-1 = not visited; pooled keys counted once)."""
    levels = levels.cpu().long()
    q_sizes = block_sizes(seq, block_q).double()
    k_sizes = block_sizes(seq, block_k).double()
    work = torch.zeros(levels.shape, dtype=torch.float64)
    for level in range(MAX_LEVEL + 1):
        work += (levels == level) * torch.ceil(k_sizes / 2**level)
    return (work.sum(-1) * q_sizes).sum(-1) / float(seq * seq)


def text_heads(txt, hs: slice):
    """The text keys, values and mask `txt` (or None) of heads `hs`."""
    return None if txt is None else (txt[0][:, :, hs], txt[1][:, :, hs], txt[2])


@dataclass
class PartialSums:
    """Per level l: zu[l] (B, h, J, NK, bq * (D + 1)) holds, for each sampled query block j, key block kb and row
    of j, U = sum_{keys in kb} exp(s - m) v (D values) followed by Z = sum exp(s - m); text (B, h, J, bq, D + 1)
    the same over the text keys (always attended)."""

    zu: list[torch.Tensor]
    text: torch.Tensor
    block_q: int
    head_dim: int


def partial_sums(q, k, v, text, block_k: int, pooled: bool) -> PartialSums:
    """Softmax partial sums of sampled query rows per key block, relative to one maximum per row.

    q: (B, J, bq, h, D) sampled rows grouped by query block; k, v: (B, S, h, D) video keys; text: None or
    (k_text, v_text (B, T, h, D), mask (B, T) bool or None). Levels 0..3 when `pooled` (keys mean-pooled over
    2**l tokens, scores + ln n, as the executors do), else level 0 only.
    """
    b, nj, bq, h, d = q.shape
    seq = k.shape[1]
    nk = num_blocks(seq, block_k)
    scale = 1.0 / math.sqrt(d)
    rows = q.reshape(b, nj * bq, h, d) * scale
    s = torch.einsum("brhd,bnhd->bhrn", rows, k)
    row_max = s.amax(-1)
    st = None
    if text is not None:
        st = torch.einsum("brhd,bthd->bhrt", rows, text[0])
        if text[2] is not None:
            st = st.masked_fill(~text[2][:, None, None, :], float("-inf"))
        row_max = torch.maximum(row_max, st.amax(-1))
    row_max = row_max.unsqueeze(-1)
    ones = torch.ones(1, 1, 1, 1, device=q.device, dtype=v.dtype)
    zu = []
    for level in range(MAX_LEVEL + 1 if pooled else 1):
        if level == 0:
            p, vl = s.sub_(row_max).exp_(), v
        else:
            # A pooled key scores at most ln(2**level) above the best full key: no overflow against row_max.
            kl, vl = pool_tokens(k, level), pool_tokens(v, level)
            sl = torch.einsum("brhd,bnhd->bhrn", rows, kl)
            p = sl.add_(ln_group_sizes(seq, level, q.device)).sub_(row_max).exp_()
        per_block = block_k >> level
        width = nk * per_block
        if width != p.shape[-1]:
            p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
            vl = torch.nn.functional.pad(vl, (0, 0, 0, 0, 0, width - vl.shape[1]))
        ve = torch.cat([vl, ones.expand(b, vl.shape[1], h, 1)], dim=-1).view(b, nk, per_block, h, d + 1)
        u = torch.einsum("bhrkt,bkthe->bhkre", p.view(b, h, nj * bq, nk, per_block), ve)  # (B, h, NK, R, D+1)
        zu.append(u.reshape(b, h, nk, nj, bq * (d + 1)).transpose(2, 3).contiguous())
        del p
    if st is None:
        txt = torch.zeros(b, h, nj, bq, d + 1, device=q.device, dtype=v.dtype)
    else:
        pt = torch.exp(st - row_max)
        vt = torch.cat([text[1], ones.expand(b, text[1].shape[1], h, 1)], dim=-1)
        txt = torch.einsum("bhrt,bthe->bhre", pt, vt).view(b, h, nj, bq, d + 1)
    return PartialSums(zu, txt, bq, d)


def _normalise(ue: torch.Tensor) -> torch.Tensor:
    # A row whose visited keys all underflow against its maximum gets 0 (its error then counts fully).
    return ue[..., :-1] / ue[..., -1:].clamp_min(1e-30)


def dense_output(sums: PartialSums) -> torch.Tensor:
    """(B, h, J, bq, D) exact dense output of the sampled rows."""
    b, h, nj = sums.zu[0].shape[:3]
    total = sums.zu[0].sum(3).view(b, h, nj, sums.block_q, sums.head_dim + 1) + sums.text
    return _normalise(total)


def layout_outputs(sums: PartialSums, levels: torch.Tensor) -> torch.Tensor:
    """Exact outputs (B, h, J, C, bq, D) of the sampled rows under C layouts at once.

    levels: (B, h, J, C, NK) int8, the level of each key block for each sampled query block and layout
    (-1 = not visited).
    """
    return _normalise(layout_sums(sums, levels) + sums.text.unsqueeze(3))


def layout_sums(sums: PartialSums, levels: torch.Tensor) -> torch.Tensor:
    """Unnormalised video partial sums (B, h, J, C, bq, D + 1) (U, then Z) of the sampled rows under C layouts.

    One batched matrix product per level: (C x NK) weights times (NK x rows * (D + 1)); pooled levels only for
    the layouts that use them.
    """
    if int(levels.max()) >= len(sums.zu):
        raise CalibrationError("a layout uses pooled levels but pooled sums were not computed")
    b, h, nj, c, _ = levels.shape
    bq, e = sums.block_q, sums.head_dim + 1
    zu0 = sums.zu[0]
    total = torch.matmul((levels == 0).to(zu0.dtype), zu0)  # (B, h, J, C, bq * (D + 1))
    pooled = (levels > 0).flatten(0, 2).any(0).flatten(1).any(1).nonzero().flatten() if len(sums.zu) > 1 else []
    if len(pooled):
        sub = levels.index_select(3, pooled)
        part = None
        for level in range(1, len(sums.zu)):
            w = (sub == level).to(zu0.dtype)
            term = torch.matmul(w, sums.zu[level])
            part = term if part is None else part + term
        total.index_add_(3, pooled, part)
    return total.view(b, h, nj, c, bq, e)


def rescale_statistics(sums: PartialSums, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the processor caches at a refresh, for the sampled rows under C layouts: ratio (B, h, J, C, bq), the
    in-layout share of the video-video dense mass, and residual (B, h, J, C, bq, D), the video-video dense output
    minus the re-scaled sparse one (see dit_sparse.attend.rescale_statistics)."""
    b, h, nj = sums.zu[0].shape[:3]
    inside = layout_sums(sums, levels)
    video = sums.zu[0].sum(3).view(b, h, nj, sums.block_q, sums.head_dim + 1)
    ratio = (inside[..., -1] / video[..., -1].unsqueeze(3).clamp_min(1e-30)).clamp(min=1e-6, max=1.0)
    return ratio, _normalise(video).unsqueeze(3) - _normalise(inside) * ratio.unsqueeze(-1)


def rescaled_outputs(sums: PartialSums, levels: torch.Tensor, ratio: torch.Tensor,
                     residual: torch.Tensor) -> torch.Tensor:
    """Outputs (B, h, J, C, bq, D) of re-scaled layouts with statistics from a refresh: the sparse video output
    scaled back to its dense share plus the residual, merged with the text keys at the grown mass (as the
    processor's lse - log(ratio) does)."""
    inside = layout_sums(sums, levels)
    weight = inside[..., -1] / ratio  # the in-layout mass scaled back to the dense mass
    num = inside[..., :-1] + residual * weight.unsqueeze(-1) + sums.text[..., :-1].unsqueeze(3)
    den = weight + sums.text[..., -1].unsqueeze(3)
    return num / den.clamp_min(1e-30).unsqueeze(-1)


def layout_output(levels: torch.Tensor, sums: PartialSums) -> torch.Tensor:
    """One layout: levels (B', h', J, NK) -> (B, h, J, bq, D)."""
    b, h, nj = sums.zu[0].shape[:3]
    return layout_outputs(sums, levels.expand(b, h, nj, -1).unsqueeze(3))[:, :, :, 0]
