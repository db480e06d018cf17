"""Exact sharing between the CFG branches of one step: a module whose input is the same in both branches returns
the first branch's output to the second.

The self-attention of a video-only first block (Wan's; LTX-Video and PixArt batch their branches into one call)
sees the latents, the positions and the timestep, but no text: both branches give it the same input, so the second
call would compute the same output again.
Which modules do is found at run time, never assumed, and sharing needs bit-equal inputs: at each step the first
branch's call keeps a cheap fingerprint of its input; a second branch whose fingerprint differs marks the module as
one whose branches differ (it is never looked at again), and one whose fingerprint matches makes the module a
candidate. From the next step on, a candidate keeps its whole input and output, and the second branch takes that
output only when its input is equal element for element (`torch.equal`). So only modules that do share hold a copy.
"""

from __future__ import annotations

import torch

from .site import AttentionSite
from .state import BranchCall


def _fingerprint(x: torch.Tensor) -> tuple:
    flat = x.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 64)]
    return tuple(x.shape), x.dtype, float(flat.double().sum()), float(sample.double().sum())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b) \
            and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


def shared_output(site: AttentionSite, hidden_states: torch.Tensor, extra) -> torch.Tensor | None:
    """The other branch's output of this step for an equal input (and equal `extra`: RoPE), else None."""
    share = site.state.branch_share(site.module_name)
    first = share.first
    if site.step is None or share.differs or first is None or first.step != site.step or first.branch == site.branch:
        return None
    if first.input is not None and _same(first.input, hidden_states) and _same(first.extra, extra):
        b, n = hidden_states.shape[0], site.grid.num_tokens
        site.stats.called()
        site.stats.add(b * len(site.heads) * n * n, 0)
        return first.output.clone()  # the model may write into what a module returns
    if first.fingerprint != _fingerprint(hidden_states):
        share.differs, share.alike, share.first = True, False, None
    else:
        share.alike = True
    return None


def keep_for_other_branch(site: AttentionSite, hidden_states: torch.Tensor, extra, out) -> None:
    """After the first call of a step: keep what the other branch needs to recognise an equal input."""
    share = site.state.branch_share(site.module_name)
    if site.step is None or share.differs or not isinstance(out, torch.Tensor):
        return
    first = share.first
    if first is not None and first.step == site.step and first.branch != site.branch:
        return  # the second call of this step: nothing after it to share with
    whole = share.alike
    share.first = BranchCall(site.step, site.branch, _fingerprint(hidden_states),
                             hidden_states.detach().clone() if whole else None, extra if whole else None,
                             out.detach().clone() if whole else None)
