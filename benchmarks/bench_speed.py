"""Speed-only benchmark of real architectures with random weights: transformer forwards, dense vs fixed plans.

Random weights do not change the time of a fixed (static) plan, so these speed numbers are honest; fidelity is not
measured here (use `bench e2e` on a trained model for that). Dynamic strategies are excluded because their density
depends on the weights.
"""

from __future__ import annotations

import datetime
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dit_sparse.api import apply, remove
from dit_sparse.atomic import write_json
from dit_sparse.checks import ArgumentError, check_positive, check_sizes
from dit_sparse.parallel import launch as parallel_launch
from dit_sparse.plan import SparsePlan
from dit_sparse.plan_spec import parse_plan_spec
from dit_sparse.provenance import hardware, invoked_command, versions
from dit_sparse.strategies import STRATEGIES
from dit_sparse.timing import AttentionTimer, KernelTimer


@dataclass(frozen=True)
class Architecture:
    """A published transformer config and how to make its inputs for (frames, height, width) in pixels."""

    transformer_class: str
    config: dict[str, Any]
    inputs: Callable[[dict, int, int, int, torch.dtype, str], dict[str, Any]]
    default_size: tuple[int, int, int]  # frames, height, width


def _wan_inputs(cfg, frames, height, width, dtype, device):
    latent = (1, cfg["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)
    return dict(hidden_states=torch.randn(latent, dtype=dtype, device=device),
                timestep=torch.tensor([500.0], device=device),
                encoder_hidden_states=torch.randn(1, 512, cfg["text_dim"], dtype=dtype, device=device),
                return_dict=False)


def _cogvideox_inputs(cfg, frames, height, width, dtype, device):
    latent = (1, (frames - 1) // 4 + 1, cfg["in_channels"], height // 8, width // 8)
    return dict(hidden_states=torch.randn(latent, dtype=dtype, device=device),
                encoder_hidden_states=torch.randn(1, 226, cfg["text_embed_dim"], dtype=dtype, device=device),
                timestep=torch.tensor([500], device=device), return_dict=False)


def _hunyuan_inputs(cfg, frames, height, width, dtype, device):
    latent = (1, cfg["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)
    return dict(hidden_states=torch.randn(latent, dtype=dtype, device=device),
                timestep=torch.tensor([500], device=device),
                encoder_hidden_states=torch.randn(1, 256, cfg["text_embed_dim"], dtype=dtype, device=device),
                encoder_attention_mask=torch.ones(1, 256, device=device),
                pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], dtype=dtype, device=device),
                guidance=torch.tensor([6000.0], device=device), return_dict=False)


# Strategies whose layout is estimated from q and k: named in the refusal of speed-only mode.
DYNAMIC = ", ".join(name for name, strategy in STRATEGIES.items() if strategy.dynamic)

ARCHITECTURES: dict[str, Architecture] = {
    # Wan 2.1 T2V 1.3B (480p, 81 frames -> 21 x 30 x 52 = 32,760 tokens).
    "wan2.1-1.3b": Architecture("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6), _wan_inputs, (81, 480, 832)),
    # Wan 2.1 T2V 14B (720p, 81 frames -> 21 x 45 x 80 = 75,600 tokens): the size that runs on several GPUs.
    "wan2.1-14b": Architecture("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6), _wan_inputs, (81, 720, 1280)),
    # CogVideoX-5B (480x720, 49 frames -> 13 x 30 x 45 = 17,550 video tokens + 226 text).
    "cogvideox-5b": Architecture("CogVideoXTransformer3DModel", dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42,
        text_embed_dim=4096, time_embed_dim=512, use_rotary_positional_embeddings=True, sample_width=90,
        sample_height=60, sample_frames=49, patch_size=2), _cogvideox_inputs, (49, 480, 720)),
    # HunyuanVideo at a reduced size that fits (its real config, fewer blocks by default).
    "hunyuanvideo": Architecture("HunyuanVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
        rope_theta=256.0, rope_axes_dim=(16, 56, 56)), _hunyuan_inputs, (33, 320, 512)),
}


def build(arch: Architecture, layers: int | None, dtype: torch.dtype, device: str, seed: int = 0):
    import diffusers

    config = dict(arch.config)
    if layers is not None:
        config["num_layers"] = layers
        if "num_single_layers" in config:
            config["num_single_layers"] = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device.startswith("cuda"):
            # Built in place, in its dtype: a 14B model built on the host in fp32 would need 56 GB per process.
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device(device):
                    model = getattr(diffusers, arch.transformer_class)(**config)
            finally:
                torch.set_default_dtype(default)
        else:
            model = getattr(diffusers, arch.transformer_class)(**config)
    return model.to(device=device, dtype=dtype).eval()


def _forward_seconds(run, inputs, device: str) -> float:
    """One forward of `run`, timed (synchronised on CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(**inputs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _time_forward(model, inputs, repeats: int, device: str, runner=None) -> tuple[float, float, float]:
    """Best of `repeats` forwards of `runner` (the model, or its compiled form): (forward seconds, attention-module
    seconds, attention-kernel seconds). Modules and kernels are timed in separate eager forwards (their timers
    synchronise around modules or wrap kernel calls, which a compiled graph would not keep)."""
    runner = model if runner is None else runner
    with torch.no_grad():
        runner(**inputs)  # warm-up: kernels, layouts, caches (and the compiled graphs)
        best = min(_forward_seconds(runner, inputs, device) for _ in range(repeats))
        modules, kernels = AttentionTimer(), KernelTimer()
        with modules.measure(model):
            _forward_seconds(model, inputs, device)
        with kernels.measure():
            _forward_seconds(model, inputs, device)
    return best, modules.seconds, kernels.seconds


@contextmanager
def _running(model, plan: SparsePlan | None):
    """The model with `plan` applied (its own attention when None), and the processor (or None)."""
    processor = apply(model, plan) if plan is not None else None
    try:
        yield processor
    finally:
        if processor is not None:
            remove(model)


def _check_plans(model, plan_specs: list[str]) -> list[SparsePlan]:
    """The plans of the specs, refused before anything is timed when their density depends on the weights."""
    plans = []
    for spec in plan_specs:
        plan = parse_plan_spec(spec, None, model).plan
        if any(h.impl.dynamic for heads in plan.modules.values() for h in heads):
            raise ArgumentError(f"{spec}: dynamic strategies ({DYNAMIC}) have a weight-dependent density, so random "
                                "weights would time the wrong work; speed-only mode refuses them (time them with "
                                "`dit-sparse bench e2e` on a trained model)")
        plans.append(plan)
    return plans


def run_speed(arch_name: str, plan_specs: list[str], frames: int | None = None, height: int | None = None,
              width: int | None = None, layers: int | None = None, repeats: int = 3, device: str = "cpu",
              dtype: torch.dtype = torch.float32, out: Path | None = None, compile: bool = False,
              ulysses: int = 1, ring: int = 1) -> dict[str, Any]:
    """Dense and each plan timed on one architecture. out: results.json there is rewritten (atomically) after each
    plan of the first round and after each later round, marked "partial" until the last, so that a late fault keeps
    what was measured (by rank 0 alone under context parallelism). compile: time the forward under torch.compile
    (dense and every plan alike); module and kernel seconds come from eager forwards. ulysses, ring: context
    parallelism over that many processes (under torchrun, one per device); dense is then timed at the same
    parallelism.

    Eager, the `repeats` forwards of each configuration are interleaved: every round runs dense, then each plan (one
    forward each, after a warm-up that builds the plan's layouts), so that a slow spell of the machine falls on the
    baseline and the plans alike. Compiled, every activation of a plan would compile again (minutes on a CPU), so
    there is one round of `repeats` forwards per configuration."""
    check_positive(layers=layers, repeats=repeats, ulysses=ulysses, ring=ring)
    check_sizes(frames=frames, height=height, width=width)
    arch = ARCHITECTURES[arch_name]
    f, h, w = (arch.default_size[i] if given is None else given for i, given in enumerate((frames, height, width)))
    launch = parallel_launch.start(device, ulysses, ring) if ulysses * ring > 1 else None
    device = launch.device if launch else device
    model = build(arch, layers, dtype, device)
    inputs = arch.inputs(arch.config, f, h, w, dtype, device)
    plans = _check_plans(model, plan_specs)
    dense_plan = None
    if launch is not None:
        parallel_launch.enable(model, ulysses, ring)
        # diffusers' own attention is the dense baseline where it runs this model and mode in parallel; where it
        # cannot (no cp_plan of its own, or ring on CPU, which its attention lacks), dit-sparse's dense plan is.
        if getattr(type(model), "_cp_plan", None) is None or (ring > 1 and not device.startswith("cuda")):
            dense_plan = SparsePlan.uniform(model, "dense")
    if out is not None and launch is not None and not launch.leads:
        out = None
    rounds, per_round = (1, repeats) if compile else (repeats, 1)
    records, grid = [], None

    def timed() -> tuple[float, float, float]:
        torch._dynamo.reset()
        return _time_forward(model, inputs, per_round, device, torch.compile(model) if compile else None)

    with _running(model, dense_plan):
        dense_s, dense_attn, _ = timed()
    # The stock model's attention kernels are inside diffusers' processors: time them through a dense plan (the
    # same SDPA calls), in one eager forward.
    with _running(model, SparsePlan.uniform(model, "dense")), torch.no_grad(), KernelTimer().measure() as kernels:
        model(**inputs)
    dense_kernel = kernels.seconds
    records.append({"plan": "dense", "seconds": dense_s, "attention_seconds": dense_attn,
                    "kernel_seconds": dense_kernel, "executed_density": 1.0})
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def result_so_far() -> dict[str, Any]:
        dense = records[0]
        for row in records:
            row["speedup"] = dense["seconds"] / row["seconds"]
            for part in ("attention", "kernel"):
                seconds = row[f"{part}_seconds"]
                row[f"{part}_speedup"] = dense[f"{part}_seconds"] / seconds if seconds else None
        return {
            "benchmark": "bench speed (random weights; fidelity not measured)",
            "architecture": arch_name,
            "layers": arch.config["num_layers"] if layers is None else layers,
            "size": {"frames": f, "height": h, "width": w, "video_tokens": grid.num_tokens if grid else None},
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "compiled": compile,
            "rounds": rounds,  # more than one: interleaved (see run_speed)
            "forwards_per_round": per_round,
            "context_parallel": {"ulysses": ulysses, "ring": ring, "processes": launch.world,
                                 "dense": "dit-sparse's dense plan" if dense_plan is not None
                                 else "diffusers' own attention"} if launch else None,
            "timers": "seconds: the best forward (compiled if compiled) over the rounds; attention_seconds: whole "
                      "attention modules (projections, norms, RoPE and cross-attention included) and kernel_seconds: "
                      "the attention kernels of covered self-attention, both in eager forwards",
            "command": invoked_command(),
            "date": started,
            "hardware": hardware(device),
            "versions": versions(),
            "results": records,
        }

    def write_partial(partial: str) -> None:
        if out is not None:
            write_json(out / "results.json", {**result_so_far(), "partial": partial}, finite=True)

    for i, (spec, plan) in enumerate(zip(plan_specs, plans), 1):
        with _running(model, plan) as processor:
            seconds, attention, kernel = timed()
            density = processor.stats.summed_over_ranks().executed_density
            grid = processor.grid_of(model)
        records.append({"plan": spec, "seconds": seconds, "attention_seconds": attention, "kernel_seconds": kernel,
                        "executed_density": density})
        if i < len(plans) or rounds > 1:
            write_partial(f"{i} of {len(plans)} plans" if i < len(plans) else f"round 1 of {rounds}")
    for later in range(2, rounds + 1):
        for row, plan in zip(records, [dense_plan, *plans]):
            with _running(model, plan), torch.no_grad():
                if plan is not None:
                    model(**inputs)  # warm-up: a plan applied again builds its layouts again at its first call
                row["seconds"] = min(row["seconds"], _forward_seconds(model, inputs, device))
        if later < rounds:
            write_partial(f"round {later} of {rounds}")
    return result_so_far()

