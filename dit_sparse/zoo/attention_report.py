"""Attention structure of tiny-shapes: how local are the self-attention heads?

    python -m dit_sparse.zoo.attention_report [--model DIR] [--prompts 4] [--png docs/attention_maps.png]

For every self-attention (``blocks.i.attn1``) call during generation (both CFG branches, every step) it
computes the softmax attention probabilities exactly (same q/k math as ``WanAttnProcessor``: RMS norm across
heads, RoPE) and measures, per head, the attention mass that falls inside

- the local 3D window: ``|dt| <= 1`` frame and ``|dh| <= 3``, ``|dw| <= 3`` tokens (a 3 x 7 x 7 box around
  the query in the (frames, rows, cols) token grid; 1 token = 2x2 pixels),
- the same frame (``dt == 0``),
- the same spatial position +/-1 token in any frame (a temporal "column"),

averaged over the queries. A head is counted as local when its mean local-window mass is >= 0.8. The output
of attention is computed by the model's own processor, so generation is unchanged.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..adapters.wan import apply_wan_rotary
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, WEIGHTS_DIR, load_tiny_shapes, weights_id
from .shapes_data import heldout_prompts

WINDOW = (1, 3, 3)  # +/- frames, rows, cols (tokens)
LOCAL_THRESHOLD = 0.8
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "attention.json"


def region_masks(grid, window=WINDOW):
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    tt, hh, ww = tt.flatten(), hh.flatten(), ww.flatten()  # frame-major token order, as Wan flattens
    dt = (tt[:, None] - tt[None]).abs()
    dh = (hh[:, None] - hh[None]).abs()
    dw = (ww[:, None] - ww[None]).abs()
    return {
        "local": ((dt <= window[0]) & (dh <= window[1]) & (dw <= window[2])).float(),
        "same_frame": (dt == 0).float(),
        "temporal_column": ((dh <= 1) & (dw <= 1)).float(),
    }


class AttentionProbe:
    """Attention processor wrapper: measures attention probabilities of self-attention, then defers."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, inner, layer: int, recorder: "Recorder"):
        self.inner, self.layer, self.rec = inner, layer, recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None and self.rec.grid is not None:
            with torch.no_grad():
                x = hidden_states[:1].float()
                q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
                k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
                if rotary_emb is not None:
                    cos, sin = (r.float() for r in rotary_emb)
                    q, k = apply_wan_rotary(q, cos, sin), apply_wan_rotary(k, cos, sin)
                q, k = q.transpose(1, 2)[0], k.transpose(1, 2)[0]  # (heads, N, d)
                p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
                self.rec.record(self.layer, p)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


class Recorder:
    def __init__(self, keep_maps_at_call: int | None = None):
        self.grid = None
        self.masks = None
        self.stats = defaultdict(list)  # (layer) -> list of (heads, 3) arrays
        self.calls = 0
        self.keep_at = keep_maps_at_call
        self.maps = {}

    def pre_hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        _, pt, ph, pw = (1,) + tuple(module.config.patch_size)
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        if grid != self.grid:
            self.grid, self.masks = grid, region_masks(grid)
        self.calls += 1

    def record(self, layer, p):
        vals = [(p * m).sum(-1).mean(-1) for m in self.masks.values()]  # each (heads,)
        self.stats[layer].append(torch.stack(vals, -1).numpy())
        if self.keep_at is not None and self.calls == self.keep_at:
            self.maps[layer] = p.numpy()


def attach(pipe, recorder):
    tr = pipe.transformer
    procs = {}
    for name, proc in tr.attn_processors.items():
        layer = int(name.split(".")[1])
        procs[name] = AttentionProbe(proc, layer, recorder) if ".attn1." in name else proc
    tr.set_attn_processor(procs)
    return tr.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True)


def report(pipe, prompts, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, seed=0, png=None, **pipe_kwargs):
    keep = steps  # the conditional call of the middle step (calls alternate cond, uncond)
    rec = Recorder(keep_maps_at_call=keep + (keep % 2 == 0))
    original = dict(pipe.transformer.attn_processors)
    handle = attach(pipe, rec)
    try:
        for i, p in enumerate(prompts):
            if i > 0:
                rec.keep_at = None
            pipe(p, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(seed + i), **pipe_kwargs)
    finally:
        handle.remove()
        pipe.transformer.set_attn_processor(original)
    names = list(rec.masks)
    layers = {}
    for layer in sorted(rec.stats):
        arr = np.stack(rec.stats[layer])  # (calls, heads, 3)
        mean = arr.mean(0)
        local_inst = (arr[..., 0] >= LOCAL_THRESHOLD).mean()
        layers[layer] = {
            "share_local_heads": float((mean[:, 0] >= LOCAL_THRESHOLD).mean()),
            "share_local_head_calls": float(local_inst),
            "heads": [{n: round(float(mean[h, j]), 4) for j, n in enumerate(names)} for h in range(mean.shape[0])],
        }
    n_heads = sum(len(v["heads"]) for v in layers.values())
    n_local = sum(v["share_local_heads"] * len(v["heads"]) for v in layers.values())
    out = {"window": {"frames": WINDOW[0], "rows": WINDOW[1], "cols": WINDOW[2], "unit": "tokens (2x2 pixels)"},
           "threshold": LOCAL_THRESHOLD, "grid": list(rec.grid), "prompts": list(prompts), "steps": steps,
           "guidance_scale": guidance, "calls_per_layer": len(next(iter(rec.stats.values()))),
           "share_local_heads_overall": n_local / max(n_heads, 1),
           "window_fraction_of_keys": float(rec.masks["local"].mean()),
           "layers": {str(k): v for k, v in layers.items()}}
    if png and rec.maps:
        save_png(rec.maps, rec.grid, png, layers)
    return out


def save_png(maps, grid, path, layers):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    t, h, w = grid
    n = t * h * w
    L = len(maps)
    H = maps[0].shape[0]
    fig = plt.figure(figsize=(2.2 * max(H, 4) + 2.2 * 4, 2.3 * L), constrained_layout=True)
    sub = fig.subfigures(1, 2, width_ratios=[H, 4.2])
    ax = sub[0].subplots(L, H, squeeze=False)
    pool = max(1, n // 256)
    for layer_i in range(L):
        for hd in range(H):
            m = maps[layer_i][hd]
            m = m.reshape(n // pool, pool, n // pool, pool).sum(axis=(1, 3))
            ax[layer_i, hd].imshow(m + 1e-6, norm=LogNorm(vmin=1e-4, vmax=max(1e-3, m.max())), cmap="magma")
            lm = layers[layer_i]["heads"][hd]["local"]
            ax[layer_i, hd].set_title(f"L{layer_i} H{hd} local={lm:.2f}", fontsize=8)
            ax[layer_i, hd].set_xticks([])
            ax[layer_i, hd].set_yticks([])
    sub[0].suptitle(f"attention matrices (rows: queries, cols: keys, {n} tokens, frame-major; "
                    f"{pool}x{pool} pooled, log)", fontsize=9)
    # right: one query in the middle of the clip, its attention over the frames, for the most local head per layer
    ax2 = sub[1].subplots(L, t, squeeze=False)
    qi = (t // 2) * h * w + (h // 2) * w + w // 2
    for layer_i in range(L):
        hd = int(np.argmax([x["local"] for x in layers[layer_i]["heads"]]))
        row = maps[layer_i][hd][qi].reshape(t, h, w)
        for f in range(t):
            ax2[layer_i, f].imshow(row[f], vmin=0, vmax=row.max(), cmap="viridis")
            ax2[layer_i, f].set_xticks([])
            ax2[layer_i, f].set_yticks([])
            if layer_i == 0:
                ax2[layer_i, f].set_title(f"frame {f}", fontsize=7)
        ax2[layer_i, 0].set_ylabel(f"L{layer_i} H{hd}", fontsize=8)
    sub[1].suptitle(f"one query (frame {t // 2}, centre): its attention per frame", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(WEIGHTS_DIR))
    ap.add_argument("--prompts", type=int, default=4, help="number of held-out prompts to run")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--png", default="docs/attention_maps.png")
    ap.add_argument("--out", default=str(DEFAULT_JSON))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = load_tiny_shapes(path=a.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = heldout_prompts()[:: max(1, 50 // a.prompts)][: a.prompts]
    res = {"weights_id": weights_id(a.model), **report(pipe, prompts, a.steps, a.guidance, png=a.png)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    for k, v in res["layers"].items():
        print(f"layer {k}: share of local heads {v['share_local_heads']:.2f} "
              f"(head-calls {v['share_local_head_calls']:.2f}); local mass per head "
              f"{[h['local'] for h in v['heads']]}")
    print(f"overall share of local heads: {res['share_local_heads_overall']:.2f}; window covers "
          f"{res['window_fraction_of_keys']:.3f} of the keys on average; wrote {a.out} and {a.png}")
    return res


if __name__ == "__main__":
    main()
