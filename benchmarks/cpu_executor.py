"""The `cpu` executor against dense SDPA measured in the same run: speedup and linearity (speedup x density).

    python benchmarks/cpu_executor.py [--seq 16384] [--heads 4] [--dim 64] [--repeats 5]
    python benchmarks/cpu_executor.py --seq 32760 --heads 12 --dim 128 --densities 0.05 0.1 0.25 --repeats 3

The second is Wan 2.1-1.3B's size at 480p; its target (issue 41) is linearity >= 0.75 at every density. At the
highest density the executor also runs with other longest key lists per kernel call (`--piece-sizes`), which is
how its `MAX_KEYS_PER_CALL` was chosen.

Layouts are block bands (each query block visits a contiguous run of key blocks around its own, the shape a
local window takes) and random block sets (the shape a dynamic strategy takes), built at the executor's own
block sizes. Writes benchmarks/results/cpu_executor-<date>.json and prints a table; the load average before and
after is recorded, since other processes on the machine distort the timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dit_sparse.executors import cpu as cpu_executor
from dit_sparse.executors import get_executor
from dit_sparse.layout import BlockLayout, num_blocks, own_block_mask


def band_layout(seq, bq, bk, density):
    nq, nk = num_blocks(seq, bq), num_blocks(seq, bk)
    width = max(1, round(nk * density))
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        centre = (i * bq + bq // 2) // bk
        lo = max(0, min(centre - width // 2, nk - width))
        mask[i, lo:lo + width] = True
    return BlockLayout.from_block_mask(mask.view(1, 1, nq, nk), seq, bq, bk)


def random_layout(seq, bq, bk, density, heads, seed=0):
    nq, nk = num_blocks(seq, bq), num_blocks(seq, bk)
    width = max(1, round(nk * density))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, heads, nq, nk, generator=g) + own_block_mask(seq, bq, bk).float() * 2
    chosen = scores.topk(width, dim=-1).indices
    mask = torch.zeros(1, heads, nq, nk, dtype=torch.bool).scatter_(-1, chosen, True)
    return BlockLayout.from_block_mask(mask, seq, bq, bk)


def best_times(fns: dict, repeats: int) -> dict:
    """Each function's best time over `repeats` rounds, after a warm-up. The rounds interleave the functions, so
    a slow spell of the machine falls on the baseline and the sparse runs alike rather than on one of them."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def piece_sizes(run, layouts: dict, sizes: list[int], repeats: int) -> list[dict]:
    """The executor's time on each layout with each longest key list per kernel call (0: lists never cut), all in
    interleaved rounds: the measurement behind `MAX_KEYS_PER_CALL`."""
    fns = {(key, size): (lambda key=key, size=size: _with_max_keys(size, run, layouts[key]))
           for key in layouts for size in sizes}
    times = best_times(fns, repeats)
    return [{"layout": key[0], "density": layouts[key].density(), "max_keys_per_call": size, "seconds": seconds}
            for (key, size), seconds in times.items()]


def _with_max_keys(size, run, layout):
    saved = cpu_executor.MAX_KEYS_PER_CALL
    cpu_executor.MAX_KEYS_PER_CALL = size or 1 << 62
    try:
        run(layout)
    finally:
        cpu_executor.MAX_KEYS_PER_CALL = saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--densities", type=float, nargs="+", default=[0.0625, 0.125, 0.25, 0.5])
    p.add_argument("--piece-sizes", type=int, nargs="+", default=[1024, 2048, 0],
                   help="longest key lists per kernel call to compare at the highest density (0: never cut)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    load_before = [round(x, 2) for x in os.getloadavg()]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.seq, args.heads, args.dim) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    executor = get_executor("cpu")
    bq, bk = executor.block_sizes(torch.device("cpu"), args.dim)
    layouts = {(kind, density): layout for density in args.densities
               for kind, layout in (("band", band_layout(args.seq, bq, bk, density)),
                                    ("random", random_layout(args.seq, bq, bk, density, args.heads)))}
    fns = {"dense": lambda: F.scaled_dot_product_attention(qt, kt, vt)}
    fns.update({key: (lambda layout=layout: executor.run(q, k, v, layout)) for key, layout in layouts.items()})
    times = best_times(fns, args.repeats)
    dense_s = times["dense"]
    rows = []
    for key, layout in layouts.items():
        speedup = dense_s / times[key]
        rows.append({"layout": key[0], "density": layout.density(), "seconds": times[key], "speedup": speedup,
                     "linearity": speedup * layout.density()})
    densest = {key: layout for key, layout in layouts.items() if key[1] == max(args.densities)}
    pieces = piece_sizes(lambda layout: executor.run(q, k, v, layout), densest, args.piece_sizes, args.repeats)
    result = {
        "benchmark": "cpu executor vs dense SDPA (fp32, one sequence)",
        "command": " ".join(["python benchmarks/cpu_executor.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "processor": platform.processor()},
        "versions": {"torch": torch.__version__},
        "shape": {"seq": args.seq, "heads": args.heads, "head_dim": args.dim, "block_q": bq, "block_k": bk},
        "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "dense_sdpa_seconds": dense_s,
        "rows": rows,
        "max_keys_per_call": cpu_executor.MAX_KEYS_PER_CALL,
        "piece_sizes": pieces,
    }
    print(f"dense SDPA: {dense_s * 1e3:.1f} ms  (S={args.seq}, H={args.heads}, D={args.dim}, fp32, "
          f"{torch.get_num_threads()} threads, blocks {bq}x{bk})")
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
        *result["load_average"]["before"], *result["load_average"]["after"]))
    print(f"{'layout':>7} {'density':>8} {'ms':>9} {'speedup':>8} {'linearity':>9}")
    for r in rows:
        print(f"{r['layout']:>7} {r['density']:>8.2%} {r['seconds'] * 1e3:>9.1f} {r['speedup']:>7.2f}x "
              f"{r['linearity']:>9.2f}")
    print(f"longest key list per kernel call (0: never cut; the executor uses {cpu_executor.MAX_KEYS_PER_CALL}):")
    for r in pieces:
        print(f"{r['layout']:>7} {r['density']:>8.2%} {r['max_keys_per_call']:>6} keys {r['seconds'] * 1e3:>9.1f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu_executor-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
