"""What the demo page runs, without gradio: the model, its input limits, the checks on every input, the plan
choice, the dense/sparse comparison behind a lock, the cache of identical requests, and the output files.

The gradio layer (:mod:`dit_sparse.demo.app`) only turns :class:`DemoError` into a message on the page.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import math
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..api import transformers_of
from ..checks import ArgumentError
from ..comparison import compare_dense_sparse
from ..models import DTYPES, TINY_SHAPES, call_defaults, load_model, patch_size
from ..plan import PlanError, SparsePlan
from ..plan_spec import PLANS_DIR
from ..strategies import STRATEGIES
from ..video import side_by_side, write_video

logger = logging.getLogger(__name__)

SHIPPED, UPLOAD, UNIFORM = "shipped plan", "upload a plan", "uniform strategy"
PLAN_SOURCES = (SHIPPED, UPLOAD, UNIFORM)
MAX_PROMPT_CHARS = 500
MAX_PLAN_BYTES = 5 * 2**20
MAX_SEED = 2**31 - 1
MAX_PREVIEWS = 32
CPU_MAX_TOKENS = 4096  # tiny-shapes on the CPU: e.g. 8 frames at 64x32, 16 frames at 32x32
DEFAULT_KNOB = 0.25
UNTRAINED_WARNING = (
    "The trained tiny-shapes weights are not installed, so this page runs the untrained tiny-shapes architecture: "
    "the videos are noise and the caption check fails, but timings, PSNR/SSIM and the plan work as with the "
    "trained model. Train them with `python -m dit_sparse.zoo.train_tiny_shapes`."
)

# What the uniform-strategy slider ("knob", in (0, 1]; smaller is sparser) sets for each strategy.
KNOB_EFFECT = {
    "diagonal": "window = (k, k, k): half-widths in frames, rows and columns as fractions of the grid",
    "multi_diagonal": "window = (k, k): half-widths in rows and columns in every frame, as fractions of the grid",
    "block_adaptive": "cap = k: at most this fraction of key blocks chosen by estimated mass (tau 0.9)",
    "pyramid": "bands scaled by k: less attention mass kept at full resolution, more pooled or dropped",
}


class DemoError(ValueError):
    """Bad input, or a model or plan that cannot be used: the message is shown on the page as it is."""


def knob_params(strategy: str, knob: float) -> dict[str, Any]:
    """The parameters the density knob gives `strategy` (none for strategies without a density knob)."""
    k = float(knob)
    if strategy == "diagonal":
        return {"window": [k, k, k]}
    if strategy == "multi_diagonal":
        return {"window": [k, k]}
    if strategy == "block_adaptive":
        return {"cap": k}
    if strategy == "pyramid":
        return {"bands": [round(b * k, 6) for b in (0.6, 0.8, 0.9, 0.95)]}
    return {}


def knob_effect(strategy: str | None) -> str:
    if strategy in KNOB_EFFECT:
        return f"Density knob k: {KNOB_EFFECT[strategy]}."
    return f"The density knob does not apply to {strategy!r}; it runs with its default parameters."


# ---------------------------------------------------------------------------------------------------------------
# model and limits


def load_demo_model(model: str, device: str, dtype: str):
    """(pipeline, warning or None). tiny-shapes without its trained weights falls back to the untrained
    architecture, with a warning for the page."""
    if dtype not in DTYPES:
        raise DemoError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DemoError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu")
    if model == TINY_SHAPES:
        from ..zoo import load_tiny_shapes
        from ..zoo import pipeline as zoo_pipeline

        if (Path(zoo_pipeline.WEIGHTS_DIR) / "model_index.json").is_file():
            try:
                return load_tiny_shapes(device=device, dtype=DTYPES[dtype]), None
            except Exception as e:  # half-written or broken weights: still show the page, and say why
                logger.warning("could not load the tiny-shapes weights: %s", e)
                warning = (f"The tiny-shapes weights could not be loaded ({type(e).__name__}: {e}); this page runs "
                           "the untrained architecture, so the videos are noise.")
                return _untrained(device, dtype), warning
        logger.warning("tiny-shapes weights not found at %s; using the untrained architecture",
                       zoo_pipeline.WEIGHTS_DIR)
        return _untrained(device, dtype), UNTRAINED_WARNING
    try:
        return load_model(model, device, DTYPES[dtype]), None
    except ArgumentError as e:
        raise DemoError(str(e)) from None


def _untrained(device: str, dtype: str):
    from ..zoo import build_pipeline

    pipe = build_pipeline().to(device)
    return pipe if DTYPES[dtype] == DTYPES["float32"] else pipe.to(dtype=DTYPES[dtype])


def _is_tiny_shapes(pipe) -> bool:
    return type(pipe).__name__ == "TinyShapesPipeline"


@dataclass(frozen=True)
class Limits:
    """What the page lets a visitor ask of the model (a CPU-sized range for tiny-shapes)."""

    default_steps: int
    max_steps: int
    default_guidance: float
    max_guidance: float
    multiple: int  # height and width must be multiples of this
    min_side: int
    max_side: int
    default_height: int
    default_width: int
    default_frames: int
    max_frames: int
    spatial_factor: int = 1  # pixels per latent pixel
    temporal_factor: int = 1  # frames per latent frame
    max_tokens: int | None = None  # cap on the transformer's sequence (keeps a CPU run to a minute or so)

    @classmethod
    def for_pipeline(cls, pipe, transformer, device: str = "cpu") -> "Limits":
        d = call_defaults(pipe)
        _, ph, pw = patch_size(transformer)
        if _is_tiny_shapes(pipe):
            return cls(default_steps=int(d.get("num_inference_steps") or 20), max_steps=50,
                       default_guidance=float(d.get("guidance_scale") or 4.5), max_guidance=20.0,
                       multiple=max(ph, pw), min_side=8, max_side=64, default_height=int(d.get("height") or 32),
                       default_width=int(d.get("width") or 32), default_frames=int(d.get("num_frames") or 8),
                       max_frames=16, max_tokens=CPU_MAX_TOKENS if device == "cpu" else None)
        spatial = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8)
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", None) or 1)
        height = d.get("height") if isinstance(d.get("height"), int) else 480
        width = d.get("width") if isinstance(d.get("width"), int) else 832
        frames = d.get("num_frames") if isinstance(d.get("num_frames"), int) else 1
        steps = d.get("num_inference_steps") if isinstance(d.get("num_inference_steps"), int) else 50
        guidance = d.get("guidance_scale") if isinstance(d.get("guidance_scale"), (int, float)) else 5.0
        return cls(default_steps=steps, max_steps=max(100, steps), default_guidance=float(guidance),
                   max_guidance=20.0, multiple=spatial * max(ph, pw), min_side=spatial * max(ph, pw) * 4,
                   max_side=2 * max(height, width), default_height=height, default_width=width,
                   default_frames=frames, max_frames=max(2 * frames, 1), spatial_factor=spatial,
                   temporal_factor=temporal)

    @property
    def default_resolution(self) -> str:
        return f"{self.default_height}x{self.default_width}"

    def resolutions(self) -> list[str]:
        """A few sizes to pick from (the default, smaller and larger ones, all valid)."""
        out = []
        for scale in (0.5, 0.75, 1.0, 1.5, 2.0):
            h = int(round(self.default_height * scale / self.multiple)) * self.multiple
            w = int(round(self.default_width * scale / self.multiple)) * self.multiple
            if self.min_side <= min(h, w) and max(h, w) <= self.max_side and f"{h}x{w}" not in out:
                out.append(f"{h}x{w}")
        return out


# ---------------------------------------------------------------------------------------------------------------
# requests and results


@dataclass(frozen=True)
class Request:
    """Everything that decides a result: the cache key."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    frames: int
    plan_json: str  # the plan, canonical JSON (an uploaded plan is keyed by its content, not its file name)


@dataclass(frozen=True)
class Result:
    dense_video: str
    sparse_video: str
    side_by_side_video: str
    heatmap: str
    plan_picture: str
    metrics: dict[str, Any]
    table: list[list[str]]
    seconds: float  # wall time of the run that made this result
    digest: str  # sha256 of the dense and sparse frames: equal digests, equal outputs
    cached: bool = False


def _fmt_seconds(v: float) -> str:
    return f"{v:.3f}"


def _fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def _fmt_caption(ok: bool | None, metrics: dict[str, Any]) -> str:
    if ok is None:
        return "n/a (prompt outside the tiny-shapes grammar)" if "caption_check" in metrics else "n/a"
    return "pass" if ok else "fail"


def metrics_table(metrics: dict[str, Any], tiny_shapes: bool = True) -> list[list[str]]:
    """The rows of the page's metrics table, as the strings shown there."""
    psnr = metrics["psnr"]
    rows = [
        ["total time, dense (s)", _fmt_seconds(metrics["dense_seconds"])],
        ["total time, sparse (s)", _fmt_seconds(metrics["sparse_seconds"])],
        ["speedup (total)", _fmt_ratio(metrics["speedup"])],
        ["attention time, dense (s)", _fmt_seconds(metrics["dense_attention_seconds"])],
        ["attention time, sparse (s)", _fmt_seconds(metrics["sparse_attention_seconds"])],
        ["attention speedup", _fmt_ratio(metrics.get("attention_speedup"))],
        ["executed attention density", f"{100 * metrics['executed_attention_density']:.1f}%"],
        ["PSNR sparse vs dense (dB)", "inf (identical)" if not math.isfinite(psnr) else f"{psnr:.2f}"],
        ["SSIM sparse vs dense", f"{metrics['ssim']:.4f}" if metrics.get("ssim") is not None
         else f"n/a ({metrics.get('ssim_note') or 'not measured'})"],
    ]
    if tiny_shapes:
        rows.append(["caption check, dense", _fmt_caption(metrics.get("dense_caption_ok"), metrics)])
        rows.append(["caption check, sparse", _fmt_caption(metrics.get("sparse_caption_ok"), metrics)])
    return rows


def frames_digest(dense: np.ndarray, sparse: np.ndarray) -> str:
    h = hashlib.sha256()
    for video in (dense, sparse):
        h.update(np.ascontiguousarray(video, dtype=np.float32).tobytes())
    return h.hexdigest()


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics for a JSON output: non-finite floats become strings ("inf")."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# the backend


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or value is None:
        raise DemoError(f"{name} must be a whole number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise DemoError(f"{name} must be a whole number, got {value!r}")
    return int(f)


def _as_float(value, name: str) -> float:
    if isinstance(value, bool) or value is None:
        raise DemoError(f"{name} must be a number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise DemoError(f"{name} must be a finite number, got {value!r}")
    return f


class DemoBackend:
    """One loaded pipeline shared by every visitor; runs one comparison at a time and caches results.

    `pipe` may be given (tests, notebooks); otherwise `model` is loaded (tiny-shapes falls back to the
    untrained architecture with `warning` set when its trained weights are missing).
    """

    def __init__(self, model: str = TINY_SHAPES, plan: str | None = None, device: str = "cpu",
                 dtype: str = "float32", executor: str | None = None, cache_size: int = 16, pipe=None,
                 warning: str | None = None):
        if pipe is None:
            pipe, warning = load_demo_model(model, device, dtype)
        self.model_name = model
        self.device = device
        self.dtype = dtype
        self.executor = executor
        self.pipe = pipe
        self.warning = warning
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = transformers_of(pipe)[0]
        self.tiny_shapes = _is_tiny_shapes(pipe)
        self.limits = Limits.for_pipeline(pipe, self.transformer, device)
        self.cache_size = cache_size
        self.runs = 0
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[Request, Result] = OrderedDict()
        self._workdir = Path(tempfile.mkdtemp(prefix="dit-sparse-demo-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._workdir), True)
        self._ids = itertools.count(1)  # output file names (next() on a count is atomic)
        self.shipped_plans, self.default_source, self.default_strategy = self._plan_choices(plan)

    # -- description ----------------------------------------------------------------------------------------
    def describe(self) -> str:
        from ..adapters import adapter_for_transformer

        fp = adapter_for_transformer(self.transformer).fingerprint(self.transformer)
        name = self.model_name if self.model_name != TINY_SHAPES or self.warning is None else "tiny-shapes (untrained)"
        return (f"Model **{name}** ({type(self.pipe).__name__}, {fp.transformer_class}: {fp.num_layers} layers x "
                f"{fp.num_heads} heads), device **{self.device}**, {self.dtype}.")

    def example_prompts(self) -> list[str]:
        if self.tiny_shapes:
            from ..zoo.shapes_data import TRAIN_COMBOS, heldout_prompts

            train = [a.caption for a in TRAIN_COMBOS]
            return ["a red circle moving right on a dark background", *heldout_prompts()[:2], *train[::60][1:3]]
        return ["a cat walking on grass", "a red sports car driving along a coastal road at sunset",
                "waves crashing on rocks, slow motion"]

    @property
    def default_prompt(self) -> str:
        return self.example_prompts()[0]

    # -- plans ----------------------------------------------------------------------------------------------
    def _compatible(self, plan: SparsePlan) -> bool:
        from ..adapters import adapter_for_transformer

        return plan.model.mismatch(adapter_for_transformer(self.transformer).fingerprint(self.transformer)) is None

    def _plan_choices(self, plan: str | None) -> tuple[dict[str, Path], str, str]:
        """Shipped plans that fit the model (the --plan file first), the initial plan source and strategy."""
        shipped: dict[str, Path] = {}
        source, strategy = SHIPPED, "diagonal"
        if plan is not None and plan in STRATEGIES:
            source, strategy = UNIFORM, plan
        elif plan is not None and plan != "default":
            path = Path(plan)
            if not path.exists():  # the same words as generate's --plan
                raise DemoError(f"--plan: {plan!r} is neither a plan file nor a strategy (known strategies: "
                                f"{', '.join(sorted(STRATEGIES))}; or 'default')")
            try:
                loaded = SparsePlan.load(path)
            except PlanError as e:
                raise DemoError(f"--plan: {e}") from None
            self._check_fits(loaded, f"--plan {path.name}")
            shipped[path.name] = path
        for path in sorted(PLANS_DIR.glob("*.plan.json")):
            try:
                if self._compatible(SparsePlan.load(path)) and path.name not in shipped:
                    shipped[path.name] = path
            except PlanError as e:
                logger.warning("skipping shipped plan %s: %s", path, e)
        if source == SHIPPED and not shipped:
            source = UNIFORM
        return shipped, source, strategy

    def _check_fits(self, plan: SparsePlan, what: str) -> None:
        from ..processor import PlanMismatchError, SparseProcessor

        try:
            SparseProcessor(plan).check_plan(self.transformer)
        except PlanMismatchError as e:
            raise DemoError(f"{what}: {e}") from None

    def resolve_plan(self, source: str | None, shipped: str | None = None, upload: str | None = None,
                     strategy: str | None = None, knob: float | None = DEFAULT_KNOB) -> tuple[SparsePlan, str]:
        """(plan, a short name for it) from the page's plan inputs; DemoError on anything unusable."""
        if source == SHIPPED:
            if not self.shipped_plans:
                raise DemoError("no shipped plan fits this model; upload a plan or choose a uniform strategy")
            if shipped not in self.shipped_plans:
                raise DemoError(f"unknown shipped plan {shipped!r}; choose one of {', '.join(self.shipped_plans)}")
            try:
                return SparsePlan.load(self.shipped_plans[shipped]), shipped
            except PlanError as e:
                raise DemoError(f"shipped plan {shipped}: {e}") from None
        if source == UPLOAD:
            if not upload:
                raise DemoError("no plan file uploaded: upload a .plan.json file, or pick another plan source")
            path = Path(upload)
            name = path.name
            try:
                if path.stat().st_size > MAX_PLAN_BYTES:
                    raise DemoError(f"the uploaded plan {name} is larger than {MAX_PLAN_BYTES // 2**20} MiB")
                text = path.read_bytes().decode("utf-8")
            except OSError as e:
                raise DemoError(f"could not read the uploaded plan {name}: {e.strerror or e}") from None
            except UnicodeDecodeError:
                raise DemoError(f"the uploaded plan {name} is not a text (UTF-8 JSON) file") from None
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DemoError(f"the uploaded plan {name} is not valid JSON ({e.msg} at line {e.lineno}, "
                                f"column {e.colno})") from None
            try:
                plan = SparsePlan.from_json(data, source=name)
            except PlanError as e:
                raise DemoError(f"the uploaded plan is broken: {e}") from None
            self._check_fits(plan, f"the uploaded plan {name}")
            return plan, name
        if source == UNIFORM:
            if strategy not in STRATEGIES:
                raise DemoError(f"unknown strategy {strategy!r}; choose one of {', '.join(sorted(STRATEGIES))}")
            params = {}
            if strategy in KNOB_EFFECT:
                k = _as_float(knob, "the density knob")
                if not 0.0 < k <= 1.0:
                    raise DemoError(f"the density knob must be in (0, 1], got {knob!r}")
                params = knob_params(strategy, k)
            try:
                plan = SparsePlan.uniform(self.transformer, strategy, **params)
            except PlanError as e:
                raise DemoError(f"uniform {strategy}: {e}") from None
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            return plan, f"uniform {strategy}" + (f" ({shown})" if shown else "")
        raise DemoError(f"plan source must be one of {', '.join(PLAN_SOURCES)}, got {source!r}")

    # -- inputs ---------------------------------------------------------------------------------------------
    def parse_resolution(self, text) -> tuple[int, int]:
        lim = self.limits
        parts = str(text or "").lower().replace("×", "x").replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise DemoError(f"resolution must be HEIGHTxWIDTH, e.g. {lim.default_resolution}; got {text!r}")
        h, w = int(parts[0]), int(parts[1])
        if h % lim.multiple or w % lim.multiple:
            raise DemoError(f"this model cannot take {h}x{w}: height and width must be multiples of "
                            f"{lim.multiple}")
        if min(h, w) < lim.min_side or max(h, w) > lim.max_side:
            raise DemoError(f"resolution {h}x{w} is outside what this demo allows: each side from "
                            f"{lim.min_side} to {lim.max_side} pixels")
        return h, w

    def check_frames(self, frames) -> int:
        n = _as_int(frames, "frames")
        if not 1 <= n <= self.limits.max_frames:
            raise DemoError(f"frames must be from 1 to {self.limits.max_frames}, got {n}")
        return n

    def make_request(self, prompt, seed, steps, guidance, resolution, frames, plan: SparsePlan) -> Request:
        """Check every input; DemoError names the first bad one."""
        lim = self.limits
        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoError("the prompt is empty: type a prompt or pick an example")
        prompt = " ".join(prompt.split())
        if len(prompt) > MAX_PROMPT_CHARS:
            raise DemoError(f"the prompt is too long ({len(prompt)} characters; at most {MAX_PROMPT_CHARS})")
        seed = _as_int(seed, "seed")
        if not 0 <= seed <= MAX_SEED:
            raise DemoError(f"seed must be from 0 to {MAX_SEED}, got {seed}")
        steps = _as_int(steps, "steps")
        if not 1 <= steps <= lim.max_steps:
            raise DemoError(f"steps must be from 1 to {lim.max_steps}, got {steps}")
        guidance = _as_float(guidance, "guidance")
        if not 0.0 <= guidance <= lim.max_guidance:
            raise DemoError(f"guidance must be from 0 to {lim.max_guidance:g}, got {guidance:g}")
        height, width = self.parse_resolution(resolution)
        frames = self.check_frames(frames)
        grid = self.token_grid(height, width, frames)
        if lim.max_tokens is not None and grid is not None and grid.num_tokens > lim.max_tokens:
            raise DemoError(f"{frames} frames at {height}x{width} is {grid.num_tokens} tokens, more than this demo "
                            f"runs on the {self.device} ({lim.max_tokens}); use fewer frames or a smaller size")
        plan_json = json.dumps(plan.to_json(), sort_keys=True, separators=(",", ":"))
        return Request(prompt, seed, steps, round(guidance, 6), height, width, frames, plan_json)

    # -- the run --------------------------------------------------------------------------------------------
    def compare(self, prompt, seed, steps, guidance, resolution, frames, source=None, shipped=None, upload=None,
                strategy=None, knob=DEFAULT_KNOB, progress: Callable[..., Any] | None = None) -> Result:
        """Dense and sparse with the same seed (or the cached result of the same request)."""
        plan, plan_name = self.resolve_plan(source, shipped, upload, strategy, knob)
        request = self.make_request(prompt, seed, steps, guidance, resolution, frames, plan)
        return self.run(request, plan, plan_name, progress)

    def cached(self, request: Request) -> Result | None:
        with self._lock:
            return self._lookup(request)

    def _lookup(self, request: Request) -> Result | None:
        hit = self._cache.get(request)
        if hit is not None:
            self._cache.move_to_end(request)
            self.cache_hits += 1
            return replace(hit, cached=True)
        return None

    def run(self, request: Request, plan: SparsePlan, plan_name: str = "plan",
            progress: Callable[..., Any] | None = None) -> Result:
        report = progress if progress is not None else (lambda *a, **k: None)  # (gr.Progress is falsy)
        report(0.0, desc="waiting for the model")
        with self._lock:  # one comparison at a time: apply/remove change the shared pipeline
            hit = self._lookup(request)
            if hit is not None:
                report(1.0, desc="cached result")
                return hit
            result = self._generate(request, plan, plan_name, report)
            self._cache[request] = result
            while len(self._cache) > self.cache_size:
                _, old = self._cache.popitem(last=False)
                shutil.rmtree(Path(old.dense_video).parent, ignore_errors=True)
            return result

    def _call_kwargs(self, request: Request, report) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "prompt": request.prompt, "num_inference_steps": request.steps, "guidance_scale": request.guidance,
            "height": request.height, "width": request.width, "output_type": "np",
        }
        params = inspect.signature(self.pipe.__call__).parameters
        if "num_frames" in params:
            kwargs["num_frames"] = request.frames
        if "callback_on_step_end" in params:
            total = 2 * request.steps
            done = [0]

            def on_step(pipe, i, t, callback_kwargs):
                done[0] += 1
                phase = "dense" if done[0] <= request.steps else "sparse"
                step = done[0] if phase == "dense" else done[0] - request.steps
                report(min(done[0] / total, 1.0), desc=f"{phase}: step {step}/{request.steps}")
                return callback_kwargs

            kwargs["callback_on_step_end"] = on_step
        return kwargs

    def _generate(self, request: Request, plan: SparsePlan, plan_name: str, report) -> Result:
        from ..adapters import UnsupportedModelError
        from ..api import AlreadyAppliedError
        from ..processor import PlanMismatchError

        start = time.perf_counter()
        report(0.0, desc=f"dense: step 0/{request.steps}")
        try:
            comparison = compare_dense_sparse(self.pipe, plan, self._call_kwargs(request, report), request.seed,
                                              self.device, self.executor)
        except ArgumentError as e:
            raise DemoError(str(e)) from None
        except (PlanError, PlanMismatchError, UnsupportedModelError, AlreadyAppliedError) as e:
            raise DemoError(f"the plan cannot run on this model: {e}") from None
        report(1.0, desc="writing the videos")
        self.runs += 1
        out = self._workdir / f"run{next(self._ids):05d}"
        out.mkdir(parents=True)
        from .render import difference_heatmap

        dense, sparse = comparison.dense, comparison.sparse
        write_video(out / "dense.mp4", dense)
        write_video(out / "sparse.mp4", sparse)
        write_video(out / "side_by_side.mp4", side_by_side(dense, sparse))
        difference_heatmap(dense, sparse, out / "difference.png")
        self.draw_plan(plan, plan_name, request.height, request.width, request.frames, out / "plan.png")
        metrics = dict(comparison.metrics)
        return Result(
            dense_video=str(out / "dense.mp4"), sparse_video=str(out / "sparse.mp4"),
            side_by_side_video=str(out / "side_by_side.mp4"), heatmap=str(out / "difference.png"),
            plan_picture=str(out / "plan.png"), metrics=metrics,
            table=metrics_table(metrics, self.tiny_shapes), seconds=time.perf_counter() - start,
            digest=frames_digest(dense, sparse),
        )

    # -- the plan picture -----------------------------------------------------------------------------------
    def token_grid(self, height: int, width: int, frames: int):
        """The transformer's token grid (frames, rows, cols) for a request, or None if it cannot be told."""
        from ..layout import Grid

        try:
            pt, ph, pw = patch_size(self.transformer)
            lim = self.limits
            latent_frames = (frames - 1) // lim.temporal_factor + 1 if lim.temporal_factor > 1 else frames
            return Grid(max(1, -(-latent_frames // pt)), max(1, height // lim.spatial_factor // ph),
                        max(1, width // lim.spatial_factor // pw))
        except Exception:  # an unusual config: the picture shows strategies without densities
            return None

    def draw_plan(self, plan: SparsePlan, plan_name: str, height: int | None, width: int | None,
                  frames: int | None, path: Path) -> Path:
        from ..adapters import adapter_for_transformer
        from .render import plan_picture

        names = [name for name, _ in adapter_for_transformer(self.transformer).covered_modules(self.transformer)]
        grid = self.token_grid(height, width, frames) if height and width and frames else None
        return plan_picture(plan, names, grid, path, title=plan_name)

    def preview_plan(self, source, shipped=None, upload=None, strategy=None, knob=DEFAULT_KNOB, resolution=None,
                     frames=None) -> str | None:
        """The plan picture for the current plan inputs (None while an upload is awaited)."""
        if source == UPLOAD and not upload:
            return None
        plan, plan_name = self.resolve_plan(source, shipped, upload, strategy, knob)
        try:
            height, width = self.parse_resolution(resolution)
            n = self.check_frames(frames)
        except DemoError:
            height = width = n = None
        folder = self._workdir / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        path = self.draw_plan(plan, plan_name, height, width, n, folder / f"plan{next(self._ids):05d}.png")
        for old in sorted(folder.glob("plan*.png"))[:-MAX_PREVIEWS]:  # gradio has its own copy of each
            old.unlink(missing_ok=True)
        return str(path)

    def close(self) -> None:
        self._finalizer()
