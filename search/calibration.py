"""Calibration: run the model densely and measure, on the fly, what every candidate would do to every head.

An all-dense plan is applied through ``dit_sparse.apply`` and a :class:`CalibrationObserver` is added to the
processor's observers. On the sampled denoising steps (both CFG branches) it takes the post-RoPE q, k, v of each
covered attention call and, for sampled query rows (all rows of short sequences, a few query blocks of long ones),
computes per key block the softmax partial sums

    Z[r, kb] = sum_{j in kb} exp(s_rj - m_r),    U[r, kb] = sum_{j in kb} exp(s_rj - m_r) v_j

at full resolution and, when a pyramid candidate exists, over keys mean-pooled 2, 4 and 8 times (each pooled key
gets +ln(n), as the executors do). Any candidate's exact output on those rows is then
``sum_kb U[level(kb)] / sum_kb Z[level(kb)]`` over the blocks its layout visits, so every candidate costs a
(rows x key blocks x head_dim) reduction instead of a new attention. Text keys of joint models are always
included (the processor attends them densely); only video rows are scored.

Per (module, head, candidate) the observer accumulates the squared error against dense divided by the layer's
mean per-head dense output energy (so a head whose values are zero has error 0 under every candidate, skip
included), averaged over calls; and the measured density of dynamic candidates. Dynamic layouts are estimated the
way the processor does it: at refresh steps, then reused (stale) until the next refresh. Nothing proportional to
the number of calls is kept.

Re-scaled candidates (the ``rescale`` modifier) reuse, between dense refreshes, the in-layout share of mass and
the residual of the last refresh. Their error at a sampled step depends on how old those statistics are, which
depends on the plan's schedule (dense warm-up, refresh interval), and the solver may still change the warm-up. So
the observer keeps the statistics of the ``refresh_interval - 1`` steps before every sampled step (on the same
rows: long sequences are then scored on fixed query blocks per module) and scores each re-scaled candidate as the
mean over ages 0 ... refresh_interval - 1 (age 0 is the refresh itself, exact), which is what a plan refreshing
every ``refresh_interval`` steps sees on average; ages reaching back before the first sparse step are left out
(the plan refreshes there, so step ``first_sparse_step`` itself scores 0). At its own layout's density, a
re-scaled candidate costs a dense refresh on top; the solver adds that share.

``reuse`` candidates are scored the same way: the kept history also holds each step's dense output on the scored
rows, and reusing the output of a refresh ``age`` steps old costs the squared difference between it and this
step's dense output (0 at age 0). An extrapolating ``reuse`` continues the line through the refresh at ``r`` and
the output computed before it: the refresh at ``r - refresh_interval``, or, when that would fall in the dense
warm-up, the last dense step ``r - 1`` (so the history reaches ``2 refresh_interval - 1`` steps back). Nothing
runs between refreshes, so their cost is the refresh share alone.

The partial sums and what they give are in `partial_sums`, the sampled steps and the kept history in `history`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dit_sparse.attend import TextTokens
from dit_sparse.fp8 import fake_quantize_qkv
from dit_sparse.layout import Grid, num_blocks
from dit_sparse.strategies import BuildContext, get_strategy

from .candidates import Candidate, mass_columns, mass_spec, static_level_map
from .errors import CalibrationError
from .history import HistoryEntry, StepHistory
from .partial_sums import dense_output, layout_outputs, level_density, partial_sums, text_heads

# Elements of the score matrix plus partial sums processed at once (bounds the observer's extra memory).
DEFAULT_CHUNK_ELEMENTS = 1 << 26


@dataclass
class _Module:
    err: np.ndarray  # (H, C) sum over evaluated calls of the normalised squared error
    density: np.ndarray  # (H, C) sum over evaluated calls of measured density (dynamic) / fixed (static)
    evaluated: int = 0
    step_err: dict[int, np.ndarray] = field(default_factory=dict)  # step -> (H, C) sum over that step's calls
    step_evaluated: dict[int, int] = field(default_factory=dict)
    block_mass: np.ndarray | None = None  # (H, NK) attention mass per key block, for the per-head stripes
    token_mass: np.ndarray | None = None  # (H, S)
    columns: dict[int, list[list[int]]] | None = None  # candidate index -> per-head columns, once frozen
    column_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # candidate index -> (1, H, NQ, NK)


class CalibrationObserver:
    """``observer(site, q, k, v, text)`` for ``SparseProcessor.observers``; see the module docstring.

    modules: covered module names in forward order; candidates: what to evaluate; steps: denoising steps to
    evaluate; first_sparse_step and refresh_interval: where dynamic layouts are refreshed at run time.
    max_rows: sequences up to this many video tokens are scored on every row, longer ones on `query_blocks`
    randomly chosen query blocks per call.
    """

    def __init__(self, modules: list[str], num_heads: int, candidates: list[Candidate], block_q: int, block_k: int,
                 steps: list[int], first_sparse_step: int, refresh_interval: int = 5, *, max_rows: int = 4096,
                 query_blocks: int = 8, stale_layouts: bool = True, seed: int = 0,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, on_evaluate=None, reduce=None, share_first=None):
        self.modules = {name: i for i, name in enumerate(modules)}
        self.num_heads = num_heads
        self.candidates = candidates
        self.block_q, self.block_k = block_q, block_k
        self.steps = set(steps)
        self.first_sparse_step = first_sparse_step
        self.refresh_interval = refresh_interval
        self.max_rows, self.query_blocks = max_rows, query_blocks
        self.stale_layouts = stale_layouts
        self.seed = seed
        self.chunk_elements = chunk_elements
        self.on_evaluate = on_evaluate
        # Multi-process search (None: one process): `reduce` sums an array over the processes; `share_first`
        # gives every process the first one's array. Stripes are chosen from the first process's attention mass
        # (its first prompt, as in one process), so every process evaluates the same columns.
        self.reduce = reduce
        self.share_first = share_first
        self.grid: Grid | None = None
        self.calls = 0
        self.calls_per_module: dict[str, int] = {}
        self.batch: int | None = None
        self.evaluated_steps: set[int] = set()
        self.branches: set[str] = set()
        self.seconds = 0.0
        self.paused = False  # set while another tool re-runs the transformer (see sensitivity.py)
        self.last_step: int | None = None
        self._state: dict[int, _Module] = {}
        self._static: dict[int, torch.Tensor] = {}
        self._static_stack: dict[tuple, tuple] = {}
        self._stored: dict[tuple, tuple[int, torch.Tensor]] = {}
        self._levels = any(c.pooled for c in candidates)
        self._fp8 = any(c.fp8 for c in candidates)
        if any(c.rescale and (c.fp8 or c.per_head) for c in candidates):
            raise CalibrationError("re-scaled candidates must be shared and without fp8")
        # what earlier steps leave for the re-scaled and `reuse` candidates; see the module docstring
        self.history = StepHistory(candidates, num_heads, steps, first_sparse_step, refresh_interval)
        self._mass_steps = {s - 1 for s in steps if s - 1 >= 0} | set(steps)

    # -- what is accumulated -----------------------------------------------------------------------------------
    def results(self) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int, int], list[int]]]:
        """(error (M, H, C), density (M, H, C), per-head columns {(m, h, c): columns}), means over calls (over the
        calls of every process when `reduce` is set; every process must call this)."""
        err_sum, dens_sum, count = self._sums()
        with np.errstate(invalid="ignore", divide="ignore"):
            err = np.where(count[:, None, None] > 0, err_sum / count[:, None, None], np.nan)
            dens = np.where(count[:, None, None] > 0, dens_sum / count[:, None, None], np.nan)
        columns = {}
        for mi, st in self._state.items():
            for ci, per_head in (st.columns or {}).items():
                for hi, cols in enumerate(per_head):
                    columns[(mi, hi, ci)] = cols
        return err, dens, columns

    def step_results(self) -> tuple[list[int], np.ndarray]:
        """(sampled steps, error (S, M, H, C)): the error of `results` split by denoising step, so that the solver
        can weight the steps (their mean over steps is `results`' error: every sampled step has the same calls)."""
        steps = sorted(self.steps)
        m, h, c = len(self.modules), self.num_heads, len(self.candidates)
        err, count = np.zeros((len(steps), m, h, c)), np.zeros((len(steps), m))
        for mi, st in self._state.items():
            for si, step in enumerate(steps):
                if step in st.step_err:
                    err[si, mi], count[si, mi] = st.step_err[step], st.step_evaluated[step]
        if self.reduce is not None:
            err, count = self.reduce(err), self.reduce(count)
        with np.errstate(invalid="ignore", divide="ignore"):
            return steps, np.where(count[:, :, None, None] > 0, err / count[:, :, None, None], np.nan)

    def _sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m, h, c = len(self.modules), self.num_heads, len(self.candidates)
        err, dens, count = np.zeros((m, h, c)), np.zeros((m, h, c)), np.zeros(m)
        for mi, st in self._state.items():
            err[mi], dens[mi], count[mi] = st.err, st.density, st.evaluated
        if self.reduce is not None:
            err, dens, count = self.reduce(err), self.reduce(dens), self.reduce(count)
        return err, dens, count

    # -- the observer ------------------------------------------------------------------------------------------
    def __call__(self, site, q, k, v, text: TextTokens | None):
        if self.paused or site.module_name not in self.modules:
            return
        self.last_step = site.step
        start = time.perf_counter()
        try:
            self._observe(site, q, k, v, text)
        finally:
            self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def _observe(self, site, q, k, v, text):
        self.calls += 1
        self.calls_per_module[site.module_name] = self.calls_per_module.get(site.module_name, 0) + 1
        if site.step is None:
            raise CalibrationError("the processor could not tell the denoising step (no timestep reached the "
                                   "transformer); calibration needs it to sample steps")
        if self.grid is None:
            self.grid = site.grid
        elif site.grid != self.grid:
            raise CalibrationError(f"calibration saw two video shapes ({self.grid} and {site.grid}); "
                                   "calibrate at one resolution and frame count")
        mi = self.modules[site.module_name]
        step = site.step
        evaluate = step in self.steps
        anchor = self._is_anchor(step)
        needs_mass = self._needs_mass(mi, step)
        remember = step in self.history.steps
        self.history.forget(mi, site.branch, step)
        if not (evaluate or anchor or needs_mass or remember):
            return
        seq = q.shape[1]
        video, text_part = text.slices(seq) if text else (slice(0, seq), None)
        qv, kv, vv = q[:, video].float(), k[:, video].float(), v[:, video].float()
        txt = None
        if text:
            mask = None if text.mask is None else text.mask.bool().to(q.device)
            txt = (k[:, text_part].float(), v[:, text_part].float(), mask)
        state = self._module_state(mi, qv.shape[1])
        self.batch = qv.shape[0]
        dynamic = {}
        if evaluate or (anchor and self.stale_layouts):
            dynamic = self._dynamic_levels(mi, site.branch, step, qv, kv, store=anchor)
        if not evaluate:
            if needs_mass:
                self._accumulate_mass(state, qv, kv, txt)
            if remember:
                self._remember(mi, site.branch, step, qv, kv, vv, txt)
            return
        self.evaluated_steps.add(step)
        self.branches.add(site.branch)
        if needs_mass:
            self._accumulate_mass(state, qv, kv, txt)
        self._freeze_columns(state)
        err, energy = self._evaluate(state, qv, kv, vv, txt, dynamic, (mi, site.branch, step), remember)
        mean_energy = float(energy.mean())
        normalised = err / mean_energy if mean_energy > 0 else np.zeros_like(err)
        state.err += normalised
        state.step_err[step] = state.step_err.get(step, 0.0) + normalised
        state.step_evaluated[step] = state.step_evaluated.get(step, 0) + 1
        state.density += self._densities(state, dynamic, qv.shape[1])
        state.evaluated += 1
        if self.on_evaluate is not None:
            self.on_evaluate()

    # -- steps -------------------------------------------------------------------------------------------------
    def _anchor_of(self, step: int) -> int:
        r = self.refresh_interval
        return self.first_sparse_step + ((step - self.first_sparse_step) // r) * r

    def _is_anchor(self, step: int) -> bool:
        """A refresh step of dynamic layouts whose layout a later sampled step will reuse."""
        if not self.stale_layouts or step < self.first_sparse_step or self._anchor_of(step) != step:
            return False
        if not any(c.dynamic for c in self.candidates):
            return False
        return any(step < s < step + self.refresh_interval for s in self.steps)

    def _needs_mass(self, mi: int, step: int) -> bool:
        if not any(c.per_head for c in self.candidates):
            return False
        st = self._state.get(mi)
        return step in self._mass_steps and (st is None or st.columns is None)

    # -- state -------------------------------------------------------------------------------------------------
    def _module_state(self, mi: int, seq: int) -> _Module:
        if mi not in self._state:
            h, c = self.num_heads, len(self.candidates)
            nk = num_blocks(seq, self.block_k)
            self._state[mi] = _Module(np.zeros((h, c)), np.zeros((h, c)), block_mass=np.zeros((h, nk)),
                                      token_mass=np.zeros((h, seq)))
        return self._state[mi]

    def _static_levels(self, ci: int) -> torch.Tensor:
        if ci not in self._static:
            self._static[ci] = static_level_map(self.candidates[ci], self.grid, self.block_q, self.block_k)
        return self._static[ci]

    def _dynamic_levels(self, mi, branch, step, q, k, store: bool) -> dict[int, torch.Tensor]:
        """Level maps (B, H, NQ, NK) int8 of the dynamic candidates as the processor would use them at `step`."""
        out = {}
        anchor = self._anchor_of(step) if step >= self.first_sparse_step else step
        ctx = None
        for ci, cand in enumerate(self.candidates):
            if not cand.dynamic:
                continue
            key = (mi, branch, ci)
            stored = self._stored.get(key)
            if self.stale_layouts and anchor != step and stored is not None and stored[0] == anchor \
                    and stored[1].shape[0] == q.shape[0]:
                out[ci] = stored[1].to(q.device)
                continue
            if ctx is None:
                # The processor estimates dynamic layouts from unquantized q and k, fp8 or not.
                ctx = BuildContext(self.grid, self.block_q, self.block_k, q, k)
            levels = get_strategy(cand.family).layout(cand.spec.param_dict, ctx).level_map().to(torch.int8)
            out[ci] = levels
            if store:
                self._stored[key] = (step, levels.cpu())
        return out

    # -- per-head vertical stripes -----------------------------------------------------------------------------
    def _accumulate_mass(self, state: _Module, q, k, txt):
        rows = self._rows(q.shape[1], q.device, salt=7)
        scale = 1.0 / math.sqrt(q.shape[-1])
        seq = k.shape[1]
        nk = num_blocks(seq, self.block_k)
        for hs in self._head_chunks(q.shape[0], len(rows), seq, q.shape[-1]):
            s = torch.einsum("brhd,bnhd->bhrn", q[:, rows, hs], k[:, :, hs]) * scale
            lse = torch.logsumexp(s, -1, keepdim=True)
            if txt is not None:
                st = torch.einsum("brhd,bthd->bhrt", q[:, rows, hs], txt[0][:, :, hs]) * scale
                if txt[2] is not None:
                    st = st.masked_fill(~txt[2][:, None, None, :], float("-inf"))
                lse = torch.logaddexp(lse, torch.logsumexp(st, -1, keepdim=True))
            token = torch.exp(s - lse).sum((0, 2))  # (h, S)
            padded = torch.nn.functional.pad(token, (0, nk * self.block_k - seq)).view(token.shape[0], nk, -1)
            state.token_mass[hs] += token.double().cpu().numpy()
            state.block_mass[hs] += padded.sum(-1).double().cpu().numpy()

    def _freeze_columns(self, state: _Module):
        if state.columns is not None:
            return
        state.columns = {}
        if self.share_first is not None:
            state.block_mass, state.token_mass = self.share_first(state.block_mass), self.share_first(state.token_mass)
        for ci, cand in enumerate(self.candidates):
            if not cand.per_head:
                continue
            per_head = [mass_columns(torch.from_numpy(state.block_mass[h]), torch.from_numpy(state.token_mass[h]),
                                     cand.mass_blocks, self.block_k) for h in range(self.num_heads)]
            state.columns[ci] = per_head
            maps = [static_level_map(type(cand)(cand.key, cand.family, mass_spec(cols)), self.grid, self.block_q,
                                     self.block_k) for cols in per_head]
            state.column_maps[ci] = torch.cat(maps, dim=1)

    # -- rows and chunks ---------------------------------------------------------------------------------------
    def _query_blocks(self, seq: int, salt: int = 0, module: int | None = None) -> torch.Tensor:
        """Query blocks scored in this call: all of them for short sequences, else a random few (the same few
        for every call of a module when re-scaled candidates reuse statistics across steps)."""
        nq = num_blocks(seq, self.block_q)
        if seq <= self.max_rows:
            return torch.arange(nq)
        fixed = module is not None and self.history.refreshing
        rng = np.random.default_rng([self.seed, module if fixed else self.calls, salt, int(fixed)])
        return torch.from_numpy(np.sort(rng.choice(nq, size=min(self.query_blocks, nq), replace=False)))

    def _rows(self, seq: int, device, salt: int = 0) -> torch.Tensor:
        blocks = self._query_blocks(seq, salt)
        rows = (blocks[:, None] * self.block_q + torch.arange(self.block_q)).flatten()
        return rows[rows < seq].to(device)

    def _head_chunks(self, batch: int, rows: int, seq: int, head_dim: int) -> list[slice]:
        nk = num_blocks(seq, self.block_k)
        per_head = batch * rows * (3 * seq + 2 * nk * (head_dim + 1) + len(self.candidates) * (head_dim + 1))
        step = max(1, min(self.num_heads, self.chunk_elements // max(1, per_head)))
        return [slice(h, min(h + step, self.num_heads)) for h in range(0, self.num_heads, step)]

    # -- the evaluation ----------------------------------------------------------------------------------------
    def _scored_rows(self, seq: int, mi: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query blocks (J,), rows (J, bq) clamped into the sequence, valid (J, bq)) scored in this call."""
        blocks = self._query_blocks(seq, salt=1, module=mi)
        rows = blocks[:, None] * self.block_q + torch.arange(self.block_q)  # (J, bq)
        return blocks, rows.clamp(max=seq - 1).to(device), (rows < seq).to(device)

    def _evaluate(self, state: _Module, q, k, v, txt, dynamic: dict[int, torch.Tensor], where: tuple[int, str, int],
                  remember: bool = False):
        """Raw squared errors (H, C) summed over batch and sampled rows, and dense output energy per head (H,).
        where: (module index, branch, step); remember: also keep this step's re-scale statistics."""
        b, seq, h_all, d = q.shape
        blocks, rows, valid = self._scored_rows(seq, where[0], q.device)
        all_valid = bool(valid.all())
        err = np.zeros((h_all, len(self.candidates)))
        energy = np.zeros(h_all)
        variants = [(False, q, k, v)]
        if self._fp8:
            variants.append((True, *fake_quantize_qkv(q, k, v, self.block_q, self.block_k)))
        scored = [ci for ci, c in enumerate(self.candidates)
                  if c.computes and not c.rescale and not (c.dense and not c.fp8)]
        entry = self._new_entry(blocks, q, k) if remember else None
        history = self.history.before(where, blocks, b) if self.history.rescaled else []
        for hs in self._head_chunks(b, rows.numel(), seq, d):
            dense = None
            for fp8, qq, kk, vv in variants:
                sums = partial_sums(qq[:, rows][:, :, :, hs], kk[:, :, hs], vv[:, :, hs], text_heads(txt, hs),
                                    self.block_k, self._levels)
                if not fp8:
                    dense = dense_output(sums)  # (B, h, J, bq, D)
                    rows_energy = dense.square().sum(-1)  # (B, h, J, bq)
                    if not all_valid:
                        rows_energy = rows_energy * valid[None, None]
                    energy[hs] = rows_energy.sum((0, 2, 3)).double().cpu().numpy()
                    if entry is not None:
                        self.history.fill(entry, hs, sums)
                    rescaled, reused = self.history.rescaled, self.history.reused
                    if rescaled:
                        err[hs, rescaled] = self.history.rescaled_errors(history, hs, sums, dense, valid, all_valid)
                    if reused:
                        err[hs, reused] = self.history.reused_errors(where, blocks, b, hs, dense, valid, all_valid)
                group = [ci for ci in scored if self.candidates[ci].fp8 == fp8]
                if not group:
                    continue
                levels = self._stacked_levels(state, group, dynamic, blocks, b, q.device)[:, hs]  # (B, h, J, C', NK)
                out = layout_outputs(sums, levels)  # (B, h, J, C', bq, D)
                diff = (out - dense.unsqueeze(3)).square().sum(-1)  # (B, h, J, C', bq)
                if not all_valid:
                    diff = diff * valid[None, None, :, None, :]
                err[hs, group] = diff.sum((0, 2, 4)).double().cpu().numpy()
            for ci, cand in enumerate(self.candidates):
                if not cand.computes and not cand.reuses:
                    err[hs, ci] = energy[hs]
        if entry is not None:
            self.history.entries[where] = entry
        return err, energy

    def _remember(self, mi: int, branch: str, step: int, q, k, v, txt) -> None:
        """Keep this step's re-scale statistics for the sampled steps within a refresh interval after it."""
        b, seq, _, d = q.shape
        blocks, rows, _ = self._scored_rows(seq, mi, q.device)
        entry = self._new_entry(blocks, q, k)
        for hs in self._head_chunks(b, rows.numel(), seq, d):
            sums = partial_sums(q[:, rows][:, :, :, hs], k[:, :, hs], v[:, :, hs], text_heads(txt, hs),
                                self.block_k, self._levels)
            self.history.fill(entry, hs, sums)
        self.history.entries[(mi, branch, step)] = entry

    def _new_entry(self, blocks: torch.Tensor, q, k) -> HistoryEntry:
        """An empty statistics entry with the re-scaled candidates' levels (B, H, J, C', NK) at this step: a
        dynamic layout is estimated fresh at a refresh, and both are then reused until the next one."""
        ctx = None
        levels = []
        if not self.history.rescaled:
            return HistoryEntry(blocks)
        for ci in self.history.rescaled:
            cand = self.candidates[ci]
            if cand.dynamic:
                ctx = ctx or BuildContext(self.grid, self.block_q, self.block_k, q, k)
                lv = get_strategy(cand.family).layout(cand.spec.param_dict, ctx).level_map().to(torch.int8)
            else:
                lv = self._static_levels(ci)
            levels.append(lv.to(q.device)[:, :, blocks.to(q.device)].expand(q.shape[0], self.num_heads, -1, -1))
        return HistoryEntry(blocks, levels=torch.stack(levels, dim=3))

    def _stacked_levels(self, state: _Module, group: list[int], dynamic, blocks, batch: int, device) -> torch.Tensor:
        """(B, H, J, C', NK) levels of the candidates in `group` at the sampled query blocks."""
        key = tuple(group)
        if key not in self._static_stack:
            static = [ci for ci in group if not self.candidates[ci].dynamic and not self.candidates[ci].per_head]
            stack = torch.stack([self._static_levels(ci)[0, 0] for ci in static], dim=1) if static else None
            self._static_stack[key] = (static, stack)
        static, stack = self._static_stack[key]
        blocks = blocks.to(device)
        parts = {}
        if stack is not None:
            picked = stack.to(device)[blocks].expand(batch, self.num_heads, -1, -1, -1)
            parts.update({ci: picked[:, :, :, i] for i, ci in enumerate(static)})
        for ci in group:
            if ci not in parts:
                lv = self._levels_for(state, ci, self.candidates[ci], dynamic).to(device)
                parts[ci] = lv[:, :, blocks].expand(batch, self.num_heads, -1, -1)
        return torch.stack([parts[ci] for ci in group], dim=3)

    def _levels_for(self, state: _Module, ci: int, cand: Candidate, dynamic) -> torch.Tensor:
        if cand.dynamic:
            return dynamic[ci]
        if cand.per_head:
            return state.column_maps[ci]
        return self._static_levels(ci)

    def _densities(self, state: _Module, dynamic: dict[int, torch.Tensor], seq: int) -> np.ndarray:
        h, c = self.num_heads, len(self.candidates)
        out = np.zeros((h, c))
        for ci, cand in enumerate(self.candidates):
            if not cand.computes:
                continue
            if cand.dense:
                out[:, ci] = 1.0
                continue
            levels = self._levels_for(state, ci, cand, dynamic)
            out[:, ci] = level_density(levels, seq, self.block_q, self.block_k).mean(0).numpy()
        return out
