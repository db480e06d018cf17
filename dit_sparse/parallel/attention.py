"""One covered attention under context parallelism: what `attend` does on one GPU, with the sequence split.

Ulysses first (within the Ulysses group: the whole of the ring shard, some heads), then ring (within the ring
group: this rank's query rows against the key/value shards its layouts visit). Each rank's site already holds the
plan of its own heads (the processor cut it at the Ulysses head offset), so static layouts, dynamic estimates and
kept state are per rank and need no exchange beyond q, k and v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attend import attend
from ..dense import dense_attention_lse
from ..head_layouts import static_layout
from ..plan import HeadStrategy
from ..site import AttentionSite, TextTokens
from ..state import NOT_DECIDED
from . import ring, ulysses
from .topology import SequenceParallel, UnsupportedParallelismError


def parallel_attend(q, k, v, site: AttentionSite, text: TextTokens | None, topology: SequenceParallel,
                    head_order: tuple[int, ...] | None = None, text_total: int | None = None):
    """q, k, v: (B, s, H, D), this rank's sequence shard ([text, video] pieces as the model orders them) of every
    head. Returns this rank's shard of the output, (B, s, H, D). head_order: the heads' order for the Ulysses
    all-to-all (balance.py); the output comes back in the model's order. text_total: the text's length in the
    transformer's input; a text of that length here was left whole on every rank by the cp_plan, a shorter one is
    this rank's shard of it."""
    if text is not None and text_total is None:
        raise UnsupportedParallelismError(
            f"{site.module_name}: joint attention under context parallelism needs the text as the transformer's "
            "encoder_hidden_states argument, to tell a split text from a whole one")
    replicated = text is not None and text.length == text_total
    if text is not None and text.mask is not None and not replicated:
        raise UnsupportedParallelismError(
            f"{site.module_name}: padded text tokens (an attention mask) split across ranks are not supported; a "
            "cp_plan that keeps the text whole on every rank (as dit_sparse.context_parallel_plan's) is")
    split_text = text is not None and not replicated
    lengths = _Lengths(topology, site.grid.num_tokens, text_total if split_text else None)
    local_text = text
    if head_order is not None:
        order = _order_index(head_order, q.device)
        q, k, v = (x.index_select(2, order) for x in (q, k, v))
    if topology.ulysses_size > 1:
        group, rank = topology.ulysses_group, topology.ulysses_rank
        if replicated:
            q, k, v = (ulysses.gather_video(x, text, group, lengths.ulysses_video, rank) for x in (q, k, v))
        else:
            q, k, v = (ulysses.gather_sequence(x, group, lengths.ulysses_joint) for x in (q, k, v))
            (q, text), (k, _), (v, _) = (ulysses.in_model_order(x, local_text, lengths.ulysses_text)
                                         for x in (q, k, v))
    if topology.ring_size > 1:
        out = _ring_attend(q, k, v, site, text, topology, replicated, lengths)
    else:
        out = attend(q, k, v, site, text)
    if topology.ulysses_size > 1:
        group, rank = topology.ulysses_group, topology.ulysses_rank
        if replicated:
            out = ulysses.scatter_video(out, text, group, lengths.ulysses_video, rank)
        else:
            pieces = ulysses.in_rank_order(out, local_text, lengths.ulysses_text, lengths.ulysses_video)
            out = ulysses.scatter_sequence(pieces, group, rank)
    if head_order is not None:
        out = out.index_select(2, _order_index(tuple(sorted(range(len(head_order)), key=head_order.__getitem__)),
                                               out.device))
    return out


class _Lengths:
    """Token counts of every rank's shard, as diffusers split them (even, or `tensor_split` for its `*_anything`
    modes): video, and text where the text is split; per Ulysses rank of this group and per ring rank."""

    def __init__(self, topology: SequenceParallel, video: int, text: int | None):
        self.ulysses_video = topology.ulysses_lengths(video)
        self.ring_video = topology.ring_lengths(video)
        self.ulysses_text = topology.ulysses_lengths(text) if text is not None else None
        self.ring_text = topology.ring_lengths(text) if text is not None else None
        self.ulysses_joint = self.ulysses_video if text is None else \
            [t + v for t, v in zip(self.ulysses_text, self.ulysses_video)]


def gather_split_text(x: torch.Tensor, dim: int, topology: SequenceParallel, total: int) -> torch.Tensor:
    """A text the model's cp_plan split over every rank (LTX-Video's; `total` tokens), whole again: for
    cross-attention that the family's own processor runs, which then attends this rank's queries to all of it with
    no parallelism of its own (exact; diffusers' own parallel cross-attention cannot mask, nor ring on CPU)."""
    return torch.cat(ring.all_gather(x, topology.world_group, topology.shard_lengths(total), dim), dim)


_ORDER_INDICES: dict = {}


def _order_index(order: tuple[int, ...], device) -> torch.Tensor:
    """A head order as an index tensor on the device, made once."""
    key = (order, str(device))
    if key not in _ORDER_INDICES:
        _ORDER_INDICES[key] = torch.tensor(order, device=device)
    return _ORDER_INDICES[key]


def _ring_attend(q, k, v, site: AttentionSite, text: TextTokens | None, topology: SequenceParallel,
                 replicated: bool, lengths: _Lengths):
    rank, group = topology.ring_rank, topology.ring_group
    b, s, h, d = q.shape
    video, text_part = text.slices(s) if text else (slice(0, s), None)
    video_lengths, n_video = lengths.ring_video, sum(lengths.ring_video)
    everything, whole_q = _what_ring_needs(site, text is not None)
    shard = torch.stack([q[:, video], k[:, video], v[:, video]] if whole_q else [k[:, video], v[:, video]])
    size = topology.ring_size
    topology.traffic["dense"] += size * (size - 1)
    if everything or whole_q:
        pieces = ring.all_gather(shard, group, video_lengths, 2)
        topology.traffic["sent"] += size * (size - 1)
    else:
        need = torch.zeros(size, size, dtype=torch.bool)
        for layout in _layouts_in_use(site, q.device):
            need |= ring.need_matrix(layout, video_lengths)
        received = ring.exchange(shard, need, group, rank, video_lengths, 2)
        received[rank] = shard
        pieces = [received.get(i) for i in range(size)]
        topology.traffic["sent"] += ring.RingTraffic.of(need).sent
    k_video, v_video = (torch.cat([p[i] if p is not None else shard.new_zeros(b, n, h, d)
                                   for p, n in zip(pieces, video_lengths)], 1) for i in (-2, -1))
    mine = ring.shard_slice(video_lengths, rank)
    if whole_q:
        q_video = torch.cat([p[0] for p in pieces], 1)
    else:
        q_video = q.new_zeros(b, n_video, h, d)
        q_video[:, mine] = q[:, video]
    rows = ring.QueryRows(mine)
    if text is None:
        return _attend_rows(q_video, k_video, v_video, site, None, rows)[:, rows.video]
    if replicated:  # every rank has all of the text, and computes all of its rows
        n_text = text.length
        q_text, k_text, v_text = q[:, text_part], k[:, text_part], v[:, text_part]
        rows = ring.QueryRows(rows.video, slice(0, n_text))
    else:
        n_text = sum(lengths.ring_text)
        text_kv = ring.all_gather(torch.stack([k[:, text_part], v[:, text_part]]), group, lengths.ring_text, 2)
        k_text, v_text = (torch.cat([p[i] for p in text_kv], 1) for i in (0, 1))
        q_text = q.new_zeros(b, n_text, h, d)
        q_text[:, ring.shard_slice(lengths.ring_text, rank)] = q[:, text_part]
        rows = ring.QueryRows(rows.video, ring.shard_slice(lengths.ring_text, rank))
    full_text = TextTokens(n_text, text.first, text.mask if replicated else None)
    text_out = None
    if not (everything or whole_q):
        # Text queries attend to every key, and this rank holds only some video shards: their rows come from
        # every rank's partial result instead, and attend computes none of them.
        text_out = _text_rows_from_partials(q[:, text_part], k_text, v_text, k[:, video], v[:, video], topology,
                                            None if replicated else lengths.ring_text,
                                            text.mask if replicated else None)
        rows = ring.QueryRows(rows.video, slice(0, 0))
    order = (lambda t, vid: (t, vid)) if text.first else (lambda t, vid: (vid, t))
    q_full, k_full, v_full = (torch.cat(order(t, vid), 1) for t, vid in
                              ((q_text, q_video), (k_text, k_video), (v_text, v_video)))
    out = _attend_rows(q_full, k_full, v_full, site, full_text, rows)
    full_video, full_text_part = full_text.slices(out.shape[1])
    mine_video = out[:, full_video][:, rows.video]
    mine_text = out[:, full_text_part][:, rows.text] if text_out is None else text_out
    return torch.cat((mine_text, mine_video) if text.first else (mine_video, mine_text), 1)


def _attend_rows(q, k, v, site: AttentionSite, text: TextTokens | None, rows: ring.QueryRows):
    site.query_rows = rows
    try:
        return attend(q, k, v, site, text)
    finally:
        site.query_rows = None


def _text_rows_from_partials(q_text, k_text, v_text, k_video, v_video, topology: SequenceParallel,
                             text_lengths: list[int] | None, text_mask=None):
    """This rank's text rows of a joint attention, where ranks hold only some video shards: every rank attends all
    text queries to the keys it owns (its video shard; all text keys on ring rank 0 alone, so that none counts twice),
    and the partial results merge exactly by their log-sum-exp. Text is short: this moves little. text_lengths:
    the ring ranks' text shards (None: the text is whole on every rank, text_mask (B, T) its padding, and every rank
    keeps every text row)."""
    rank, group = topology.ring_rank, topology.ring_group
    queries = q_text if text_lengths is None else torch.cat(ring.all_gather(q_text, group, text_lengths, 1), 1)
    keys = torch.cat([k_text, k_video], 1) if rank == 0 else k_video
    values = torch.cat([v_text, v_video], 1) if rank == 0 else v_video
    key_mask = None
    if text_mask is not None and rank == 0:
        key_mask = torch.cat([text_mask.bool(), text_mask.new_ones(text_mask.shape[0], k_video.shape[1]).bool()], 1)
    out, lse = dense_attention_lse(queries, keys, values, key_mask)
    everyone = [queries.shape[1]] * topology.ring_size
    outs = torch.stack(ring.all_gather(out.float(), group, everyone, 1))  # (R, B, T, h, D)
    lses = torch.stack(ring.all_gather(lse, group, everyone, 2))  # (R, B, h, T)
    total = torch.logsumexp(lses, 0)
    weights = torch.exp(lses - total).transpose(2, 3).unsqueeze(-1)  # (R, B, T, h, 1)
    merged = (outs * weights).sum(0).to(q_text.dtype)
    return merged if text_lengths is None else merged[:, ring.shard_slice(text_lengths, rank)]


@dataclass(frozen=True)
class RingNeed:
    """What one head group needs from the other ring ranks at a step: every key/value shard (`every_shard`: dense
    work), the whole q too (`whole_q`: a layout estimated now reads the whole q and k, and so do FP8 heads, whose keys
    are centred on the mean of all keys and queries scaled per query block, a block may straddle two ranks' rows),
    or the key shards its layout visits (`layout`). Skipped heads, and reused ones between refreshes, need none."""

    every_shard: bool = False
    whole_q: bool = False
    layout: bool = False


def ring_need(spec: HeadStrategy, *, reusing: bool = False, statistics_kept: bool = False,
              layout_kept: bool = False) -> RingNeed:
    """The one rule for what a head group of `spec` needs (RingNeed). The defaults describe a refresh, where it needs
    the most: `reuse` not reusing (`reusing`: its kept output stands in now), re-scaled heads refreshing their
    statistics (`statistics_kept`: they use the last ones), dynamic layouts estimated (`layout_kept`: the last one)."""
    if spec.impl.reuses:
        return RingNeed(every_shard=not reusing)
    if not spec.impl.computes:
        return RingNeed()
    if spec.runs_dense:
        return RingNeed(every_shard=True)
    return RingNeed(every_shard=spec.rescale and not statistics_kept,
                    whole_q=spec.fp8 or (spec.impl.dynamic and not layout_kept), layout=True)


def _what_ring_needs(site: AttentionSite, has_text: bool) -> tuple[bool, bool]:
    """(every key/value shard, every q shard too) for this step of the module, by `ring_need` of each head group
    with this step's decisions; a dense step visits every key."""
    if site.dense_now:
        return True, False
    program, decisions = site.program, site.decisions
    keep_per_head = has_text or site.module_reuse is None
    needs = [RingNeed(every_shard=True)] if program.dense else []
    for spec, heads in program.reused:
        step = decisions.reuse_step(heads.heads) if keep_per_head else NOT_DECIDED
        needs.append(ring_need(spec, reusing=step.decision is not None and step.decision.reuse))
    for spec, heads in program.sparse_groups():
        layout = decisions.layouts.get(heads)
        statistics = decisions.rescale.get(heads)
        needs.append(ring_need(spec, statistics_kept=statistics is not None and statistics.kept,
                               layout_kept=layout is not None and layout.kept and layout.entry.layout is not None))
    return any(need.every_shard for need in needs), any(need.whole_q for need in needs)


def _layouts_in_use(site: AttentionSite, device):
    """The layouts of this step's sparse heads, known before attention when nothing is estimated now."""
    for spec, heads in site.program.sparse_groups():
        if spec.impl.dynamic:
            yield site.decisions.layouts[heads].entry.layout
        else:
            yield static_layout(spec, site, device)
