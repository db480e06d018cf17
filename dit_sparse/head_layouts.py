"""The layouts a site's heads run: static ones built once per grid and block size, dynamic ones as this step
decided, and a launch's one table stacked from its members' layouts."""

from __future__ import annotations

import torch

from .layout import BlockLayout, Grid
from .plan import HeadStrategy
from .program import Launch
from .site import AttentionSite
from .strategies import BuildContext


def static_layout(spec: HeadStrategy, site: AttentionSite, device) -> BlockLayout:
    return static_layout_at(spec, site.grid, site.block_q, site.block_k, site.static_layouts, device)


def static_layout_at(spec: HeadStrategy, grid: Grid, block_q: int, block_k: int, store: dict, device) -> BlockLayout:
    """A static strategy's layout at this grid and block size, built once and kept in `store`."""
    key = (spec, grid, block_q, block_k, torch.device(device))
    if key not in store:
        store[key] = _to_device(spec.impl.layout(spec.param_dict, BuildContext(grid, block_q, block_k)), device)
    return store[key]


def dynamic_layout(spec: HeadStrategy, heads: tuple[int, ...], q, k, site: AttentionSite) -> BlockLayout:
    """A dynamic group's layout: estimated from its q and k where this step decided so, else the kept one."""
    step = site.decisions.layouts[heads]
    if not step.kept or step.entry.layout is None:
        ctx = BuildContext(site.grid, site.block_q, site.block_k, q, k)
        step.entry.layout = spec.impl.layout(spec.param_dict, ctx)
    return step.entry.layout


def group_layout(spec: HeadStrategy, heads: tuple[int, ...], q, k, site: AttentionSite) -> BlockLayout:
    """The layout one group of heads runs at this step, static or dynamic."""
    if spec.impl.dynamic:
        return dynamic_layout(spec, heads, q, k, site)
    return static_layout(spec, site, q.device)


def launch_layout(launch: Launch, site: AttentionSite, q, k, device) -> BlockLayout:
    """One look-up table for every head of a launch, in head order: each member's layout on its own heads' rows.
    Static ones are built once; one with dynamic members is rebuilt when a member's layout changes."""
    layouts = []
    for spec, heads in launch.members:
        if spec.impl.dynamic:
            index = [launch.heads.heads.index(h) for h in heads]
            layouts.append(dynamic_layout(spec, heads, q[:, :, index], k[:, :, index], site))
        else:
            layouts.append(static_layout(spec, site, device))
    if len(layouts) == 1:
        return layouts[0]
    if launch.dynamic:
        key = site.key(launch.heads.heads)
        merged = site.state.merged_layout(key, layouts)
        if merged is None:
            merged = _merge_heads(launch, layouts)
            site.state.keep_merged(key, layouts, merged)
        return merged
    key = ("launch", launch.members, site.grid, site.block_q, site.block_k, torch.device(device))
    if key not in site.static_layouts:
        site.static_layouts[key] = _merge_heads(launch, layouts)
    return site.static_layouts[key]


def _merge_heads(launch: Launch, layouts: list[BlockLayout]) -> BlockLayout:
    """The members' layouts stacked along heads in the launch's head order (runs of one member's heads at a time)."""
    owner = {h: (m, i) for m, (_, heads) in enumerate(launch.members) for i, h in enumerate(heads)}
    runs: list[tuple[int, list[int]]] = []
    for head in launch.heads.heads:
        member, index = owner[head]
        if runs and runs[-1][0] == member and runs[-1][1][-1] == index - 1:
            runs[-1][1].append(index)
        else:
            runs.append((member, [index]))
    parts = [layouts[m].select_heads(indices) for m, indices in runs]
    return BlockLayout.concat_heads(parts, [len(indices) for _, indices in runs])


def _to_device(layout: BlockLayout, device) -> BlockLayout:
    if layout.kv_index.device == torch.device(device):
        return layout
    level = None if layout.kv_level is None else layout.kv_level.to(device)
    return BlockLayout(layout.seq_len, layout.block_q, layout.block_k, layout.kv_index.to(device),
                       layout.kv_count.to(device), level)
