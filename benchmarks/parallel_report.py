"""Per-rank work and ring traffic of plans at real sizes, from the layouts alone (no GPU, no weights).

    python benchmarks/parallel_report.py

Wan 2.1-14B's attention (40 heads of 128, 40 layers) at 480p (21 x 30 x 52 latent tokens) and 720p (21 x 45 x 80),
128 x 128 blocks, for a uniform diagonal plan and a mixed one whose dense and strided heads sit together (the case
Ulysses balancing is for). Writes benchmarks/results/parallel-report-<date>.json and prints a table.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root, appended, makes `benchmarks` importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_speed import ARCHITECTURES
from dit_sparse.layout import Grid
from dit_sparse.parallel.report import parallel_report
from dit_sparse.plan import HeadStrategy, SparsePlan

WAN_14B = dict(ARCHITECTURES["wan2.1-1.3b"].config, num_attention_heads=40, ffn_dim=13824, num_layers=40)
GRIDS = {"480p": Grid(21, 30, 52), "720p": Grid(21, 45, 80)}
DIAGONAL = HeadStrategy.make("diagonal", window=[1, 0.125, 0.125])
STRIPE = HeadStrategy.make("vertical_stripe", first_frames=1, sinks=128)


def plans(model):
    uniform = SparsePlan.uniform(model, "diagonal", window=[1, 0.125, 0.125])
    mixed_heads = [HeadStrategy("dense")] * 4 + [STRIPE] * 8 + [DIAGONAL] * 28  # 40 heads
    mixed = uniform
    for name in uniform.modules:
        mixed = mixed.with_module(name, mixed_heads)
    return {"diagonal (one frame either side)": uniform, "mixed (4 dense, 8 stripe, 28 diagonal heads)": mixed}


def main():
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_14B)
    rows = []
    for plan_name, plan in plans(model).items():
        for grid_name, grid in GRIDS.items():
            for degree in (2, 4, 8):
                report = parallel_report(plan, grid, 128, 128, ulysses=degree, ring=degree)
                rows.append({"plan": plan_name, "size": grid_name, "degree": degree, **report})
                print(f"{plan_name:>46} {grid_name} x{degree}: Ulysses busiest/mean "
                      f"{report['ulysses_imbalance']['model_order']:.2f} -> "
                      f"{report['ulysses_imbalance']['balanced']:.2f} balanced; ring shards sent "
                      f"{report['ring_shards']['sent']}/{report['ring_shards']['dense']} "
                      f"({report['ring_shards']['saved']:.0%} saved)")
    out = Path("benchmarks/results") / f"parallel-report-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "model": "Wan 2.1-14B attention",
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
