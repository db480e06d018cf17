"""Even the work of Ulysses ranks: a head order that gives each rank heads of about equal total cost.

Under Ulysses rank r attends over heads [r * H/N, (r + 1) * H/N); a module whose dense heads sit together makes
one rank do most of the work while the others wait. The order permutes the heads of q, k and v before the
all-to-all and the output's back after it, so the model's weights never change; the plan's heads travel with them.

A head's cost is its share of dense attention work at this grid: a static layout's density, 1 for dense, 0 for
skip, a refresh's share for `reuse`, and for dynamic strategies (whose layouts are not known before they are
estimated) their cap on visited blocks where they have one, else 1.
"""

from __future__ import annotations

import heapq

from ..plan import HeadStrategy


def head_cost(spec: HeadStrategy, static_density, refresh_interval: int) -> float:
    """static_density(spec) -> the density of a static strategy's layout at this grid."""
    strategy = spec.impl
    if strategy.reuses:
        return 1.0 / max(1, refresh_interval)
    if not strategy.computes:
        return 0.0
    if strategy.dense:
        return 1.0
    if strategy.dynamic:
        return float(spec.param_dict.get("cap") or 1.0)
    return static_density(spec)


def balanced_order(costs: list[float], groups: int) -> tuple[int, ...]:
    """A permutation of the heads: groups of len(costs) / groups consecutive entries with even total cost (greedy,
    largest first, each to the least loaded group with room). Heads keep their order within a group; the identity
    when it is already as even."""
    per_group = len(costs) // groups
    loads = [(0.0, g) for g in range(groups)]
    members: list[list[int]] = [[] for _ in range(groups)]
    waiting = []
    for head in sorted(range(len(costs)), key=lambda h: (-costs[h], h)):
        load, group = heapq.heappop(loads)
        while len(members[group]) == per_group:  # full: set aside until every head is placed
            waiting.append((load, group))
            load, group = heapq.heappop(loads)
        members[group].append(head)
        heapq.heappush(loads, (load + costs[head], group))
    order = tuple(h for group in members for h in sorted(group))
    identity = tuple(range(len(costs)))
    return identity if max(rank_costs(costs, identity, groups)) <= max(rank_costs(costs, order, groups)) else order


def rank_costs(costs: list[float], order: tuple[int, ...], groups: int) -> list[float]:
    """The summed cost of each rank's heads under `order`."""
    per_group = len(costs) // groups
    return [sum(costs[h] for h in order[r * per_group:(r + 1) * per_group]) for r in range(groups)]
