"""What the demo page runs, without gradio: one loaded model shared by every visitor, the dense/sparse comparison
behind a lock, the cache of identical requests, the output files and the plan picture.

The model and its limits: :mod:`.model`; the checks on every input: :mod:`.inputs`; the plan choice: :mod:`.plans`;
results and their cache: :mod:`.results`. The gradio layer (:mod:`dit_sparse.demo.app`) only turns
:class:`DemoError` into a message on the page.
"""

from __future__ import annotations

import inspect
import itertools
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from ..api import transformers_of
from ..checks import ArgumentError
from ..comparison import compare_dense_sparse
from ..models import TINY_SHAPES, patch_size
from ..plan import PlanError, SparsePlan
from ..video import side_by_side, write_video
from .inputs import DemoError, Request, check_frames, make_request, parse_resolution
from .model import Limits, is_tiny_shapes, load_demo_model
from .plans import DEFAULT_KNOB, UPLOAD, PlanChoice
from .results import Result, ResultCache, frames_digest, metrics_table

MAX_PREVIEWS = 32


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
        self.model_name, self.device, self.dtype, self.executor = model, device, dtype, executor
        self.pipe, self.warning = pipe, warning  # warning: shown on the page (an untrained fallback model)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = transformers_of(pipe)[0]
        self.tiny_shapes = is_tiny_shapes(pipe)
        self.limits = Limits.for_pipeline(pipe, self.transformer, device)
        self.runs = 0
        self._lock = threading.Lock()
        self._cache = ResultCache(cache_size)
        self._workdir = Path(tempfile.mkdtemp(prefix="dit-sparse-demo-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._workdir), True)
        self._ids = itertools.count(1)  # output file names (next() on a count is atomic)
        self.plans = PlanChoice(self.transformer, plan)
        self.shipped_plans = self.plans.shipped
        self.default_source, self.default_strategy = self.plans.default_source, self.plans.default_strategy

    @property
    def cache_hits(self) -> int:
        return self._cache.hits

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

    # -- inputs ---------------------------------------------------------------------------------------------
    def resolve_plan(self, source: str | None, shipped: str | None = None, upload: str | None = None,
                     strategy: str | None = None, knob: float | None = DEFAULT_KNOB) -> tuple[SparsePlan, str]:
        """(plan, a short name for it) from the page's plan inputs; DemoError on anything unusable."""
        return self.plans.resolve(source, shipped, upload, strategy, knob)

    def parse_resolution(self, text) -> tuple[int, int]:
        return parse_resolution(text, self.limits)

    def check_frames(self, frames) -> int:
        return check_frames(frames, self.limits)

    def make_request(self, prompt, seed, steps, guidance, resolution, frames, plan: SparsePlan) -> Request:
        """Check every input; DemoError names the first bad one."""
        return make_request(prompt, seed, steps, guidance, resolution, frames, plan, self.limits, self.token_grid,
                            self.device)

    # -- the run --------------------------------------------------------------------------------------------
    def compare(self, prompt, seed, steps, guidance, resolution, frames, source=None, shipped=None, upload=None,
                strategy=None, knob=DEFAULT_KNOB, progress: Callable[..., Any] | None = None) -> Result:
        """Dense and sparse with the same seed (or the cached result of the same request)."""
        plan, plan_name = self.resolve_plan(source, shipped, upload, strategy, knob)
        request = self.make_request(prompt, seed, steps, guidance, resolution, frames, plan)
        return self.run(request, plan, plan_name, progress)

    def cached(self, request: Request) -> Result | None:
        with self._lock:
            return self._cache.get(request)

    def run(self, request: Request, plan: SparsePlan, plan_name: str = "plan",
            progress: Callable[..., Any] | None = None) -> Result:
        report = progress if progress is not None else (lambda *a, **k: None)  # (gr.Progress is falsy)
        report(0.0, desc="waiting for the model")
        with self._lock:  # one comparison at a time: apply/remove change the shared pipeline
            hit = self._cache.get(request)
            if hit is not None:
                report(1.0, desc="cached result")
                return hit
            result = self._generate(request, plan, plan_name, report)
            self._cache.put(request, result)
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
        from .render import difference_heatmap

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
