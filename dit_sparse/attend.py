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
from .parallel.ring import QueryRows, rows_only
from .plan import HeadStrategy
from .step_state import (
    DynamicLayout,
    KeptOutputs,
    RescaleState,
    ReuseDecision,
    decide_reuse,
    keep_outputs,
    taylor_forecast,
    weighted_sum,
)
from .strategies import BuildContext, get_strategy
from .strategies.dense import full_layout
from .timing import kernel_call

__all__ = ["AttentionSite", "AttentionStats", "HeadProgram", "TextTokens", "attend", "decide_module",
           "taylor_forecast"]


class AttentionStats:
    """Counts attention calls and query-key pairs: what dense attention would compute and what was computed (pooled
    keys once). The counters are CPU tensors, added to in place: a compiled graph updates them without reading
    them (a Python number would be read, and guarded on, at every call); reading them here needs no device."""

    def __init__(self):
        self._counts = torch.zeros(3, dtype=torch.float64)  # calls, dense pairs, computed pairs

    def called(self) -> None:
        self._counts[0] += 1

    def add(self, dense: float, computed: float) -> None:
        self._counts[1] += dense
        self._counts[2] += computed

    @property
    def calls(self) -> int:
        return int(self._counts[0])

    @property
    def dense_pairs(self) -> float:
        return float(self._counts[1])

    @property
    def computed_pairs(self) -> float:
        return float(self._counts[2])

    @property
    def executed_density(self) -> float:
        return self.computed_pairs / self.dense_pairs if self.dense_pairs else 1.0

    def reset(self) -> None:
        self._counts.zero_()

    def summed_over_ranks(self) -> "AttentionStats":
        """Under context parallelism each rank counts its own heads and query rows: the whole model's counts are
        their sum over every rank (a collective: every rank must call it). Itself without a process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        counts = self._counts.clone()
        if "nccl" in str(dist.get_backend()):
            counts = counts.to(torch.device("cuda", torch.cuda.current_device()))  # NCCL reduces device tensors only
        dist.all_reduce(counts)
        total = AttentionStats()
        total._counts = counts.cpu()
        total._counts[0] = self._counts[0]  # calls: this rank's, which every rank makes alike
        return total


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
        """(B, S) key mask over the joint sequence, or None when no text token is padded. Whether any is, is read
        only from a mask on the CPU: on a GPU that read would wait for the device, and inside a compiled graph it
        would break it, so there a given mask is always applied (the same output)."""
        if self.mask is None:
            return None
        if self.mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(self.mask.all()):
            return None
        full = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        full[:, self.slices(seq_len)[1]] = self.mask.bool()
        return full


@dataclass(frozen=True, eq=False)
class HeadSet:
    """Some heads of a module, ascending: a slice where they are contiguous (a view, no copy), else an index
    tensor kept per device (made once, so that no call copies indices from the host)."""

    heads: tuple[int, ...]
    _index: dict = field(default_factory=dict, repr=False)

    @property
    def contiguous(self) -> bool:
        return self.heads == tuple(range(self.heads[0], self.heads[-1] + 1))

    def prepare(self, device) -> None:
        if not self.contiguous and device not in self._index:
            self._index[device] = torch.tensor(self.heads, device=device)

    def take(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        if self.contiguous:
            return x.narrow(dim, self.heads[0], len(self.heads))
        self.prepare(x.device)
        return x.index_select(dim, self._index[x.device])

    def put(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """out[:, :, heads] = values, in place."""
        if self.contiguous:
            out.narrow(2, self.heads[0], len(self.heads)).copy_(values)
        else:
            self.prepare(out.device)
            out.index_copy_(2, self._index[out.device], values.to(out.dtype))


@dataclass(frozen=True)
class Launch:
    """Heads whose layouts run through the executor in one call (one FP8 setting), each with its own look-up table
    rows: `members` are the (strategy, heads) groups it holds."""

    fp8: bool
    heads: HeadSet
    members: tuple[tuple[HeadStrategy, tuple[int, ...]], ...]


@dataclass(frozen=True)
class HeadProgram:
    """How a module's heads run at a sparse step, by what each strategy needs."""

    launches: tuple[Launch, ...]  # layouts without re-scaling: one executor call per FP8 setting
    rescaled: tuple[tuple[HeadStrategy, HeadSet], ...]  # one executor call and statistics per group
    dense: tuple[HeadSet, ...]  # the best dense kernel
    reused: tuple[tuple[HeadStrategy, HeadSet], ...]  # dense at refreshes, kept outputs between
    skipped: HeadSet | None

    @classmethod
    def of(cls, heads: tuple[HeadStrategy, ...]) -> "HeadProgram":
        grouped: dict[HeadStrategy, list[int]] = {}
        for head, spec in enumerate(heads):
            grouped.setdefault(spec, []).append(head)
        launches: dict[bool, list] = {}
        rescaled, dense, reused, skipped = [], [], [], []
        for spec, members in grouped.items():
            strategy = get_strategy(spec.strategy)
            if strategy.reuses:
                reused.append((spec, HeadSet(tuple(members))))
            elif not strategy.computes:
                skipped.extend(members)
            elif spec.strategy == "dense" and not spec.fp8:
                dense.append(members)
            elif spec.rescale:
                rescaled.append((spec, HeadSet(tuple(members))))
            else:
                launches.setdefault(spec.fp8, []).append((spec, tuple(members)))
        dense_heads = sorted(h for members in dense for h in members)
        return cls(
            tuple(Launch(fp8, HeadSet(tuple(sorted(h for _, m in groups for h in m))), tuple(groups))
                  for fp8, groups in launches.items()),
            tuple(rescaled), (HeadSet(tuple(dense_heads)),) if dense_heads else (), tuple(reused),
            HeadSet(tuple(sorted(skipped))) if skipped else None)

    def head_sets(self):
        yield from (launch.heads for launch in self.launches)
        yield from (heads for _, heads in self.rescaled)
        yield from self.dense
        yield from (heads for _, heads in self.reused)
        if self.skipped is not None:
            yield self.skipped


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
    cache: dict[Any, Any]  # per transformer: kept outputs, dynamic layouts and rescale statistics across steps
    static_layouts: dict[Any, BlockLayout]
    stats: AttentionStats = field(default_factory=AttentionStats)
    # Set by the processor to the one `reuse` strategy of a module whose heads all reuse alike: then, if attend sees
    # no text tokens, the processor keeps the module's whole output and attend keeps nothing per head.
    module_reuse: HeadStrategy | None = None
    saw_text: bool | None = None  # set by attend
    # This step's decisions on the stateful heads (`decide_module`, on the host before the forward runs); attend
    # makes them itself when it is called without them.
    decisions: dict[Any, Any] | None = None
    program: HeadProgram | None = None
    # Under ring parallelism, the rows of q whose outputs this rank keeps (the rest is filler): attend computes
    # only those. None: every row.
    query_rows: QueryRows | None = None
    row_share: float = 1.0  # the share of the query rows this rank computes (ring parallelism), for the counters


def decide_module(site: AttentionSite, batch: int, saw_text: bool | None = None, device=None, dtype=None) -> None:
    """Make this step's decisions for every stateful head of the module (host only: step numbers are compared here
    and nowhere in attend), build its static layouts and head indices on `device`, and move the bookkeeping on.
    saw_text: whether the module's attention sees text tokens (None: not known yet, decide for both cases).

    Decisions are keyed without the module's name and hold the cache entry they are about: a compiled graph looks
    them up with the same keys in every layer, so repeated blocks share it."""
    site.program = site.program or HeadProgram.of(site.heads)
    site.decisions = {}
    _forget_the_kind_not_kept(site, saw_text)
    _decide_reuse(site, batch, saw_text)
    if not site.dense_now:
        _decide_refreshes(site, batch)
        if device is not None:
            _prepare_static_layouts(site, batch, device, dtype)
    if device is not None:
        for heads in site.program.head_sets():
            heads.prepare(device)


def _decide_reuse(site: AttentionSite, batch: int, saw_text: bool | None) -> None:
    """Per `reuse` group (or for the whole module): reuse the kept outputs, or run and keep."""
    keys = [(spec, heads.heads) for spec, heads in site.program.reused] \
        if site.module_reuse is None or saw_text is not False else []
    if site.module_reuse is not None and saw_text is not True:
        keys.append((site.module_reuse, "module"))
    for spec, heads in keys:
        params, key = spec.param_dict, _cache_key(site, "reuse", heads)
        decision, kept = decide_reuse(site.cache.get(key), step=site.step, batch=batch, grid=site.grid,
                                      dense_now=site.dense_now, refresh_interval=site.refresh_interval,
                                      extrapolate=params["extrapolate"], order=params["order"])
        if kept is not None:
            site.cache[key] = kept
        site.decisions[("reuse", heads)] = (decision, kept)


def _decide_refreshes(site: AttentionSite, batch: int) -> None:
    """Re-scaled groups: use the last refresh's statistics or refresh them; dynamic groups: keep or estimate."""
    def fresh(entry) -> bool:
        return entry is not None and entry.fresh_at(site.step, batch, site.grid, site.refresh_interval)

    for _, heads in site.program.rescaled:
        key = _cache_key(site, "rescale", heads.heads)
        entry = site.cache.get(key)
        use = fresh(entry) and entry.ratio is not None
        if not use:
            entry = site.cache[key] = RescaleState(site.step, batch, site.grid)
        site.decisions[("rescale", heads.heads)] = (use, entry)
    members = [m for launch in site.program.launches for m in launch.members]
    for spec, heads in members + [(spec, heads.heads) for spec, heads in site.program.rescaled]:
        if get_strategy(spec.strategy).dynamic:
            key = _cache_key(site, "layout", heads)
            entry = site.cache.get(key)
            keep = fresh(entry)
            if not keep:
                entry = site.cache[key] = DynamicLayout(site.step, batch, site.grid)
            site.decisions[("layout", heads)] = (keep, entry)


def _prepare_static_layouts(site: AttentionSite, batch: int, device, dtype) -> None:
    """Static layouts, their density and the executor's tables, built before the forward (and any compiled graph)."""
    prepare = site.executor.prepare or (lambda *args: None)
    static = [(_launch_layout(launch, site, None, None, device), len(launch.heads.heads))
              for launch in site.program.launches
              if not any(get_strategy(spec.strategy).dynamic for spec, _ in launch.members)]
    static += [(static_layout(spec, site, device), len(heads.heads)) for spec, heads in site.program.rescaled
               if not get_strategy(spec.strategy).dynamic]
    for layout, heads in static:
        layout.density(), layout.max_level  # memoised now: read at every call
        prepare(layout, batch, heads, dtype, device)


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
    site.saw_text = text is not None
    keep_per_head = text is not None or site.module_reuse is None
    key_mask = text.key_mask(b, s, q.device) if text else None
    video, text_part = text.slices(s) if text else (slice(0, s), None)
    rows = site.query_rows
    video_rows = None if rows is None else [rows.video]
    share = site.row_share  # of the query rows, those computed here
    program = site.program
    if site.dense_now or all(spec == HeadStrategy("dense") for spec in site.heads):
        site.stats.add(b * h * s * s * share, b * h * s * s * share)
        joint_rows = None if rows is None else [_shifted(rows.video, video)] + (
            [_shifted(rows.text, text_part)] if text else [])
        out = _on_rows(joint_rows, _dense, q, k, v, key_mask)
        for _, heads in program.reused if keep_per_head else ():
            decision, kept = site.decisions.get(("reuse", heads.heads), (None, None))
            if decision is not None and decision.keep:  # a point to extrapolate from; the first refresh extends it
                keep_outputs(kept, decision, heads.take(out[:, video]))
        return out

    out = torch.empty_like(q)
    out_vt = lse_vt = None
    if text:
        out[:, text_part] = _on_rows(None if rows is None else [rows.text], _dense, q[:, text_part], k, v, key_mask)
        text_mask = None if key_mask is None else key_mask[:, text_part]
        out_vt, lse_vt = _on_rows(video_rows, _dense_lse, q[:, video], k[:, text_part], v[:, text_part], text_mask)
        site.stats.add((b * h * text.length * s + b * h * n_video * text.length) * share,
                       (b * h * text.length * s + b * h * n_video * text.length) * share)
    qv, kv, vv = q[:, video], k[:, video], v[:, video]
    out_v = out[:, video]
    site.stats.add(b * h * n_video * n_video * share, 0)

    for launch in program.launches:
        qg = launch.heads.take(qv)
        kg, vg = launch.heads.take(kv), launch.heads.take(vv)
        layout = _launch_layout(launch, site, qg, kg, q.device)
        layout = layout if rows is None else rows_only(layout, rows.video)
        site.stats.add(0, b * len(launch.heads.heads) * n_video * n_video * layout.density())
        o, lse = kernel_call(site.executor.run, qg, kg, vg, layout, fp8=launch.fp8)
        _put_video(out_v, launch.heads, o, lse, out_vt, lse_vt)
    for spec, heads in program.rescaled:
        o, lse = _rescaled(spec, heads, heads.take(qv), heads.take(kv), heads.take(vv), site)
        _put_video(out_v, heads, o, lse, out_vt, lse_vt)
    dense_sets = list(program.dense)
    for _, heads in program.reused:
        decision, kept = site.decisions.get(("reuse", heads.heads), (None, None)) if keep_per_head else (None, None)
        if decision is not None and decision.reuse:
            heads.put(out_v, _reused_output(kept, decision))
        else:
            dense_sets.append(heads)
    for heads in dense_sets:
        # Dense heads see every key, text included, in one call of the best dense kernel: nothing to merge.
        g = len(heads.heads)
        site.stats.add(0, b * g * n_video * n_video * share)  # their video-to-text part is counted with the text
        o = _on_rows(video_rows, _dense, heads.take(qv), heads.take(k), heads.take(v), key_mask)
        heads.put(out_v, o)
    for _, heads in program.reused if keep_per_head else ():
        decision, kept = site.decisions.get(("reuse", heads.heads), (None, None))
        if decision is not None and not decision.reuse and decision.keep:
            keep_outputs(kept, decision, heads.take(out_v))
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


def _on_rows(rows: list[slice] | None, fn, q: torch.Tensor, *args):
    """fn(q, *args): (B, S, H, D) -> out (B, S, H, Dv), or (out, lse (B, H, S)). With `rows` (ring parallelism), fn
    runs on those rows of q only and the other rows are zeros: they hold filler queries whose outputs are discarded."""
    if rows is None:
        return fn(q, *args)
    parts = [(r, fn(q[:, r], *args)) for r in rows if r.stop > r.start]
    if not parts:  # nothing to compute here (ring: text rows merged from the ranks' partial results instead)
        return torch.zeros_like(q)
    first = parts[0][1]
    with_lse = isinstance(first, tuple)
    sample = first[0] if with_lse else first
    out = sample.new_zeros(q.shape[:3] + sample.shape[3:])
    lse = first[1].new_zeros(q.shape[0], q.shape[2], q.shape[1]) if with_lse else None
    for r, part in parts:
        out[:, r] = part[0] if with_lse else part
        if with_lse:
            lse[:, :, r] = part[1]
    return (out, lse) if with_lse else out


def _put_video(out_v, heads: HeadSet, o, lse, out_vt, lse_vt) -> None:
    """Write a sparse video part into the output, merged first with the video-to-text part where there is text."""
    if out_vt is not None:
        o, lse = merge_partials(o, lse, heads.take(out_vt), heads.take(lse_vt, 1))
    heads.put(out_v, o.to(out_v.dtype))


def _cache_key(site: AttentionSite, kind: str, heads: tuple[int, ...] | str) -> tuple:
    """Key of a cache entry kept across steps: kind ("reuse", "rescale", "layout"), the module, its heads ("module":
    the whole module's output), the CFG branch."""
    return (kind, site.module_name, heads, site.branch)


def whole_module_reuse(heads: tuple[HeadStrategy, ...]) -> HeadStrategy | None:
    """The one `reuse` strategy of a module whose heads all reuse alike, else None. Such a module, when attention
    sees no text tokens, is reused as a whole by the processor: its projections, RoPE and output projection are
    affine around attention, so reusing (or extrapolating) their result equals doing so for the attention output,
    and none of them has to run between refreshes."""
    first = heads[0]
    if get_strategy(first.strategy).reuses and all(spec == first for spec in heads):
        return first
    return None


def reused_module_output(site: AttentionSite) -> torch.Tensor | None:
    """The kept output of a wholly reused module between refreshes (None: run the module). Counts the attention
    it stands for as not computed, as `attend` does for a reused head."""
    if site.module_reuse is None or site.dense_now:
        return None
    decision, kept = site.decisions.get(("reuse", "module"), (None, None))
    if decision is None or not decision.reuse:
        return None
    out = _reused_output(kept, decision)
    b, n = kept.batch, site.grid.num_tokens
    site.stats.called()
    site.stats.add(b * len(site.heads) * n * n * site.row_share, 0)
    # The model may write into what a module returns; the kept output must stay as it was.
    return out.clone() if out is kept.outputs[-1] else out


def keep_module_output(site: AttentionSite, out: torch.Tensor) -> None:
    """After a wholly reused module ran (a refresh, or a dense step to extrapolate from): keep its output when its
    attention saw video tokens alone (`attend` then kept nothing per head)."""
    if site.module_reuse is None or site.saw_text is not False:
        return
    decision, kept = site.decisions.get(("reuse", "module"), (None, None))
    if decision is not None and not decision.reuse and decision.keep:
        keep_outputs(kept, decision, out)


def _forget_the_kind_not_kept(site: AttentionSite, saw_text: bool | None) -> None:
    """Before the first call of a module whose heads all reuse, decisions were made both per head and for the whole
    module, not knowing whether its attention sees text; once it is known, drop the bookkeeping of the other kind."""
    if saw_text is None or site.module_reuse is None:
        return
    if saw_text:
        site.cache.pop(_cache_key(site, "reuse", "module"), None)
    else:
        for _, heads in site.program.reused:
            site.cache.pop(_cache_key(site, "reuse", heads.heads), None)


def _reused_output(kept: KeptOutputs, decision: ReuseDecision) -> torch.Tensor:
    """A `reuse` output between refreshes: the newest computed output, or its forecast from the kept ones."""
    if decision.weights is None:
        return kept.outputs[-1]
    points = len(decision.weights)
    return weighted_sum(kept.outputs[-points:], decision.weights).to(kept.outputs[-1].dtype)


def static_layout(spec: HeadStrategy, site: AttentionSite, device) -> BlockLayout:
    return static_layout_at(spec, site.grid, site.block_q, site.block_k, site.static_layouts, device)


def static_layout_at(spec: HeadStrategy, grid: Grid, block_q: int, block_k: int, store: dict, device) -> BlockLayout:
    """A static strategy's layout at this grid and block size, built once and kept in `store`."""
    key = (spec, grid, block_q, block_k, torch.device(device))
    if key not in store:
        ctx = BuildContext(grid, block_q, block_k)
        layout = full_layout(ctx.seq_len, block_q, block_k) if spec.strategy == "dense" else \
            get_strategy(spec.strategy).layout(spec.param_dict, ctx)
        store[key] = _to_device(layout, device)
    return store[key]


def _dynamic_layout(spec: HeadStrategy, heads: tuple[int, ...], q, k, site: AttentionSite) -> BlockLayout:
    """A dynamic group's layout: estimated from its q and k where this step decided so, else the kept one."""
    fresh, entry = site.decisions[("layout", heads)]
    if not fresh or entry.layout is None:
        ctx = BuildContext(site.grid, site.block_q, site.block_k, q, k)
        entry.layout = get_strategy(spec.strategy).layout(spec.param_dict, ctx)
    return entry.layout


def _launch_layout(launch: Launch, site: AttentionSite, q, k, device) -> BlockLayout:
    """One look-up table for every head of a launch, in head order: each member's layout on its own heads' rows.
    Static ones are built once; one with dynamic members is rebuilt when a member's layout changes."""
    layouts = []
    for spec, heads in launch.members:
        if get_strategy(spec.strategy).dynamic:
            index = [launch.heads.heads.index(h) for h in heads]
            layouts.append(_dynamic_layout(spec, heads, q[:, :, index], k[:, :, index], site))
        else:
            layouts.append(static_layout(spec, site, device))
    if len(layouts) == 1:
        return layouts[0]
    dynamic = any(get_strategy(spec.strategy).dynamic for spec, _ in launch.members)
    key = ("launch", site.module_name, launch.fp8, site.branch) if dynamic else \
        ("launch", launch.members, site.grid, site.block_q, site.block_k, torch.device(device))
    store = site.cache if dynamic else site.static_layouts
    kept = store.get(key)
    if kept is None or any(a is not b for a, b in zip(kept[0], layouts)):
        kept = (tuple(layouts), _merge_heads(launch, layouts))
        store[key] = kept
    return kept[1]


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


def _rescaled(spec, heads: HeadSet, q, k, v, site: AttentionSite):
    """Re-scaled softmax: keep each row's in-layout share of mass from the last dense refresh, add its residual."""
    b, s, g, _ = q.shape
    fresh, entry = site.decisions[("rescale", heads.heads)]
    if get_strategy(spec.strategy).dynamic:
        layout = _dynamic_layout(spec, heads.heads, q, k, site)
    else:
        layout = static_layout(spec, site, q.device)
    rows = site.query_rows
    layout = layout if rows is None else rows_only(layout, rows.video)
    out_s, lse_s = kernel_call(site.executor.run, q, k, v, layout, fp8=spec.fp8)
    site.stats.add(0, b * g * s * s * layout.density())
    if fresh:
        out, lse = rescaled_output(out_s, lse_s, entry.ratio, entry.residual)
        return out.to(q.dtype), lse
    out_d, lse_d = _on_rows(None if rows is None else [rows.video], _dense_lse, q, k, v)
    site.stats.add(0, b * g * s * s * site.row_share)
    entry.ratio, entry.residual = rescale_statistics(out_s, lse_s, out_d, lse_d)
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
