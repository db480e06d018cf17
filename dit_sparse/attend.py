"""The one attend function every model adapter calls: it runs a module's per-head plan on (q, k, v).

Heads sharing a strategy run as one group in one executor call. Text tokens of joint-attention models are
always attended densely: text rows see every key, and video rows merge their sparse video part with a dense
text part exactly through the LSE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .dense import dense_attention, dense_attention_lse, merge_partials
from .executors import Executor
from .layout import BlockLayout, Grid
from .plan import HeadStrategy
from .strategies import BuildContext, get_strategy
from .strategies.dense import full_layout


@dataclass
class AttentionStats:
    """Counts query-key pairs: what dense attention would compute and what was computed (pooled keys once)."""

    calls: int = 0
    dense_pairs: float = 0.0
    computed_pairs: float = 0.0

    def add(self, dense: float, computed: float) -> None:
        self.dense_pairs += dense
        self.computed_pairs += computed

    @property
    def executed_density(self) -> float:
        return self.computed_pairs / self.dense_pairs if self.dense_pairs else 1.0

    def reset(self) -> None:
        self.calls, self.dense_pairs, self.computed_pairs = 0, 0.0, 0.0


@dataclass(frozen=True)
class TextTokens:
    """Where the text tokens of a joint sequence sit. mask: (B, length) True for real (unpadded) tokens."""

    length: int
    first: bool
    mask: torch.Tensor | None = None

    def slices(self, seq_len: int) -> tuple[slice, slice]:
        """(video slice, text slice) of the joint sequence."""
        if self.first:
            return slice(self.length, seq_len), slice(0, self.length)
        return slice(0, seq_len - self.length), slice(seq_len - self.length, seq_len)

    def key_mask(self, batch: int, seq_len: int, device) -> torch.Tensor | None:
        """(B, S) key mask over the joint sequence, or None when no text token is padded."""
        if self.mask is None or bool(self.mask.all()):
            return None
        full = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        full[:, self.slices(seq_len)[1]] = self.mask.bool()
        return full


@dataclass
class AttentionSite:
    """Everything attend needs about where it runs: module, heads' plan, grid, step, caches."""

    module_name: str
    heads: tuple[HeadStrategy, ...]
    grid: Grid
    step: int | None
    dense_now: bool
    refresh_interval: int
    branch: str
    executor: Executor
    block_q: int
    block_k: int
    cache: dict[Any, Any]  # per transformer: dynamic layouts and rescale statistics across steps
    static_layouts: dict[Any, BlockLayout]
    stats: AttentionStats = field(default_factory=AttentionStats)
    # Set by the processor to the one `reuse` strategy of a module whose heads all reuse alike: then, if attend sees
    # no text tokens, the processor keeps the module's whole output and attend keeps nothing per head.
    module_reuse: HeadStrategy | None = None
    saw_text: bool | None = None  # set by attend

    def groups(self) -> list[tuple[HeadStrategy, list[int]]]:
        """Heads grouped by identical strategy, in order of first appearance."""
        grouped: dict[HeadStrategy, list[int]] = {}
        for head, spec in enumerate(self.heads):
            grouped.setdefault(spec, []).append(head)
        return list(grouped.items())

    def is_fresh(self, entry) -> bool:
        """A cached entry is reusable at the `refresh_interval - 1` steps after the step it was computed at. A
        second call at that same step is another generation (each step calls a module once per branch)."""
        if entry is None or self.step is None or entry["step"] is None:
            return False
        return 0 < self.step - entry["step"] < self.refresh_interval


def attend(q, k, v, site: AttentionSite, text: TextTokens | None = None) -> torch.Tensor:
    """q, k, v: (B, S, H, D) post-RoPE, S = text + video tokens. Returns the attention output (B, S, H, D)."""
    b, s, h, _ = q.shape
    n_video = s - (text.length if text else 0)
    if n_video != site.grid.num_tokens:
        raise ValueError(
            f"{site.module_name}: the grid {site.grid} has {site.grid.num_tokens} video tokens but attention received "
            f"{n_video}; the model's input shape and its attention disagree (is the adapter right for this model?)"
        )
    site.stats.calls += 1
    site.saw_text = text is not None
    keep_per_head = text is not None or site.module_reuse is None
    key_mask = text.key_mask(b, s, q.device) if text else None
    video, text_part = text.slices(s) if text else (slice(0, s), None)
    if site.dense_now or all(spec == HeadStrategy("dense") for spec in site.heads):
        site.stats.add(b * h * s * s, b * h * s * s)
        out = dense_attention(q, k, v, key_mask)
        for spec, heads in site.groups() if keep_per_head else ():
            if get_strategy(spec.strategy).reuses and spec.param_dict["extrapolate"]:
                kept = out[:, video, heads]
                _keep_output(site, _reuse_key(site, heads), kept, True, kept.shape)  # the first refresh extends it
        return out

    out = torch.empty_like(q)
    if text:
        out[:, text_part] = dense_attention(q[:, text_part], k, v, key_mask)
        text_mask = None if key_mask is None else key_mask[:, text_part]
        out_vt, lse_vt = dense_attention_lse(q[:, video], k[:, text_part], v[:, text_part], text_mask)
        site.stats.add(b * h * text.length * s + b * h * n_video * text.length,
                       b * h * text.length * s + b * h * n_video * text.length)
    qv, kv, vv = q[:, video], k[:, video], v[:, video]
    out_v = out[:, video]
    for spec, heads in site.groups():
        g = len(heads)
        site.stats.add(b * g * n_video * n_video, 0)
        strategy = get_strategy(spec.strategy)
        # A contiguous run of heads is a view; only scattered heads need a gather.
        sel = slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else \
            torch.tensor(heads, device=q.device)
        if strategy.reuses:
            reused = _reused_output(site, _reuse_key(site, heads), spec, out_v[:, :, sel].shape)
            if reused is not None:
                out_v[:, :, sel] = reused
                continue
        elif not strategy.computes:
            out_v[:, :, heads] = 0
            continue
        qg, kg, vg = qv[:, :, sel], kv[:, :, sel], vv[:, :, sel]
        o, lse = _run_group(spec, heads, qg, kg, vg, site)
        if text:
            o, lse = merge_partials(o, lse, out_vt[:, :, sel], lse_vt[:, sel])
        out_v[:, :, sel] = o.to(out.dtype)
        if strategy.reuses and keep_per_head:
            _keep_output(site, _reuse_key(site, heads), out_v[:, :, sel], spec.param_dict["extrapolate"],
                         out_v[:, :, sel].shape)
    return out


def _reuse_key(site: AttentionSite, heads: list[int] | None) -> tuple:
    """Cache key of a `reuse` group's outputs; heads None: the whole module's output."""
    return ("reuse", site.module_name, "module" if heads is None else tuple(heads), site.branch)


def whole_module_reuse(heads: tuple[HeadStrategy, ...]) -> HeadStrategy | None:
    """The one `reuse` strategy of a module whose heads all reuse alike, else None. Such a module, when attention
    sees no text tokens, is reused as a whole by the processor: its projections, RoPE and output projection are
    affine around attention, so reusing (or extrapolating) their result equals doing so for the attention output,
    and none of them has to run between refreshes."""
    first = heads[0]
    if get_strategy(first.strategy).reuses and all(spec == first for spec in heads):
        return first
    return None


def reused_module_output(site: AttentionSite, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """The kept output of a wholly reused module between refreshes (None: run the module). Counts the attention
    it stands for as not computed, as `attend` does for a reused head."""
    if site.module_reuse is None or site.dense_now:
        return None
    key = _reuse_key(site, None)
    out = _reused_output(site, key, site.module_reuse, tuple(hidden_states.shape))
    if out is None:
        return None
    b, n = hidden_states.shape[0], site.grid.num_tokens
    site.stats.calls += 1
    site.stats.add(b * len(site.heads) * n * n, 0)
    # The model may write into what a module returns; the kept output must stay as it was.
    return out.clone() if out is site.cache[key]["out"] else out


def keep_module_output(site: AttentionSite, hidden_states: torch.Tensor, out: torch.Tensor) -> None:
    """After a wholly reused module ran (a refresh, or a dense step to extrapolate from): keep its output when its
    attention saw video tokens alone (`attend` then kept nothing per head)."""
    if site.module_reuse is None or site.saw_text is not False:
        return
    extrapolate = site.module_reuse.param_dict["extrapolate"]
    if not site.dense_now or extrapolate:
        _keep_output(site, _reuse_key(site, None), out, extrapolate, tuple(hidden_states.shape))


def _keep_output(site: AttentionSite, key: tuple, out: torch.Tensor, extrapolate: bool, shape) -> None:
    """Keep a `reuse` output and, to extrapolate, the one before it (from this generation): two outputs per key
    (group or module, and CFG branch). `shape` identifies what the output was computed from."""
    last = site.cache.get(key)
    earlier = extrapolate and last is not None and last["step"] is not None and site.step is not None \
        and last["step"] < site.step and last["shape"] == tuple(shape)
    # A dense warm-up step's output is only a point to extrapolate from; the first sparse step still refreshes.
    site.cache[key] = {"step": site.step, "out": out.detach().clone(), "shape": tuple(shape),
                       "refresh": not site.dense_now, "previous": (last["step"], last["out"]) if earlier else None,
                       "older": last["previous"] if earlier else None}


def _reused_output(site: AttentionSite, key: tuple, spec: HeadStrategy, shape) -> torch.Tensor | None:
    """A `reuse` output between refreshes (None at a refresh): the last computed output, or with `extrapolate`
    its Taylor forecast from the ones before, by step index."""
    kept = site.cache.get(key)
    if not site.is_fresh(kept) or not kept["refresh"] or kept["shape"] != tuple(shape):
        return None
    params = spec.param_dict
    if not params["extrapolate"] or kept["previous"] is None:
        return kept["out"]
    points = [kept["older"], kept["previous"], (kept["step"], kept["out"])]
    points = points[1:] if params["order"] == 1 or points[0] is None else points
    return taylor_forecast(points, site.step).to(kept["out"].dtype)


def taylor_forecast(points: list[tuple[int, torch.Tensor]], step: int) -> torch.Tensor:
    """Forecast at `step` from computed outputs [(step, out), ...], oldest first (two or three points): the
    Taylor expansion at the last point with derivatives from backward divided differences, as TaylorSeer does.
    The second-order term is f[s0, s1, s2] (step - s2)^2; Newton's polynomial would use (step - s2)(step - s1),
    which overshoots when the curvature estimate is noisy. The expansion is linear in the outputs, so it is summed
    as one weighted sum (one pass per point, in float32, no temporaries): it runs at every reused step."""
    (s1, y1), (s2, y2) = points[-2], points[-1]
    h, d = step - s2, s2 - s1
    weights = [(y2, 1 + h / d), (y1, -h / d)]  # y2 + h (y2 - y1) / d
    if len(points) == 3:  # + h^2 ((y2 - y1) / d - (y1 - y0) / e) / g
        s0, y0 = points[0]
        e, g = s1 - s0, s2 - s0
        weights = [(y2, 1 + h / d + h * h / (d * g)), (y1, -h / d - h * h / g * (1 / d + 1 / e)), (y0, h * h / (e * g))]
    forecast = weights[0][0].to(torch.float32, copy=True).mul_(weights[0][1])  # a copy: never the kept output
    for y, w in weights[1:]:
        forecast.add_(y, alpha=w)
    return forecast


def _run_group(spec: HeadStrategy, heads: list[int], q, k, v, site: AttentionSite):
    """One head group's video-video attention -> (out (B, S, G, D), lse (B, G, S))."""
    b, s, g, _ = q.shape
    if (spec.strategy == "dense" or get_strategy(spec.strategy).reuses) and not spec.fp8:
        site.stats.add(0, b * g * s * s)
        return dense_attention_lse(q, k, v)
    layout = _layout(spec, heads, q, k, site)
    if not spec.rescale:
        site.stats.add(0, b * g * s * s * layout.density())
        return site.executor.run(q, k, v, layout, fp8=spec.fp8)
    return _rescaled(spec, heads, q, k, v, layout, site)


def _layout(spec: HeadStrategy, heads: list[int], q, k, site: AttentionSite) -> BlockLayout:
    strategy = get_strategy(spec.strategy)
    ctx = BuildContext(site.grid, site.block_q, site.block_k, q, k)
    if not strategy.dynamic:
        key = (spec, site.grid, site.block_q, site.block_k, q.device)
        if key not in site.static_layouts:
            layout = full_layout(ctx.seq_len, site.block_q, site.block_k) if spec.strategy == "dense" else \
                strategy.layout(spec.param_dict, ctx)
            site.static_layouts[key] = _to_device(layout, q.device)
        return site.static_layouts[key]
    key = ("layout", site.module_name, tuple(heads), site.branch)
    entry = site.cache.get(key)
    if not site.is_fresh(entry) or entry["grid"] != site.grid or entry["batch"] != q.shape[0]:
        entry = {"step": site.step, "grid": site.grid, "batch": q.shape[0],
                 "layout": strategy.layout(spec.param_dict, ctx)}
        site.cache[key] = entry
    return entry["layout"]


def _rescaled(spec, heads, q, k, v, layout: BlockLayout, site: AttentionSite):
    """Re-scaled softmax: keep each row's in-layout share of mass from the last dense refresh, add its residual."""
    b, s, g, _ = q.shape
    key = ("rescale", site.module_name, tuple(heads), site.branch)
    entry = site.cache.get(key)
    out_s, lse_s = site.executor.run(q, k, v, layout, fp8=spec.fp8)
    site.stats.add(0, b * g * s * s * layout.density())
    if site.is_fresh(entry) and entry["shape"] == tuple(q.shape):
        out, lse = rescaled_output(out_s, lse_s, entry["ratio"], entry["residual"])
        return out.to(q.dtype), lse
    out_d, lse_d = dense_attention_lse(q, k, v)
    site.stats.add(0, b * g * s * s)
    ratio, residual = rescale_statistics(out_s, lse_s, out_d, lse_d)
    site.cache[key] = {"step": site.step, "shape": tuple(q.shape), "ratio": ratio, "residual": residual}
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


def _to_device(layout: BlockLayout, device) -> BlockLayout:
    if layout.kv_index.device == torch.device(device):
        return layout
    level = None if layout.kv_level is None else layout.kv_level.to(device)
    return BlockLayout(layout.seq_len, layout.block_q, layout.block_k, layout.kv_index.to(device),
                       layout.kv_count.to(device), level)
