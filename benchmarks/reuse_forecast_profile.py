"""How fast each self-attention output of tiny-shapes changes over the denoising steps, and how well a one-step
forecast from the steps before predicts it: what a reuse schedule has to respect.

    python benchmarks/reuse_forecast_profile.py --num-prompts 3 \
        --out benchmarks/results/search-tiny-shapes/reuse-schedule/forecast_profile.json

Dense generation; every attn1 output recorded per (layer, CFG branch, step). Per step s it reports, averaged over
prompts, the relative L2 change ||y_s - y_{s-1}|| / ||y_s|| and the relative error of the linear forecast
2 y_{s-1} - y_{s-2}; and per layer the relative difference between the branches' outputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import dit_sparse  # noqa: F401  (guards the `kernels` name before diffusers imports)
from dit_sparse.provenance import hardware, versions
from dit_sparse.zoo.pipeline import load_tiny_shapes, weights_id
from dit_sparse.zoo.shapes_data import heldout_prompts


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def record(pipe, prompt: str, seed: int) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, branch) -> (steps, ...) attn1 outputs; branch 0 is the conditional call, which comes first."""
    outputs: dict[tuple[int, int], list[torch.Tensor]] = {}
    calls = [0]
    handles = [pipe.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))]
    for layer, block in enumerate(pipe.transformer.blocks):
        def keep(module, args, out, layer=layer):
            outputs.setdefault((layer, (calls[0] - 1) % 2), []).append(out.detach().clone())
        handles.append(block.attn1.register_forward_hook(keep))
    try:
        pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np")
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.stack(values) for key, values in outputs.items()}


def profile(num_prompts: int) -> dict:
    pipe = load_tiny_shapes()
    pipe.set_progress_bar_config(disable=True)
    runs = [record(pipe, prompt, seed) for seed, prompt in enumerate(heldout_prompts()[:num_prompts])]
    series = {}
    for layer, branch in sorted(runs[0]):
        ys = [run[(layer, branch)] for run in runs]
        steps = ys[0].shape[0]
        change = np.mean([[_relative(y[s - 1], y[s]) for s in range(1, steps)] for y in ys], 0)
        linear = np.mean([[_relative(2 * y[s - 1] - y[s - 2], y[s]) for s in range(2, steps)] for y in ys], 0)
        series[f"layer {layer}, {'cond' if branch == 0 else 'uncond'}"] = {
            "change_from_step_1": change.round(4).tolist(),
            "linear_forecast_error_from_step_2": linear.round(4).tolist()}
    layers = sorted({layer for layer, _ in runs[0]})
    branch_difference = {f"layer {layer}": np.mean([[_relative(run[(layer, 1)][s], run[(layer, 0)][s])
                                                     for s in range(run[(layer, 0)].shape[0])] for run in runs],
                                                   0).round(4).tolist() for layer in layers}
    return {"benchmark": "reuse forecast profile", "model": "tiny-shapes", "weights_id": weights_id(),
            "prompts": num_prompts, "series": series, "uncond_vs_cond_relative_difference": branch_difference,
            "hardware": hardware("cpu"), "versions": versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = profile(args.num_prompts)
    np.set_printoptions(precision=3, suppress=True, linewidth=200)
    for name, values in result["series"].items():
        print(f"{name:>18}  change      {np.array(values['change_from_step_1'])}")
        print(f"{'':>18}  lin. error  {np.array(values['linear_forecast_error_from_step_2'])}")
    for name, values in result["uncond_vs_cond_relative_difference"].items():
        print(f"{name:>18}  uncond vs cond {np.array(values)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
