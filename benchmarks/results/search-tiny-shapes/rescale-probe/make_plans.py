"""Uniform diagonal plans with and without the re-scaled softmax (README.md here): python make_plans.py OUT_DIR."""
import sys

from dit_sparse.plan import Schedule, SparsePlan
from dit_sparse.zoo import load_tiny_shapes

if len(sys.argv) != 2:
    raise SystemExit("usage: python make_plans.py OUT_DIR")
out = sys.argv[1]
t = load_tiny_shapes().transformer
variants = {
    "diag34": ({"window": [1, 0.25, 0.25]}, False, 5, 0.2),
    "diag34-rs5": ({"window": [1, 0.25, 0.25]}, True, 5, 0.2),
    "diag34-rs20": ({"window": [1, 0.25, 0.25]}, True, 20, 0.2),
    "diag12-rs5": ({"window": [0, 0.25, 0.25]}, True, 5, 0.2),
    "diag12-rs3": ({"window": [0, 0.25, 0.25]}, True, 3, 0.2),
    "diag12-rs5-f10": ({"window": [0, 0.25, 0.25]}, True, 5, 0.1),
    "diag12-rs5-f30": ({"window": [0, 0.25, 0.25]}, True, 5, 0.3),
}
for name, (params, rescale, refresh, first) in variants.items():
    p = SparsePlan.uniform(t, "diagonal", schedule=Schedule(dense_first=first, refresh_interval=refresh),
                           rescale=rescale, **params)
    p.save(f"{out}/{name}.plan.json")
    print(name, p.schedule)
