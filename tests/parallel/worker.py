"""One rank of a context-parallel check, run by torchrun (tests/parallel/test_context_parallel.py starts it).

    torchrun --standalone --nproc-per-node N tests/parallel/worker.py --family wan --ulysses U --ring R --out F

Every rank builds the same tiny model, runs each plan on its own (no parallelism) for the reference, then runs the
same plan under `enable_parallelism(ContextParallelConfig(...))` and compares the outputs (diffusers gathers the
full output on every rank). Rank 0 writes {case: max abs diff} to --out. Parallelism is enabled the way the CLI
does it (dit_sparse.parallel.launch.enable), with the cp_plan dit-sparse picks.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import functools
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dit_sparse  # noqa: E402
from dit_sparse import SparsePlan, SparseProcessor  # noqa: E402
from dit_sparse.parallel.launch import enable  # noqa: E402
from dit_sparse.plan import HeadStrategy, Schedule  # noqa: E402
from dit_sparse.processor import bound_processor  # noqa: E402

BLOCKS = (16, 16)
DIAGONAL = HeadStrategy.make("multi_diagonal", window=[0.25, 0.25])
STRIPE = HeadStrategy.make("vertical_stripe", first_frames=0, sinks=16)
DENSE = HeadStrategy("dense")
PLANS = {
    "dense": dict(heads=(DENSE,) * 4),
    "static": dict(heads=(DIAGONAL,) * 4),
    "frame_local": dict(heads=(HeadStrategy.make("diagonal", window=[1, 0.5, 0.5]),) * 4),
    "mixed": dict(heads=(DIAGONAL, DENSE, STRIPE, HeadStrategy("skip"))),
    "dynamic": dict(heads=(HeadStrategy.make("block_adaptive", tau=0.8), HeadStrategy.make("pyramid"), DIAGONAL,
                           HeadStrategy.make("block_adaptive", tau=0.8)), refresh_interval=2),
    "fp8": dict(heads=(HeadStrategy.make("multi_diagonal", window=[0.25, 0.25], fp8=True), DIAGONAL) * 2),
    "warmup_and_reuse": dict(heads=(HeadStrategy.make("reuse"), DIAGONAL, HeadStrategy.make("reuse"), STRIPE),
                             dense_above=0.8, refresh_interval=2),
    "whole_module_reuse": dict(heads=(HeadStrategy.make("reuse"),) * 4, dense_above=0.8, refresh_interval=3),
    "rescaled": dict(heads=(HeadStrategy.make("multi_diagonal", window=[0.25, 0.25], rescale=True), DIAGONAL,
                            DENSE, STRIPE), refresh_interval=2),
}
ORDERS = ("apply, then enable", "enable, then apply", "enable, then the one-line form")


def tiny_wan(seed=0, heads=4):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2,
                                 rope_max_seq_len=64).eval()


def wan_call(g, batch, noise, frames=8):
    """280 video tokens (8 x 5 x 7): 140, 70 per rank at degree 2, 4, which block_size does not divide."""
    return dict(hidden_states=torch.randn(batch, 4, frames, 10, 14, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=g),
                timestep=torch.full((batch,), 1000.0 * noise), return_dict=False)


def tiny_flux(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=24,
                                  pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()


def flux_call(g, batch, noise, height=8, width=14, text=8):
    """Joint attention, text first, both split by diffusers' plan: 112 image and 8 text tokens."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1], ids[..., 2] = torch.arange(height)[:, None], torch.arange(width)[None, :]
    return dict(hidden_states=torch.randn(batch, height * width, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
                pooled_projections=torch.randn(batch, 8, generator=g), timestep=torch.full((batch,), noise),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3), return_dict=False)


def tiny_ltx_video(seed=0):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16,
                                      cross_attention_dim=64, num_layers=2, caption_channels=24).eval()


def ltx_call(g, batch, noise, frames=4, height=5, width=7, text=8):
    """Video-only self-attention (140 tokens); diffusers' plan splits the text of the cross-attention too, and its
    mask (the second sample's last 2 tokens are padding)."""
    mask = torch.ones(batch, text)
    mask[1:, text - 2:] = 0
    return dict(hidden_states=torch.randn(batch, frames * height * width, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
                timestep=torch.full((batch,), int(1000 * noise), dtype=torch.long),
                encoder_attention_mask=mask, num_frames=frames, height=height, width=width,
                rope_interpolation_scale=(0.4, 32.0, 32.0), return_dict=False)


def tiny_cogvideox(seed=0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, sample_width=14,
        sample_height=10, sample_frames=9, patch_size=2, text_embed_dim=24, time_embed_dim=16,
        max_text_seq_length=8, use_rotary_positional_embeddings=True).eval()


def cogvideox_call(g, batch, noise, frames=8, text=8):
    """Joint attention, text first; dit-sparse's cp_plan splits text and video (8 and 280 tokens) and the rotary
    tables (random here: any table tests that each rank gets its own rows)."""
    video = frames * 5 * 7
    return dict(hidden_states=torch.randn(batch, frames, 4, 10, 14, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
                timestep=torch.full((batch,), int(1000 * noise), dtype=torch.long),
                image_rotary_emb=(torch.randn(video, 16, generator=g), torch.randn(video, 16, generator=g)),
                return_dict=False)


def tiny_hunyuan_video(seed=0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=24,
        pooled_projection_dim=8, guidance_embeds=False, rope_axes_dim=(4, 6, 6)).eval()


def hunyuan_video_call(g, batch, noise, frames=8, text=6):
    """Joint attention, text last and padded (the second sample's last 2 tokens); dit-sparse's cp_plan splits the
    280 video tokens and keeps the text whole on every rank."""
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[1:, text - 2:] = 0
    return dict(hidden_states=torch.randn(batch, 4, frames, 10, 14, generator=g),
                timestep=torch.full((batch,), int(1000 * noise), dtype=torch.long),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g), encoder_attention_mask=mask,
                pooled_projections=torch.randn(batch, 8, generator=g), return_dict=False)


UNEVEN = {"wan": dict(frames=7), "flux": dict(height=7, text=7), "ltx_video": dict(frames=3, text=7),
          "cogvideox": dict(frames=7, text=7), "hunyuan_video": dict(frames=7)}
FAMILIES = {"wan": (tiny_wan, wan_call), "flux": (tiny_flux, flux_call), "ltx_video": (tiny_ltx_video, ltx_call),
            "cogvideox": (tiny_cogvideox, cogvideox_call), "hunyuan_video": (tiny_hunyuan_video, hunyuan_video_call)}


def plan_of(model, name):
    spec = dict(PLANS[name])
    heads = spec.pop("heads")
    plan = SparsePlan.uniform(model, "dense", schedule=Schedule(**spec))
    for module in sorted(plan.modules):
        plan = plan.with_module(module, list(heads))
    return plan


def generation(model, call, steps=4, batch=2):
    """A generation's transformer calls: falling noise levels, each step once per CFG branch (different inputs)."""
    outs = []
    with torch.no_grad():
        for i in range(steps):
            for branch in ("cond", "uncond"):
                g = torch.Generator().manual_seed(1 + i + 7 * (branch == "uncond"))
                with model.cache_context(branch, step_index=i, num_inference_steps=steps):
                    outs.append(model(**call(g, batch, 1 - i / steps))[0])
    return outs


def parallel_model(build, plan, order, ulysses, ring, uneven=False):
    model = build()
    if order == ORDERS[0]:
        dit_sparse.apply(model, plan, block_size=BLOCKS)
        enable(model, ulysses, ring, uneven)
    elif order == ORDERS[1]:
        enable(model, ulysses, ring, uneven)
        dit_sparse.apply(model, plan, block_size=BLOCKS)
    else:
        enable(model, ulysses, ring, uneven)
        model.set_attn_processor(SparseProcessor(plan, block_size=BLOCKS))
    return model


def max_diff(a_list, b_list):
    return max(float((a - b).abs().max()) for a, b in zip(a_list, b_list))


def gather_unequal_on_gloo():
    """diffusers gathers uneven shards (its *_anything modes) with one all_gather of unequal tensors, which NCCL
    takes and gloo refuses: for these CPU processes only, the same gather padded to equal sizes and trimmed."""
    import diffusers.hooks.context_parallel as context_parallel
    from diffusers.models._modeling_parallel import gather_size_by_comm

    from dit_sparse.parallel import ring

    def all_gather_anything(tensor, dim, group):
        lengths = gather_size_by_comm(tensor.shape[dim], group)
        return torch.cat(ring.all_gather(tensor, group, lengths, dim), dim)

    context_parallel._all_gather_anything = all_gather_anything


def refusals(ulysses, ring):
    """What a user gets for setups dit-sparse cannot run: {case: the error's type and message}."""
    from dit_sparse.parallel.topology import UnsupportedParallelismError

    found = {}
    # 105 video tokens do not divide by the degree: diffusers' own even split refuses them.
    model = parallel_model(tiny_wan, plan_of(tiny_wan(), "static"), ORDERS[1], ulysses, ring)
    try:
        generation(model, lambda g, batch, noise: wan_call(g, batch, noise, frames=3), steps=1)
        found["ragged"] = "no error"
    except Exception as e:  # noqa: BLE001
        found["ragged"] = f"{type(e).__name__}: {e}"
    if ulysses > 1:
        # One head more than the Ulysses degree: refused when the plan is applied; the model keeps its processors.
        model = tiny_wan(heads=ulysses + 1)
        plan = SparsePlan.uniform(model, "dense")
        enable(model, ulysses, ring)
        stock = {name: type(p).__name__ for name, p in model.attn_processors.items()}
        try:
            dit_sparse.apply(model, plan)
            found["heads"] = "no error"
        except UnsupportedParallelismError as e:
            unchanged = stock == {name: type(p).__name__ for name, p in model.attn_processors.items()}
            found["heads"] = f"{type(e).__name__}: {e}" + ("" if unchanged else " (processors changed)")
    return found


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="wan")
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--plans", nargs="*", default=sorted(PLANS))
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--uneven", action="store_true",
                   help="diffusers' *_anything split, with token counts the degree does not divide")
    args = p.parse_args()
    # A rank that fails alone leaves the others waiting in a collective: fail them too, and soon.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    build, call = FAMILIES[args.family]
    if args.uneven:  # token counts the degree does not divide: 7 frames of Wan (245), text of 7 (Flux)
        call = functools.partial(call, **UNEVEN[args.family])
        gather_unequal_on_gloo()
    results, failed = {}, False
    faulthandler.dump_traceback_later(args.timeout * 2, exit=True)  # a hang prints every rank's stack
    cases = [(name, ORDERS[i % len(ORDERS)]) for i, name in enumerate(args.plans)]
    cases += [("static", order) for order in ORDERS if ("static", order) not in cases]
    for name, order in cases:
        try:
            reference = build()
            plan = plan_of(reference, name)
            if order == ORDERS[2]:  # the same form on one process: its first call binds and runs alike
                reference.set_attn_processor(SparseProcessor(plan, block_size=BLOCKS))
            else:
                dit_sparse.apply(reference, plan, block_size=BLOCKS)
            expected = generation(reference, call)
            model = parallel_model(build, plan, order, args.ulysses, args.ring, args.uneven)
            got = generation(model, call)
            state = next(iter(bound_processor(model)._states.values()))
            if state.parallel is None or state.parallel.world != args.ulysses * args.ring:
                raise AssertionError(f"the plan did not run in parallel: {state.parallel}")
            results[f"{name} ({order})"] = max_diff(expected, got)
            results[f"{name} ({order}) traffic"] = dict(state.parallel.traffic)
            # each rank counts its own heads and rows; summed over ranks, the one-process count
            results[f"{name} ({order}) density"] = [bound_processor(reference).stats.executed_density,
                                                    bound_processor(model).stats.summed_over_ranks().executed_density]
            results[f"{name} ({order}) head orders"] = sorted({str(b.head_order) for b in state.bindings.values()
                                                               if b.covered})
        except Exception:  # noqa: BLE001 - reported per case; the test shows the traceback
            results[f"{name} ({order})"] = traceback.format_exc()[-2000:]
            failed = True
        dist.barrier()
    if args.family == "wan" and not args.uneven:
        try:
            results["refusals"] = refusals(args.ulysses, args.ring)
        except Exception:  # noqa: BLE001
            results["refusals"] = traceback.format_exc()[-2000:]
            failed = True
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
