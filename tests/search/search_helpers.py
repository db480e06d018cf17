"""Shared helpers of the search tests."""

import numpy as np

from dit_sparse.layout import Grid
from dit_sparse.plan import ModelFingerprint
from dit_sparse.search.candidates import default_candidates
from dit_sparse.search.stats import CalibrationStats
from dit_sparse.zoo.model import TinyShapesConfig

# A tiny random tiny-shapes pipeline for end-to-end search runs (2 layers x 2 heads, built from config).
TINY_TEST_MODEL = TinyShapesConfig(num_layers=2, num_attention_heads=2, attention_head_dim=12, ffn_dim=32,
                                   freq_dim=16, text_dim=16, text_layers=1, text_heads=2, text_ff=32)

# The fingerprint of the embedded tiny-shapes model (TinyShapesTransformer, 4 layers x 4 heads x 32).
TINY_SHAPES = ModelFingerprint("TinyShapesTransformer", 4, 4, 32)


def synthetic_stats(fingerprint: ModelFingerprint = TINY_SHAPES, seed: int = 0) -> CalibrationStats:
    """Statistics with plausible numbers: sparser candidates err more, dense is exact, skip loses everything."""
    grid = Grid(8, 16, 16)
    cands = default_candidates(grid, 256, 128)
    rng = np.random.default_rng(seed)
    m, h, c = fingerprint.num_layers, fingerprint.num_heads, len(cands)
    density = np.zeros((m, h, c))
    error = np.zeros((m, h, c))
    for ci, cand in enumerate(cands):
        if cand.family == "dense":
            density[..., ci], error[..., ci] = 1.0, 0.0
        elif cand.family == "skip":
            density[..., ci], error[..., ci] = 0.0, rng.uniform(0.5, 1.5, (m, h))
        elif cand.reuses:
            density[..., ci], error[..., ci] = 0.0, rng.uniform(0.01, 0.3, (m, h))
        else:
            d = rng.uniform(0.1, 0.6)
            density[..., ci] = d + rng.uniform(-0.05, 0.05, (m, h)) * cand.dynamic
            error[..., ci] = (1 - d) ** 2 * rng.uniform(0.001, 0.2, (m, h))
    columns = {(mi, hi, ci): [1000 + 128 * j for j in range(cand.mass_blocks)] for mi in range(m) for hi in range(h)
               for ci, cand in enumerate(cands) if cand.per_head}
    info = {"model": "tiny-shapes", "num_steps": 20, "dense_first": 0.2, "refresh_interval": 5, "calls_per_step": 2,
            "batch": 1, "prompts": ["a red circle moving right on a dark background"],
            "sample_steps": [4, 8, 12, 15, 19],
            "branches": ["cond", "uncond"], "executor": "cpu", "device": "cpu", "rows": "all"}
    return CalibrationStats(fingerprint, [f"blocks.{i}.attn1" for i in range(m)], list(range(m)), grid, 256, 128,
                            cands, error, density, columns, info)


