"""`dit-sparse generate`: the same prompt and seed dense and sparse, with timings, fidelity and the caption check."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .api import apply, remove
from .atomic import WriteError, atomic_path, check_writable_folder, write_json
from .executors import get_executor
from .metrics import for_json, is_exact, psnr, ssim, ssim_unavailable, to_uint8_video
from .parallel import launch as parallel_launch
from .plan import SparsePlan
from .strategies import STRATEGIES
from .timing import AttentionTimer, KernelTimer

logger = logging.getLogger(__name__)

TINY_SHAPES = "tiny-shapes"
PLANS_DIR = Path(__file__).resolve().parent / "plans"
DEFAULT_PLANS = {"TinyShapesPipeline": PLANS_DIR / "tiny-shapes.plan.json"}
DEFAULT_PROMPTS = {"TinyShapesPipeline": "a red circle moving right on a dark background"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class GenerateError(ValueError):
    """Bad arguments for generate: the message says what was wrong and how to fix it."""


@dataclass
class GenerateConfig:
    prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    plan: str | None = None
    model: str = TINY_SHAPES
    device: str = "cpu"
    dtype: str = "float32"
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    out: str | None = "out/generate"
    executor: str | None = None
    progress: bool = True
    repeats: int = 2
    force: bool = False  # run even when the size estimate says the run is too large for the device
    ulysses: int = 1  # context parallelism (under torchrun): Ulysses degree
    ring: int = 1  # and ring degree; their product is the number of processes


def load_model(model: str, device: str, dtype: torch.dtype):
    """tiny-shapes from the package's shipped weights, or any diffusers pipeline by local path or hub id."""
    if model == TINY_SHAPES:
        from .zoo import load_tiny_shapes

        return load_tiny_shapes(device=device, dtype=dtype)
    model = check_model_name(model)
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import HFValidationError

    pipeline_cls = DiffusionPipeline
    if _is_saved_tiny_shapes(model):
        from .zoo import TinyShapesPipeline

        pipeline_cls = TinyShapesPipeline  # diffusers cannot resolve the project's own pipeline class by name
    try:
        pipe = pipeline_cls.from_pretrained(model, dtype=dtype)
    except (OSError, HFValidationError) as e:
        raise GenerateError(f"--model: could not load {model!r}: {str(e).splitlines()[0]}") from None
    return pipe.to(device)


HUB_ID_RULE = "a hub id is owner/name, of letters, digits, '-', '_' and '.'"


def check_model_name(model: str, option: str = "--model") -> str:
    """Before anything loads: `model` must be tiny-shapes, an existing path or a hub id (owner/name). A path-like
    name that does not exist (./mymodel, ../models/x, /abs/path, ~/x, a/b/c) is a mistyped folder: one line says
    so, instead of the hub's error about repository ids. Returns the name to load (~ expanded)."""
    if model == TINY_SHAPES:
        return model
    if not model.strip():
        raise GenerateError(f"{option}: empty model name; give tiny-shapes, a pipeline folder or a hub id")
    expanded = os.path.expanduser(model)
    if Path(expanded).exists():
        return expanded
    problem = _hub_id_problem(model)
    if problem is None:
        return model
    if _looks_like_path(model):
        raise GenerateError(f"{option}: no such model folder {model} (and it is not a hub id: {problem})")
    raise GenerateError(f"{option}: {model!r} is neither a local directory nor a hub id (owner/name)")


def _looks_like_path(name: str) -> bool:
    separators = {os.sep} | ({os.altsep} if os.altsep else set())
    return name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or any(sep in name for sep in separators)


def _hub_id_problem(name: str) -> str | None:
    """None for a well-formed hub id (owner/name), else what is wrong with it."""
    if name.count("/") != 1:
        return f"{HUB_ID_RULE}, with exactly one '/'"
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return f"{HUB_ID_RULE}, not starting or ending with '-' or '.'"
    return None


def tiny_shapes_weights_id(model: str) -> str | None:
    """The weights id of a tiny-shapes model (shipped or a saved copy), None for any other model.

    Results record it so that the README can flag those measured on earlier weights."""
    from .zoo.pipeline import weights_id

    if model == TINY_SHAPES:
        return weights_id()
    return weights_id(model) if _is_saved_tiny_shapes(model) else None


def equivalent_default_plan_id(pipeline_class: str, steps: int | None) -> str | None:
    """The id of the file the shipped default plan was converted from, when a run at `steps` (None: the pipeline's
    default) computes exactly what that earlier file computed: its dense steps moved from step counts to noise
    levels, the same steps at the step count it was measured at (`in_noise_units`)."""
    path = DEFAULT_PLANS.get(pipeline_class)
    if path is None or not path.is_file():
        return None
    converted = json.loads(path.read_text()).get("calibration", {}).get("schedule_in_noise_units")
    if not converted or steps not in (None, converted.get("steps")):
        return None
    return converted.get("from_plan_id")


def default_plan_id(pipeline_class: str) -> str | None:
    """Short content hash of the default plan shipped for a pipeline class (None when none ships).

    Results that ran `default` record it, so that the README can tell when the default plan has changed since."""
    path = DEFAULT_PLANS.get(pipeline_class)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path is not None and path.is_file() else None


def _is_saved_tiny_shapes(model: str) -> bool:
    index = Path(model) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "TinyShapesPipeline"


def resolve_plan(spec: str | None, pipe, transformer, option: str = "--plan") -> SparsePlan:
    """A plan file, a uniform strategy name, or the shipped default plan of the pipeline's kind (`option`: the
    command-line option that gave `spec`, for errors)."""
    kind = type(pipe).__name__
    if spec is None or spec == "default":
        if kind not in DEFAULT_PLANS:
            raise GenerateError(f"no default plan ships for {kind}; pass --plan FILE or a strategy name "
                                f"({', '.join(sorted(STRATEGIES))})")
        return SparsePlan.load(DEFAULT_PLANS[kind])
    if spec in STRATEGIES:
        return SparsePlan.uniform(transformer, spec)
    if not Path(spec).exists():
        raise GenerateError(f"{option}: {spec!r} is neither a plan file nor a strategy "
                            f"(known strategies: {', '.join(sorted(STRATEGIES))})")
    return SparsePlan.load(spec)


def _call_kwargs(cfg: GenerateConfig, pipe) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"output_type": "np"}
    kwargs["prompt"] = cfg.prompt or DEFAULT_PROMPTS.get(type(pipe).__name__, "a cat walking on grass")
    for name, value in (("num_inference_steps", cfg.steps), ("guidance_scale", cfg.guidance),
                        ("height", cfg.height), ("width", cfg.width), ("num_frames", cfg.frames)):
        if value is not None:
            kwargs[name] = value
    return kwargs


def _validate(cfg: GenerateConfig) -> None:
    if cfg.steps is not None and cfg.steps <= 0:
        raise GenerateError(f"--steps must be a positive number of denoising steps, got {cfg.steps}")
    if cfg.repeats < 1:
        raise GenerateError(f"--repeats must be at least 1 (timed generations each way), got {cfg.repeats}")
    check_positive(ulysses=cfg.ulysses, ring=cfg.ring)
    if cfg.guidance is not None and not (math.isfinite(cfg.guidance) and cfg.guidance >= 0):
        raise GenerateError(f"--guidance must be a number >= 0 (1 or less turns guidance off), got {cfg.guidance}")
    check_sizes(height=cfg.height, width=cfg.width, frames=cfg.frames)
    check_device_and_dtype(cfg.device, cfg.dtype)
    if cfg.executor is not None:
        get_executor(cfg.executor, cfg.device)  # known, and able to run on that device
    check_model_name(cfg.model)
    if cfg.out:
        check_out_folder(cfg.out)


def check_out_folder(out: str | os.PathLike) -> None:
    """Before any work: an --out folder must be a folder we can write in (created here, then a probe file written
    and removed), else the results would fail to write at the end, after the work."""
    if Path(out).exists() and not Path(out).is_dir():
        raise GenerateError(f"--out {out} is an existing file; --out takes a folder")
    try:
        check_writable_folder(out)
    except WriteError as e:
        raise GenerateError(f"{e} (checked before any work; give a writable --out)") from None


def check_positive(**options) -> None:
    """Each named command-line option that was given (not None) must be > 0."""
    for name, value in options.items():
        if value is not None and value <= 0:
            raise GenerateError(f"--{name.replace('_', '-')} must be positive, got {value}")


MAX_SIDE = 16384  # pixels: no video DiT generates more; beyond it a size is a typo, not a request
MAX_FRAMES = 4096


def check_sizes(height: int | None = None, width: int | None = None, frames: int | None = None) -> None:
    """Each given size is positive and plausible (an absurd one, e.g. --height 100000, is a typo)."""
    check_positive(height=height, width=width, frames=frames)
    for name, value, limit, unit in (("height", height, MAX_SIDE, "pixels"), ("width", width, MAX_SIDE, "pixels"),
                                     ("frames", frames, MAX_FRAMES, "frames")):
        if value is not None and value > limit:
            raise GenerateError(f"--{name} {value} is not a plausible size (at most {limit:,} {unit}); "
                                "is it a typo?")


# Above this many video tokens a CPU run takes hours (attention grows with the square of the tokens); --force runs it.
CPU_MAX_TOKENS = 65536
# Rough attention throughput for the time estimate printed with a refusal (FLOP/s).
ATTENTION_FLOPS = {"cpu": 2e10, "cuda": 2e14}


@dataclass(frozen=True)
class Workload:
    """What a run at a size asks of the machine, estimated before it starts."""

    tokens: int  # video tokens per sequence (latent frames x rows x columns after patching)
    grid: tuple[int, int, int]
    scores_bytes: int  # dense attention scores of one layer if materialized: batch x heads x tokens^2 x 4 bytes
    seconds: float  # dense attention work of the whole run at ATTENTION_FLOPS
    size: tuple[int, int, int]  # frames, height, width in pixels

    def describe(self) -> str:
        f, h, w = self.size
        return (f"{f} frame{'s' * (f != 1)} of {h}x{w} px is {self.tokens:,} video tokens (grid "
                f"{'x'.join(map(str, self.grid))}): dense attention scores take about {_bytes(self.scores_bytes)} "
                f"per layer (batch x heads x tokens^2 x 4 bytes) and the run about {_duration(self.seconds)} of "
                "attention work")


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} seconds"


def call_defaults(pipe) -> dict[str, Any]:
    import inspect

    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def patch_size(transformer) -> tuple[int, int, int]:
    """(frames, rows, cols) the transformer patches together into one token."""
    config = getattr(transformer, "config", {})
    patch = config.get("patch_size", 1) if hasattr(config, "get") else 1
    if isinstance(patch, (list, tuple)):
        return tuple(int(p) for p in patch[-3:]) if len(patch) >= 3 else (1, int(patch[-2]), int(patch[-1]))
    pt = config.get("patch_size_t", 1) if hasattr(config, "get") else 1
    return int(pt or 1), int(patch or 1), int(patch or 1)


def estimate_workload(pipe, transformer, height: int | None = None, width: int | None = None,
                      frames: int | None = None, steps: int | None = None, guidance: float | None = None,
                      generations: float = 1.0) -> Workload | None:
    """Tokens, dense attention memory and time of a run at this size (None for a size the pipeline's defaults do
    not tell). generations: full generations the run makes (warm-ups and repeats)."""
    d = call_defaults(pipe)
    h, w = height or d.get("height"), width or d.get("width")
    f = frames or d.get("num_frames") or 1
    steps = steps or d.get("num_inference_steps") or 50
    guidance = guidance if guidance is not None else d.get("guidance_scale")
    if not all(isinstance(v, int) and v > 0 for v in (h, w, f, steps)):
        return None
    if getattr(pipe, "vae", None) is None:
        spatial = 1
    else:
        spatial = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8)
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", None) or 1)
    pt, ph, pw = patch_size(transformer)
    latent_frames = (f - 1) // temporal + 1 if temporal > 1 else f
    grid = (max(1, -(-latent_frames // pt)), max(1, h // spatial // ph), max(1, w // spatial // pw))
    tokens = grid[0] * grid[1] * grid[2]
    config = getattr(transformer, "config", {})
    get = config.get if hasattr(config, "get") else (lambda key, default=None: default)
    heads = int(get("num_attention_heads", None) or 1)
    head_dim = int(get("attention_head_dim", None) or 64)
    layers = int(get("num_layers", None) or 1) + int(get("num_single_layers", None) or 0)
    batch = 2 if isinstance(guidance, (int, float)) and guidance > 1 else 1
    device = getattr(transformer, "device", torch.device("cpu"))
    flops = 4.0 * batch * heads * head_dim * tokens**2 * layers * steps * generations
    seconds = flops / ATTENTION_FLOPS["cuda" if device.type == "cuda" else "cpu"]
    return Workload(tokens, grid, batch * heads * tokens**2 * 4, seconds, (f, h, w))


def available_memory(device: str) -> int | None:
    """Free memory in bytes on `device` (CPU: MemAvailable), None when unknown."""
    if torch.device(device).type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_workload(pipe, transformer, device: str, force: bool = False, **sizes) -> Workload | None:
    """Before generating: refuse a size that is too large for the device (on CPU: more than CPU_MAX_TOKENS video
    tokens, or dense attention scores larger than the free memory), naming the token count and the estimates,
    unless `force`. `sizes`: estimate_workload's keywords."""
    work = estimate_workload(pipe, transformer, **sizes)
    if work is None or torch.device(device).type != "cpu":
        return work
    free = available_memory(device)
    why = None
    if work.tokens > CPU_MAX_TOKENS:
        why = f"more than {CPU_MAX_TOKENS:,} video tokens on CPU"
    elif free is not None and work.scores_bytes > free:
        why = f"more than the {_bytes(free)} of free memory"
    if why is None:
        return work
    if force:
        logger.warning("%s (%s); running anyway (--force)", work.describe(), why)
        return work
    raise GenerateError(f"{work.describe()}: {why}. Use a smaller --height/--width/--frames, or pass --force to "
                        "run it anyway")


def check_device_and_dtype(device: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise GenerateError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise GenerateError(f"--device: {device!r} is not a torch device (cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu")
    if kind == "cpu" and DTYPES[dtype] in (torch.float16, torch.bfloat16):
        logger.warning("--dtype %s on CPU: half precision is often many times slower than float32 on CPUs, and "
                       "its timings say little about a GPU", dtype)


def warm_up(pipe, kwargs) -> None:
    """One untimed short generation, so that one-time costs (allocator, kernel selection, lazy imports) are not
    charged to whichever timed run comes first. Two steps, not one: a scheduler stretched to a terminal sigma
    (e.g. a distilled student's) cannot make a one-step grid."""
    progress = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(disable=True)
    try:
        steps = min(2, kwargs.get("num_inference_steps") or 2)
        pipe(generator=torch.Generator(device="cpu").manual_seed(0), **{**kwargs, "num_inference_steps": steps})
    except ValueError as e:
        raise GenerateError(f"the pipeline refused these settings: {e}") from None
    finally:
        if progress is not None:
            pipe._progress_bar_config = progress
        elif hasattr(pipe, "_progress_bar_config"):
            del pipe._progress_bar_config


def timed_generation(pipe, kwargs, seed, device, timer_target) -> tuple[np.ndarray, float, float, float]:
    """One generation: (frames (T, H, W, 3) in [0, 1], total seconds, seconds inside attention modules, seconds
    inside the attention kernels dit-sparse runs (0 when none runs: the stock model))."""
    timer, kernels = AttentionTimer(), KernelTimer()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with timer.measure(*timer_target), kernels.measure():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            result = pipe(generator=generator, **kwargs)
        except ValueError as e:
            raise GenerateError(f"the pipeline refused these settings: {e}") from None
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - start
    frames = result.frames[0]
    frames = frames.float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    return frames, total, timer.seconds, kernels.seconds


SHOWN_HEIGHT = 256  # write_video upscales tiny clips (nearest, an integer factor) to about this height, to be visible
LABELLED_MIN_WIDTH = 96  # each half of a side-by-side clip is at least this wide, so that its label fits


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """An mp4, written atomically: a failed write (a full disk, ffmpeg failing) leaves no file, not a 0-byte one,
    and raises WriteError naming `path`."""
    import imageio.v2 as imageio

    video = to_uint8_video(frames)
    scale = max(1, SHOWN_HEIGHT // video.shape[1])
    video = video.repeat(scale, axis=1).repeat(scale, axis=2)
    with atomic_path(path, keep_suffix=True) as tmp:
        try:
            imageio.mimwrite(str(tmp), list(video), fps=fps, macro_block_size=1)
        except (RuntimeError, ValueError) as e:  # imageio-ffmpeg reports a failed encode this way
            raise WriteError(path, e) from e


def side_by_side(left, right, labels: tuple[str, str] = ("dense", "sparse")) -> np.ndarray:
    """Two clips (T, H, W, 3), uint8 or float in [0, 1], side by side as one uint8 clip, each half under a caption
    band (white text on black, added above the picture, not over it) that names it, so that side_by_side.mp4 says
    which half is which to a person who opens it alone.

    Each half is first upscaled (nearest neighbour, one integer factor) to the height write_video shows a clip at,
    and to at least LABELLED_MIN_WIDTH wide: the label is readable on a 16x16 clip, each half below its band is its
    own video's picture pixel for pixel, and write_video leaves the result at its size. The band's height does not
    depend on the labels; the total height and width are even (libx264, yuv420p)."""
    from PIL import Image, ImageDraw, ImageFont

    left, right = to_uint8_video(left), to_uint8_video(right)
    if left.shape != right.shape or left.ndim != 4 or left.shape[-1] != 3:
        raise ValueError(f"side_by_side needs two (T, H, W, 3) clips of one shape, not {left.shape} and {right.shape}")
    _, height, width, _ = left.shape
    scale = max(1, SHOWN_HEIGHT // height, -(-LABELLED_MIN_WIDTH // width))
    height, width = height * scale, width * scale
    size = max(10, min(48, width // 9))
    try:
        font = ImageFont.load_default(size=size)  # FreeType (Pillow >= 10.1): Aileron at this size
        zoom = 1
    except (TypeError, ImportError, OSError):  # older Pillow, or no FreeType: the bitmap font (11 px), enlarged
        font = ImageFont.load_default()
        zoom = max(1, size // 11)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    top, bottom = probe.textbbox((0, 0), "Hdgjpy", font=font)[1::2]  # ascenders and descenders, whatever the label
    pad = max(2, size // 4 // zoom)
    shape = (-(-width // zoom), bottom - top + 2 * pad)  # the band before the zoom: (width, height)
    odd = (height + shape[1] * zoom) % 2  # one more black row keeps the total height even
    bands = []
    for label in labels:
        x0, _, x1, _ = probe.textbbox((0, 0), label, font=font)
        image = Image.new("L", shape, 0)
        ImageDraw.Draw(image).text(((shape[0] - (x1 - x0)) // 2 - x0, pad - top), label, fill=255, font=font)
        band = np.pad(np.asarray(image).repeat(zoom, axis=0).repeat(zoom, axis=1)[:, :width], ((odd, 0), (0, 0)))
        bands.append(np.repeat(band[:, :, None], 3, axis=2))
    halves = [np.concatenate([np.broadcast_to(b, (len(v), *b.shape)), v.repeat(scale, axis=1).repeat(scale, axis=2)],
                             axis=1) for b, v in zip(bands, (left, right))]
    return np.concatenate(halves, axis=2)


@dataclass
class Comparison:
    """One dense and one sparse generation with the same seed, and what was measured."""

    dense: np.ndarray  # (T, H, W, 3) float in [0, 1]
    sparse: np.ndarray
    metrics: dict[str, Any]


def compare_dense_sparse(pipe, plan: SparsePlan, call_kwargs: dict[str, Any], seed: int, device: str = "cpu",
                         executor: str | None = None, repeats: int = 1,
                         on_frames: Callable[[str, np.ndarray], None] | None = None,
                         dense_plan: SparsePlan | None = None) -> Comparison:
    """Run `pipe` dense, then with `plan` applied, same seed; time both (total and attention) and compare.

    repeats: timed generations each way, interleaved (dense, sparse, dense, ...); each timing is the fastest, so
    that a burst of other load on the machine does not decide the ratio. on_frames("dense" or "sparse", frames):
    called as soon as each way's first generation exists (generate writes its video then, so that a later fault
    keeps it). dense_plan: run the dense generations through this (dense) plan rather than the model's own
    processors (under context parallelism, where those cannot run every parallel mode)."""
    from .api import transformers_of

    transformers = transformers_of(pipe)

    def run_dense(run):
        if dense_plan is None:
            return run()
        apply(pipe, dense_plan, executor=executor)
        try:
            return run()
        finally:
            remove(pipe)

    run_dense(lambda: warm_up(pipe, call_kwargs))
    apply(pipe, plan, executor=executor)
    try:
        warm_up(pipe, call_kwargs)  # the sparse path's own one-time costs (layouts, executor buffers)
    finally:
        remove(pipe)
    dense_runs, sparse_runs = [], []
    for i in range(repeats):
        dense_runs.append(run_dense(lambda: timed_generation(pipe, call_kwargs, seed, device, transformers)))
        if i == 0 and on_frames is not None:
            on_frames("dense", dense_runs[0][0])
        processor = apply(pipe, plan, executor=executor)
        try:
            sparse_runs.append(timed_generation(pipe, call_kwargs, seed, device, transformers))
        finally:
            remove(pipe)
        if i == 0 and on_frames is not None:
            on_frames("sparse", sparse_runs[0][0])
    dense, sparse = dense_runs[0][0], sparse_runs[0][0]
    dense_s, dense_attn = min(r[1] for r in dense_runs), min(r[2] for r in dense_runs)
    sparse_s, sparse_attn = min(r[1] for r in sparse_runs), min(r[2] for r in sparse_runs)
    metrics: dict[str, Any] = {
        "repeats": repeats,
        "dense_seconds": dense_s,
        "sparse_seconds": sparse_s,
        "speedup": dense_s / sparse_s,
        "dense_attention_seconds": dense_attn,
        "sparse_attention_seconds": sparse_attn,
        "attention_speedup": dense_attn / sparse_attn if sparse_attn else None,
        "sparse_kernel_seconds": min(r[3] for r in sparse_runs),
        "executed_attention_density": processor.stats.summed_over_ranks().executed_density,
        "psnr": psnr(dense, sparse),  # inf when identical (a result file writes null with a note: metrics.for_json)
        "ssim": ssim(dense, sparse),  # None when the frames are too small for SSIM
        "dense_caption_ok": None,
        "sparse_caption_ok": None,
    }
    if metrics["ssim"] is None:
        metrics["ssim_note"] = ssim_unavailable(dense.shape)
    if type(pipe).__name__ == "TinyShapesPipeline":
        from .zoo.checker import check_clip

        try:
            metrics["dense_caption_ok"] = bool(check_clip(dense, call_kwargs["prompt"]).ok)
            metrics["sparse_caption_ok"] = bool(check_clip(sparse, call_kwargs["prompt"]).ok)
        except ValueError as e:  # a prompt outside the grammar cannot be checked
            metrics["caption_check"] = str(e)
    return Comparison(dense, sparse, metrics)


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate dense and sparse with the same seed; return (and write, with --out) the report.

    With --out, each file is written atomically as soon as it exists: dense.mp4 after the dense run, sparse.mp4
    after the sparse run, report.json once the metrics are known, then side_by_side.mp4; a late fault (a full disk)
    keeps what was written before it and raises WriteError naming the file."""
    _validate(cfg)
    launch = parallel_launch.start(cfg.device, cfg.ulysses, cfg.ring) if cfg.ulysses * cfg.ring > 1 else None
    device = launch.device if launch else cfg.device
    leads = launch is None or launch.leads
    pipe = load_model(cfg.model, device, DTYPES[cfg.dtype])
    pipe.set_progress_bar_config(disable=not (cfg.progress and leads), desc="denoising")
    from .api import transformers_of

    transformer = transformers_of(pipe)[0]
    if launch is not None:
        for each in transformers_of(pipe):
            parallel_launch.enable(each, cfg.ulysses, cfg.ring)
    check_workload(pipe, transformer, cfg.device, force=cfg.force, height=cfg.height, width=cfg.width,
                   frames=cfg.frames, steps=cfg.steps, guidance=cfg.guidance, generations=2 * cfg.repeats + 0.2)
    plan = resolve_plan(cfg.plan, pipe, transformer)
    kwargs = _call_kwargs(cfg, pipe)
    out = Path(cfg.out) if cfg.out and leads else None  # under torchrun, rank 0 writes

    def write_as_you_go(name: str, frames: np.ndarray) -> None:
        if out is not None:
            write_video(out / f"{name}.mp4", frames)

    # Under context parallelism the dense run goes through dit-sparse's dense plan too: diffusers' own attention
    # has no ring on CPU, and some families' stock processors (CogVideoX's) do not run in parallel at all.
    dense_plan = SparsePlan.uniform(transformer, "dense") if launch is not None else None
    result = compare_dense_sparse(pipe, plan, kwargs, cfg.seed, device, cfg.executor, cfg.repeats,
                                  on_frames=write_as_you_go, dense_plan=dense_plan)
    report: dict[str, Any] = {
        "model": cfg.model,
        "plan": cfg.plan or "default",
        "prompt": kwargs["prompt"],
        "seed": cfg.seed,
        "steps": kwargs.get("num_inference_steps"),
        "device": cfg.device,
        "dtype": cfg.dtype,
        "context_parallel": {"ulysses": cfg.ulysses, "ring": cfg.ring} if launch else None,
        "frames_shape": list(result.dense.shape),
        **result.metrics,
        "hardware": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                     "processes": launch.world if launch else 1},
        "versions": _versions(),
    }
    if out is not None:
        write_report(out / "report.json", report)
        write_video(out / "side_by_side.mp4", side_by_side(result.dense, result.sparse))
    return report


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """report.json in strict JSON: an exact PSNR is null with "psnr_note", never Infinity."""
    return write_json(path, for_json(report), finite=True)


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"dit_sparse": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


TIMERS_NOTE = ("(attention seconds time whole attention modules, projections, norms, RoPE and cross-attention "
               "included; kernel seconds time the sparse plan's attention kernels alone)")


def format_report(report: dict[str, Any]) -> str:
    def fmt(key, v):
        note = report.get(f"{key}_note")
        if is_exact(v, note):
            return "exact (the videos are identical)"
        if v is None and note:
            return f"n/a ({note})"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    keys = ["dense_seconds", "sparse_seconds", "speedup", "dense_attention_seconds", "sparse_attention_seconds",
            "attention_speedup", "sparse_kernel_seconds", "executed_attention_density", "psnr", "ssim",
            "dense_caption_ok", "sparse_caption_ok"]
    lines = [f"{k:>28}: {fmt(k, report[k])}" for k in keys if k in report]
    return "\n".join(lines + [TIMERS_NOTE])
