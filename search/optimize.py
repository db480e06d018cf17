"""Finding an assignment of candidates to heads: Lagrangian relaxation (each head independently minimises objective +
multiplier x constraint, with launch overheads shared evenly by a layer's heads), a bisection on the multiplier to
meet the budget, then a local search on the exact objective with single-head and whole-group moves, which is where
head fusion happens: a small group merges into another strategy of its layer when the launch it saves pays for it.
Objectives and constraints are named "time", "error" or "density" (see `Problem.totals`).
"""

from __future__ import annotations

import math

import numpy as np

from .problem import Problem

_TOL = 1e-12


def relax(prob: Problem, f: np.ndarray, g: np.ndarray, lam: float) -> np.ndarray:
    """Each head's argmin of f + lam * g over allowed candidates (ties: lower g, then lower f)."""
    scale_f = np.abs(f[np.isfinite(f)]).max(initial=1.0) or 1.0
    scale_g = np.abs(g[np.isfinite(g)]).max(initial=1.0) or 1.0
    total = f + lam * g + 1e-9 * (g / scale_g) * scale_f + 1e-12 * scale_f * (f / scale_f)
    total = np.where(prob.allowed, total, np.inf)
    return np.argmin(total, axis=2)


def _lagrange(prob: Problem, f_name: str, g_name: str, budget: float) -> tuple[np.ndarray, float]:
    """Smallest multiplier whose relaxed solution meets `budget` on the exact g; returns (assignment, lambda)."""
    f, g = prob.metric(f_name), prob.metric(g_name)

    def g_exact(a):
        return prob.totals(a)[g_name]

    a0 = relax(prob, f, g, 0.0)
    if g_exact(a0) <= budget:
        return a0, 0.0
    finite_f = f[np.isfinite(f) & prob.allowed]
    finite_g = g[np.isfinite(g) & prob.allowed]
    ratio = (np.ptp(finite_f) + 1e-30) / (np.ptp(finite_g) + 1e-30)
    lo, hi = ratio * 1e-9, ratio
    for _ in range(60):
        if g_exact(relax(prob, f, g, hi)) <= budget:
            break
        lo, hi = hi, hi * 10
    else:
        return relax(prob, f, g, hi), hi
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if g_exact(relax(prob, f, g, mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-6:
            break
    return relax(prob, f, g, hi), hi


def _deltas(prob: Problem, a: np.ndarray):
    """Exact changes of (time, error sum, density sum) for every single-head move (M, H, C) and every
    whole-group move (M, C, C') of a layer's shared group c to c'."""
    m, h, c = prob.shape
    counts = prob.counts(a)
    cur = a[..., None]
    p_cur = np.take_along_axis(prob.p, cur, 2)
    e_cur = np.take_along_axis(prob.err, cur, 2)
    d_cur = np.take_along_axis(prob.dens, cur, 2)
    own_count = np.take_along_axis(counts, a, 1)
    leave = np.where(prob.perhead[a] | (own_count == 1), prob.o[a], 0.0)[..., None]
    join = np.where(prob.perhead[None, :] | (counts == 0), prob.o[None, :], 0.0)[:, None, :]
    same = np.arange(c)[None, None, :] == cur
    dt = np.where(same, 0.0, prob.p - p_cur + join - leave)
    de = np.where(same, 0.0, prob.err - e_cur)
    dd = np.where(same, 0.0, prob.dens - d_cur)
    single = (dt, de, dd, prob.allowed & ~same)

    onehot = np.zeros((m, h, c))
    np.put_along_axis(onehot, cur, 1.0, 2)
    with np.errstate(invalid="ignore"):
        gp = np.einsum("mhc,mhk->mck", onehot, prob.p)
        ge = np.einsum("mhc,mhk->mck", onehot, np.where(np.isfinite(prob.err), prob.err, 1e30))
        gd = np.einsum("mhc,mhk->mck", onehot, prob.dens)

    def diag(x):
        return np.diagonal(x, axis1=1, axis2=2)[..., None]

    join_g = np.where(prob.perhead[None, None, :], counts[:, :, None] * prob.o[None, None, :],
                      np.where(counts[:, None, :] == 0, prob.o[None, None, :], 0.0))
    gdt = gp - diag(gp) + join_g - prob.o[None, :, None]
    gde, gdd = ge - diag(ge), gd - diag(gd)
    blocked = np.einsum("mhc,mhk->mck", onehot, (~prob.allowed).astype(float)) > 0
    valid = (counts[:, :, None] >= 2) & ~prob.perhead[None, :, None] & ~blocked & \
        (np.arange(c)[None, :, None] != np.arange(c)[None, None, :])
    group = (gdt, gde, gdd, valid)
    return single, group


def local_search(prob: Problem, a: np.ndarray, f_name: str, g_name: str, budget: float,
                  max_iters: int | None = None) -> tuple[np.ndarray, bool]:
    """Greedy improvement of f under g <= budget with exact group costs: single-head moves, whole-group moves
    (head fusion), and pairs of single moves (one head gives up some f for g that another head spends better).
    Returns (assignment, budget_blocked): whether some move would still improve f but for the budget."""
    a = a.copy()
    heads = prob.shape[0] * prob.shape[1]
    names = {"time": 0, "error": 1, "density": 2}
    fi, gi = names[f_name], names[g_name]
    scale = {"time": 1.0, "error": 1.0 / heads, "density": 1.0 / heads}
    max_iters = max_iters or 20 * heads
    for _ in range(max_iters):
        totals = prob.totals(a)
        g_now, tol = totals[g_name], _TOL * max(1.0, abs(totals[f_name]))
        single, group = _deltas(prob, a)
        best = None
        for kind, moves in (("single", single), ("group", group)):
            df, dg = moves[fi] * scale[f_name], moves[gi] * scale[g_name]
            ok = moves[3] & (df < -tol) & (g_now + dg <= budget + 1e-12)
            if not ok.any():
                continue
            # Moves that also lower g first (largest gain), then the best gain per unit of g spent.
            free = ok & (dg <= 0)
            if free.any():
                idx = np.unravel_index(np.argmin(np.where(free, df, np.inf)), df.shape)
                score = (1, float(-df[idx]))
            else:
                ratio = np.where(ok, -df / np.maximum(dg, 1e-30), -np.inf)
                idx = np.unravel_index(np.argmax(ratio), df.shape)
                score = (0, float(ratio[idx]))
            if best is None or score > best[0]:
                best = (score, kind, idx)
        if best is not None:
            _, kind, idx = best
            if kind == "single":
                mi, hi, ci = idx
                a[mi, hi] = ci
            else:
                mi, c_from, c_to = idx
                a[mi][a[mi] == c_from] = c_to
            continue
        paired = _pair_move(prob, a, single, fi, gi, scale[f_name], scale[g_name], f_name, g_name, budget)
        if paired is None:
            break
        a = paired
    single, group = _deltas(prob, a)
    blocked = False
    tol = _TOL * max(1.0, abs(prob.totals(a)[f_name]))
    for moves in (single, group):
        blocked |= bool((moves[3] & (moves[fi] * scale[f_name] < -tol)).any())
    return a, blocked


def _pair_move(prob: Problem, a: np.ndarray, single, fi: int, gi: int, f_scale: float, g_scale: float,
               f_name: str, g_name: str, budget: float, k: int = 48) -> np.ndarray | None:
    """Best pair of single-head moves (on different heads) that improves f within the budget, checked exactly."""
    df, dg, allowed = single[fi] * f_scale, single[gi] * g_scale, single[3]
    totals = prob.totals(a)
    g_now, f_now = totals[g_name], totals[f_name]
    tol = _TOL * max(1.0, abs(f_now))
    flat_df, flat_dg, flat_ok = df.ravel(), dg.ravel(), allowed.ravel()
    gain = np.flatnonzero(flat_ok & (flat_df < -tol))
    pay = np.flatnonzero(flat_ok & (flat_dg < 0))
    if not len(gain) or not len(pay):
        return None
    gain = gain[np.argsort(flat_df[gain])[:k]]
    # Moves that free the most g for the least f, and those that free the most g at all.
    ratio = flat_df[pay] / -flat_dg[pay]
    pay = np.unique(np.concatenate([pay[np.argsort(ratio)[:k]], pay[np.argsort(flat_dg[pay])[:k]]]))

    def head_of(idx):
        return idx // prob.shape[2]

    total_df = flat_df[gain][:, None] + flat_df[pay][None, :]
    total_dg = flat_dg[gain][:, None] + flat_dg[pay][None, :]
    # Two moves in one layer may share a group launch, which their separate deltas count twice: allow that much
    # slack here and check every pair exactly below.
    slack = 2.0 * float(prob.o.max(initial=0.0))
    f_slack = slack if f_name == "time" else 0.0
    g_slack = slack if g_name == "time" else 0.0
    ok = (total_df < f_slack - tol) & (g_now + total_dg <= budget + g_slack + 1e-12) & \
        (head_of(gain)[:, None] != head_of(pay)[None, :])
    if not ok.any():
        return None
    order = np.argsort(np.where(ok, total_df, np.inf), axis=None)
    for flat in order[: 4 * k]:
        i, j = np.unravel_index(flat, ok.shape)
        if not ok[i, j]:
            break
        trial = a.copy()
        for move in (gain[i], pay[j]):
            mi, hi, ci = np.unravel_index(move, prob.shape)
            trial[mi, hi] = ci
        new = prob.totals(trial)
        if new[f_name] < f_now - tol and new[g_name] <= budget + 1e-12:
            return trial
    return None


def _best_of_starts(prob: Problem, f_name: str, g_name: str, limit: float, starts: int = 4):
    """Local search from the Lagrangian solution and from the best feasible uniform plans (one candidate on every
    allowed head); the best result. The relaxation alone can miss a plan as simple as a uniform one."""
    first, _ = _lagrange(prob, f_name, g_name, limit)
    seeds = [first]
    uniform = []
    for c in range(prob.shape[2]):
        a = np.where(prob.allowed[:, :, c], c, prob.dense_index)
        totals = prob.totals(a)
        if totals[g_name] <= limit + 1e-12:
            uniform.append((totals[f_name], a))
    seeds += [a for _, a in sorted(uniform, key=lambda t: t[0])[:starts]]
    best = None
    for seed in seeds:
        a, blocked = local_search(prob, seed, f_name, g_name, limit)
        if best is None or prob.totals(a)[f_name] < prob.totals(best[0])[f_name] - 1e-15:
            best = (a, blocked)
    return best


def min_time_under_error(prob: Problem, max_error: float) -> tuple[np.ndarray, str]:
    limit = max_error ** 2
    a, blocked = _best_of_starts(prob, "time", "error", limit)
    got = math.sqrt(max(prob.error(a), 0.0))
    if blocked:
        note = (f"the error budget is binding: relative L2 error {got:.4f} of {max_error:g} allowed; faster plans "
                f"exceed it")
    else:
        note = (f"the error budget is not binding: relative L2 error {got:.4f} of {max_error:g} allowed, and no "
                f"faster plan exists")
    return a, note


def min_error_under(prob: Problem, g_name: str, limit: float) -> tuple[np.ndarray, bool]:
    return _best_of_starts(prob, "error", g_name, limit)


def frontier(prob: Problem, points: int = 14) -> list[dict[str, float]]:
    """Speed/fidelity trade-off: fastest plans for a range of error budgets (for the report)."""
    out, seen = [], set()
    for rel in [0.0] + list(np.geomspace(0.005, 1.0, points - 1)):
        a, _ = _lagrange(prob, "time", "error", rel ** 2)
        key = a.tobytes()
        if key in seen:
            continue
        seen.add(key)
        out.append({"max_error": float(rel), "relative_l2_error": math.sqrt(max(prob.error(a), 0.0)),
                    "attention_speedup": prob.max_speedup(a), "density": prob.density(a)})
    return out
