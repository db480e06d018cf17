"""What a plan costs each rank under context parallelism, from its layouts alone (no GPU, no weights).

Ulysses: each rank's share of the attention work, in the model's head order and in the balanced one. Ring: the
key/value shards each attention sends, against dense ring attention. Dynamic heads (layouts unknown before they
are estimated) count at their cap for Ulysses; for the ring, each head group needs what `ring_need` says at a refresh
(dense, `reuse`, re-scaled, dynamic and FP8 heads every shard).
"""

from __future__ import annotations

from typing import Any

import torch

from ..head_layouts import static_layout_at
from ..layout import Grid
from ..plan import SparsePlan
from .attention import ring_need
from .balance import balanced_order, head_cost, rank_costs
from .ring import RingTraffic, need_matrix
from .topology import split_lengths


def parallel_report(plan: SparsePlan, grid: Grid, block_q: int, block_k: int, ulysses: int = 1,
                    ring: int = 1) -> dict[str, Any]:
    """Summed over the plan's modules at one sparse step: the busiest Ulysses rank's work against the mean (1.0 is
    even) before and after balancing, and the ring's shards sent against dense ring attention's."""
    store: dict = {}
    per_heads: dict = {}
    totals = {"before": [0.0] * ulysses, "after": [0.0] * ulysses, "sent": 0, "dense": 0}
    for name in plan.modules:
        heads = plan.heads_for(name)
        if heads not in per_heads:
            per_heads[heads] = _module(heads, plan, grid, block_q, block_k, ulysses, ring, store)
        module = per_heads[heads]
        for key in ("before", "after"):
            totals[key] = [a + b for a, b in zip(totals[key], module[key])]
        totals["sent"] += module["sent"]
        totals["dense"] += module["dense"]

    def imbalance(work):
        mean = sum(work) / len(work)
        return max(work) / mean if mean else 1.0

    return {
        "grid": [grid.frames, grid.height, grid.width], "tokens": grid.num_tokens, "blocks": [block_q, block_k],
        "ulysses": ulysses, "ring": ring,
        "ulysses_rank_work": {"model_order": totals["before"], "balanced": totals["after"]},
        "ulysses_imbalance": {"model_order": imbalance(totals["before"]), "balanced": imbalance(totals["after"])},
        "ring_shards": {"sent": totals["sent"], "dense": totals["dense"],
                        "saved": 1.0 - totals["sent"] / totals["dense"] if totals["dense"] else 0.0},
    }


def _module(heads, plan, grid, block_q, block_k, ulysses, ring, store) -> dict[str, Any]:
    def layout(spec):
        return static_layout_at(spec, grid, block_q, block_k, store, "cpu")

    costs = [head_cost(spec, lambda s: layout(s).density(), plan.schedule.refresh_interval) for spec in heads]
    identity = tuple(range(len(heads)))
    result = {"before": rank_costs(costs, identity, ulysses),
              "after": rank_costs(costs, balanced_order(costs, ulysses), ulysses)}
    need = torch.zeros(ring, ring, dtype=torch.bool)
    for spec in set(heads):
        group = ring_need(spec)  # at a refresh, where a group needs the most
        if group.every_shard or group.whole_q:
            need[:] = True
        elif group.layout:
            need |= need_matrix(layout(spec), split_lengths(grid.num_tokens, ring))
    traffic = RingTraffic.of(need)
    result.update(sent=traffic.sent, dense=traffic.dense)
    return result
