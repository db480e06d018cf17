"""This step's decisions for a module's stateful heads, made on the host before the forward (step_state.py says why),
and the whole-module reuse that the processor does around a module whose heads all reuse alike."""

from __future__ import annotations

import torch

from .head_layouts import launch_layout, static_layout
from .plan import HeadStrategy
from .program import HeadProgram
from .site import AttentionSite
from .state import WHOLE_MODULE, RefreshStep, ReuseStep, StepDecisions
from .step_state import decide_reuse, reused_output


def decide_module(site: AttentionSite, batch: int, sees_text: bool | None = None, device=None, dtype=None) -> None:
    """Make this step's decisions for every stateful head of the module (host only: step numbers are compared here
    and nowhere in attend), build its static layouts and head indices on `device`, and move the bookkeeping on.
    sees_text: whether the module's attention sees text tokens (None: not known yet, decide for both cases)."""
    site.program = site.program or HeadProgram.of(site.heads)
    site.decisions = StepDecisions()
    _forget_the_kind_not_kept(site, sees_text)
    _decide_reuse(site, batch, sees_text)
    if not site.dense_now:
        _decide_refreshes(site, batch)
        if device is not None:
            _prepare_static_layouts(site, batch, device, dtype)
    if device is not None:
        for heads in site.program.head_sets():
            heads.prepare(device)


def _decide_reuse(site: AttentionSite, batch: int, sees_text: bool | None) -> None:
    """Per `reuse` group (or for the whole module): reuse the kept outputs, or run and keep."""
    groups = [(spec, heads.heads) for spec, heads in site.program.reused] \
        if site.module_reuse is None or sees_text is not False else []
    if site.module_reuse is not None and sees_text is not True:
        groups.append((site.module_reuse, WHOLE_MODULE))
    for spec, heads in groups:
        params, key = spec.param_dict, site.key(heads)
        decision, entry = decide_reuse(site.state.reuse_entry(key), step=site.step, batch=batch, grid=site.grid,
                                       dense_now=site.dense_now, refresh_interval=site.refresh_interval,
                                       extrapolate=params["extrapolate"], order=params["order"])
        if entry is not None:
            site.state.keep_reuse(key, entry)
        site.decisions.reuse[heads] = ReuseStep(decision, entry)


def _decide_refreshes(site: AttentionSite, batch: int) -> None:
    """Re-scaled groups: use the last refresh's statistics or refresh them; dynamic groups: keep or estimate."""
    def fresh(entry) -> bool:
        return entry is not None and entry.fresh_at(site.step, batch, site.grid, site.refresh_interval)

    state = site.state
    for _, heads in site.program.rescaled:
        key = site.key(heads.heads)
        entry = state.rescale_entry(key)
        use = fresh(entry) and entry.ratio is not None
        if not use:
            entry = state.new_rescale(key, site.step, batch, site.grid)
        site.decisions.rescale[heads.heads] = RefreshStep(use, entry)
    for spec, heads in site.program.sparse_groups():
        if spec.impl.dynamic:
            key = site.key(heads)
            entry = state.layout_entry(key)
            keep = fresh(entry)
            if not keep:
                entry = state.new_layout(key, site.step, batch, site.grid)
            site.decisions.layouts[heads] = RefreshStep(keep, entry)


def _prepare_static_layouts(site: AttentionSite, batch: int, device, dtype) -> None:
    """Static layouts, their density and the executor's tables, built before the forward (and any compiled graph)."""
    prepare = site.executor.prepare or (lambda *args: None)
    static = [(launch_layout(launch, site, None, None, device), len(launch.heads.heads))
              for launch in site.program.launches if not launch.dynamic]
    static += [(static_layout(spec, site, device), len(heads.heads)) for spec, heads in site.program.rescaled
               if not spec.impl.dynamic]
    for layout, heads in static:
        layout.density(), layout.max_level  # memoised now: read at every call
        prepare(layout, batch, heads, dtype, device)


def whole_module_reuse(heads: tuple[HeadStrategy, ...]) -> HeadStrategy | None:
    """The one `reuse` strategy of a module whose heads all reuse alike, else None. Such a module, when attention
    sees no text tokens, is reused as a whole by the processor: its projections, RoPE and output projection are
    affine around attention, so reusing (or extrapolating) their result equals doing so for the attention output,
    and none of them has to run between refreshes."""
    first = heads[0]
    if first.impl.reuses and all(spec == first for spec in heads):
        return first
    return None


def reused_module_output(site: AttentionSite) -> torch.Tensor | None:
    """The kept output of a wholly reused module between refreshes (None: run the module). Counts the attention
    it stands for as not computed, as `attend` does for a reused head."""
    if site.module_reuse is None or site.dense_now:
        return None
    step = site.decisions.reuse_step(WHOLE_MODULE)
    if step.decision is None or not step.decision.reuse:
        return None
    out = reused_output(step)
    b, n = step.entry.batch, site.grid.num_tokens
    site.stats.called()
    site.stats.add(b * len(site.heads) * n * n * site.row_share, 0)
    # The model may write into what a module returns; the kept output must stay as it was.
    return out.clone() if out is step.entry.outputs[-1] else out


def keep_module_output(site: AttentionSite, out: torch.Tensor, sees_text: bool) -> None:
    """After a wholly reused module ran (a refresh, or a dense step to extrapolate from): keep its output when its
    attention saw video tokens alone (`attend` then kept nothing per head)."""
    if site.module_reuse is None or sees_text:
        return
    site.decisions.reuse_step(WHOLE_MODULE).keep(out)


def _forget_the_kind_not_kept(site: AttentionSite, sees_text: bool | None) -> None:
    """Before the first call of a module whose heads all reuse, decisions were made both per head and for the whole
    module, not knowing whether its attention sees text; once it is known, drop the bookkeeping of the other kind."""
    if sees_text is None or site.module_reuse is None:
        return
    if sees_text:
        site.state.forget_reuse(site.key(WHOLE_MODULE))
    else:
        for _, heads in site.program.reused:
            site.state.forget_reuse(site.key(heads.heads))
