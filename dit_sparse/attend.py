"""The one attend function every model adapter calls: it runs a module's per-head plan on (q, k, v).

Heads sharing a strategy run as one group in one executor call. Text tokens of joint-attention models are
always attended densely: text rows see every key, and video rows merge their sparse video part with a dense
text part exactly through the LSE.
"""

from __future__ import annotations

import torch

from .decide import decide_module
from .dense import dense_attention, dense_attention_lse, merge_partials
from .head_layouts import group_layout, launch_layout
from .parallel.ring import rows_only
from .program import HeadSet
from .site import AttentionSite, AttentionStats, TextTokens
from .step_state import reused_output, taylor_forecast
from .timing import kernel_call

__all__ = ["AttentionSite", "AttentionStats", "TextTokens", "attend", "rescale_statistics", "rescaled_output",
           "taylor_forecast"]


def attend(q, k, v, site: AttentionSite, text: TextTokens | None = None) -> torch.Tensor:
    """q, k, v: (B, S, H, D) post-RoPE, S = text + video tokens. Returns the attention output (B, S, H, D)."""
    b, s, h, _ = q.shape
    n_video = s - (text.length if text else 0)
    if n_video != site.grid.num_tokens:
        raise ValueError(
            f"{site.module_name}: the grid {site.grid} has {site.grid.num_tokens} video tokens but attention received "
            f"{n_video}; the model's input shape and its attention disagree (is the adapter right for this model?)"
        )
    if site.decisions is None:
        decide_module(site, b, text is not None)
    site.stats.called()
    keep_per_head = text is not None or site.module_reuse is None
    key_mask = text.key_mask(b, s, q.device) if text else None
    video, text_part = text.slices(s) if text else (slice(0, s), None)
    rows = site.query_rows
    video_rows = None if rows is None else [rows.video]
    share = site.row_share  # of the query rows, those computed here
    program = site.program
    if site.dense_now or all(spec.runs_dense for spec in site.heads):
        site.stats.add(b * h * s * s * share, b * h * s * s * share)
        joint_rows = None if rows is None else [_shifted(rows.video, video)] + (
            [_shifted(rows.text, text_part)] if text else [])
        out = _on_rows(joint_rows, _dense, q, k, v, key_mask)
        for _, heads in program.reused if keep_per_head else ():
            # a point to extrapolate from; the first refresh extends it
            site.decisions.reuse_step(heads.heads).keep(heads.take(out[:, video]))
        return out

    out = torch.empty_like(q)
    out_vt = lse_vt = None
    if text:
        out[:, text_part] = _on_rows(None if rows is None else [rows.text], _dense, q[:, text_part], k, v, key_mask)
        text_mask = None if key_mask is None else key_mask[:, text_part]
        out_vt, lse_vt = _on_rows(video_rows, _dense_lse, q[:, video], k[:, text_part], v[:, text_part], text_mask,
                                  lse=True)
        site.stats.add((b * h * text.length * s + b * h * n_video * text.length) * share,
                       (b * h * text.length * s + b * h * n_video * text.length) * share)
    qv, kv, vv = q[:, video], k[:, video], v[:, video]
    out_v = out[:, video]
    site.stats.add(b * h * n_video * n_video * share, 0)

    for launch in program.launches:
        qg = launch.heads.take(qv)
        kg, vg = launch.heads.take(kv), launch.heads.take(vv)
        layout = launch_layout(launch, site, qg, kg, q.device)
        layout = layout if rows is None else rows_only(layout, rows.video)
        site.stats.add(0, b * len(launch.heads.heads) * n_video * n_video * layout.density())
        o, lse = kernel_call(site.executor.run, qg, kg, vg, layout, fp8=launch.fp8)
        _put_video(out_v, launch.heads, o, lse, out_vt, lse_vt)
    for spec, heads in program.rescaled:
        o, lse = _rescaled(spec, heads, heads.take(qv), heads.take(kv), heads.take(vv), site)
        _put_video(out_v, heads, o, lse, out_vt, lse_vt)
    dense_sets = list(program.dense)
    for _, heads in program.reused:
        step = site.decisions.reuse_step(heads.heads) if keep_per_head else None
        if step is not None and step.decision is not None and step.decision.reuse:
            heads.put(out_v, reused_output(step))
        else:
            dense_sets.append(heads)
    for heads in dense_sets:
        # Dense heads see every key, text included, in one call of the best dense kernel: nothing to merge.
        g = len(heads.heads)
        site.stats.add(0, b * g * n_video * n_video * share)  # their video-to-text part is counted with the text
        o = _on_rows(video_rows, _dense, heads.take(qv), heads.take(k), heads.take(v), key_mask)
        heads.put(out_v, o)
    for _, heads in program.reused if keep_per_head else ():
        site.decisions.reuse_step(heads.heads).keep(heads.take(out_v))
    if program.skipped is not None:
        program.skipped.put(out_v, torch.zeros_like(program.skipped.take(out_v)))
    return out


def _shifted(rows: slice, part: slice) -> slice:
    """Rows of a part of the sequence (video or text) as rows of the whole sequence."""
    return slice(part.start + rows.start, part.start + rows.stop)


def _dense(q, k, v, key_mask=None):
    return kernel_call(dense_attention, q, k, v, key_mask)


def _dense_lse(q, k, v, key_mask=None):
    return kernel_call(dense_attention_lse, q, k, v, key_mask)


def _on_rows(rows: list[slice] | None, fn, q: torch.Tensor, *args, lse: bool = False):
    """fn(q, *args): (B, S, H, D) -> out (B, S, H, Dv), or with `lse` (out, lse (B, H, S) fp32). With `rows` (ring
    parallelism), fn runs on those rows of q only. The other rows hold filler queries whose outputs are discarded;
    they attend to nothing: out 0 and LSE -inf (all of them where no row is computed here: text rows merged from
    the ranks' partial results instead)."""
    if rows is None:
        return fn(q, *args)
    parts = [(r, fn(q[:, r], *args)) for r in rows if r.stop > r.start]
    outs = [part[0] if lse else part for _, part in parts]
    out = outs[0].new_zeros(q.shape[:3] + outs[0].shape[3:]) if outs else torch.zeros_like(q)
    for (r, _), part in zip(parts, outs):
        out[:, r] = part
    if not lse:
        return out
    lses = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32)
    for r, part in parts:
        lses[:, :, r] = part[1]
    return out, lses


def _put_video(out_v, heads: HeadSet, o, lse, out_vt, lse_vt) -> None:
    """Write a sparse video part into the output, merged first with the video-to-text part where there is text."""
    if out_vt is not None:
        o, lse = merge_partials(o, lse, heads.take(out_vt), heads.take(lse_vt, 1))
    heads.put(out_v, o.to(out_v.dtype))


def _rescaled(spec, heads: HeadSet, q, k, v, site: AttentionSite):
    """Re-scaled softmax: keep each row's in-layout share of mass from the last dense refresh, add its residual."""
    b, s, g, _ = q.shape
    step = site.decisions.rescale[heads.heads]
    layout = group_layout(spec, heads.heads, q, k, site)
    rows = site.query_rows
    layout = layout if rows is None else rows_only(layout, rows.video)
    out_s, lse_s = kernel_call(site.executor.run, q, k, v, layout, fp8=spec.fp8)
    site.stats.add(0, b * g * s * s * layout.density())
    if step.kept:
        out, lse = rescaled_output(out_s, lse_s, step.entry.ratio, step.entry.residual)
        return out.to(q.dtype), lse
    out_d, lse_d = _on_rows(None if rows is None else [rows.video], _dense_lse, q, k, v, lse=True)
    site.stats.add(0, b * g * s * s * site.row_share)
    step.entry.ratio, step.entry.residual = rescale_statistics(out_s, lse_s, out_d, lse_d)
    return out_d, lse_d


def rescale_statistics(out_s, lse_s, out_d, lse_d) -> tuple[torch.Tensor, torch.Tensor]:
    """At a refresh: ratio (B, G, S), the in-layout share of the dense mass, and the fp32 residual (B, S, G, D)
    that the re-scaled sparse output misses."""
    ratio = torch.exp(lse_s - lse_d).clamp(min=1e-6, max=1.0)
    return ratio, out_d.float() - out_s.float() * ratio.transpose(1, 2).unsqueeze(-1)


def rescaled_output(out_s, lse_s, ratio, residual) -> tuple[torch.Tensor, torch.Tensor]:
    """Between refreshes: the sparse output (B, S, G, D) with its mass scaled back up, plus the cached residual;
    the lse grows by the same factor so that merging with text keys weighs it as dense."""
    return out_s.float() * ratio.transpose(1, 2).unsqueeze(-1) + residual, lse_s - torch.log(ratio)
