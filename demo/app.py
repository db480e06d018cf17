"""The Gradio page: dense and sparse generation side by side (imports gradio; nothing in dit_sparse imports this).

    app = build_app()                 # gr.Blocks, not launched; app.demo_callbacks holds the callbacks
    launch_app(app, port=7860)        # what `dit-sparse demo` does

The "compare" endpoint (``api_name="compare"``) can be driven with gradio_client::

    Client("http://127.0.0.1:7860/").predict(prompt, seed, steps, guidance, "32x32", frames,
                                             "uniform strategy", None, None, "diagonal", 0.25, api_name="/compare")
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from ..models import TINY_SHAPES
from ..strategies import STRATEGIES
from .backend import DemoBackend
from .inputs import DemoError
from .plans import DEFAULT_KNOB, PLAN_SOURCES, SHIPPED, UNIFORM, UPLOAD, knob_effect
from .results import json_safe

logger = logging.getLogger(__name__)

TABLE_HEADERS = ["metric", "value"]
VIDEO_HEIGHT = 280
CSS = """
#model-warning { background: #fff3cd; border: 1px solid #e0a800; border-radius: 8px; padding: 2px 14px; }
#model-warning p { color: #533f03; }
"""


def theme():
    """The default theme with the browser's own fonts (nothing is fetched from a font service)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


class Callbacks:
    """The page's callbacks as plain methods (tests call them directly). Bad input raises gr.Error with a message
    for the page; an unexpected failure is logged and also becomes a gr.Error, never a stack trace."""

    def __init__(self, backend: DemoBackend):
        self.backend = backend

    def compare(self, prompt, seed, steps, guidance, resolution, frames, plan_source, shipped_plan, plan_file,
                strategy, knob, progress=gr.Progress()):  # noqa: B008 (Gradio's progress-injection default)
        """Returns (dense video, sparse video, side-by-side video, heat map, metrics table, plan picture,
        raw metrics, status line)."""
        try:
            r = self.backend.compare(prompt, seed, steps, guidance, resolution, frames, plan_source, shipped_plan,
                                     _file_path(plan_file), strategy, knob, progress=progress)
        except DemoError as e:
            raise gr.Error(str(e), title="Cannot run this request", print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:
            logger.exception("the comparison failed")
            raise gr.Error(f"the run failed unexpectedly ({type(e).__name__}: {e}); the server log has the details",
                           title="Run failed") from None
        if r.cached:
            status = "Identical request: served from the cache."
        else:
            status = f"Done in {r.seconds:.1f} s (dense and sparse, same seed)."
        raw = json_safe(r.metrics)
        return (r.dense_video, r.sparse_video, r.side_by_side_video, r.heatmap, _table(r.table), r.plan_picture,
                raw, status)

    def preview(self, plan_source, shipped_plan, plan_file, strategy, knob, resolution, frames):
        """The plan picture for the current plan inputs (before anything is generated)."""
        try:
            return self.backend.preview_plan(plan_source, shipped_plan, _file_path(plan_file), strategy, knob,
                                             resolution, frames)
        except DemoError as e:
            raise gr.Error(str(e), title="Plan", print_exception=False) from None
        except Exception as e:
            logger.exception("drawing the plan failed")
            raise gr.Error(f"could not draw the plan ({type(e).__name__}: {e})", title="Plan") from None

    @staticmethod
    def plan_source_changed(plan_source, strategy):
        """Show only the inputs of the chosen plan source."""
        return (gr.update(visible=plan_source == SHIPPED), gr.update(visible=plan_source == UPLOAD),
                gr.update(visible=plan_source == UNIFORM), gr.update(visible=plan_source == UNIFORM),
                gr.update(value=knob_effect(strategy), visible=plan_source == UNIFORM))

    @staticmethod
    def strategy_changed(strategy):
        return knob_effect(strategy)


def _file_path(value) -> str | None:
    """gr.File(type="filepath") gives a path; gradio_client and older gradio may give a dict or an object."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    return getattr(value, "path", None) or getattr(value, "name", None)


def _table(rows: list[list[str]]):
    import pandas as pd

    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def build_app(model: str = TINY_SHAPES, plan: str | None = None, device: str = "cpu", dtype: str = "float32",
              executor: str | None = None, cache_size: int = 16, max_queue: int = 16,
              backend: DemoBackend | None = None) -> gr.Blocks:
    """The demo page as a gr.Blocks, queued (one run at a time; later visitors wait their turn), not launched.

    Raises DemoError for a model or --plan that cannot be used.
    """
    backend = backend or DemoBackend(model=model, plan=plan, device=device, dtype=dtype, executor=executor,
                                     cache_size=cache_size)
    cb = Callbacks(backend)
    lim = backend.limits
    shipped = list(backend.shipped_plans)
    strategies = sorted(STRATEGIES)

    with gr.Blocks(title="dit-sparse demo", analytics_enabled=False) as app:
        gr.Markdown("# dit-sparse: dense vs sparse attention\n"
                    "The same prompt and seed run twice, once with dense attention and once with a sparse attention "
                    f"plan; compare the videos, the difference and the timings. {backend.describe()}")
        if backend.warning:
            gr.Markdown(f"**Warning:** {backend.warning}", elem_id="model-warning")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", value=backend.default_prompt, lines=2, max_lines=4,
                                    elem_id="prompt")
                gr.Examples(examples=[[p] for p in backend.example_prompts()], inputs=[prompt],
                            label="Example prompts")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                    steps = gr.Slider(1, lim.max_steps, value=lim.default_steps, step=1, label="Steps",
                                      elem_id="steps")
                with gr.Row():
                    guidance = gr.Slider(0.0, lim.max_guidance, value=lim.default_guidance, step=0.5,
                                         label="Guidance", elem_id="guidance")
                    frames = gr.Slider(1, lim.max_frames, value=lim.default_frames, step=1, label="Frames",
                                       elem_id="frames")
                resolution = gr.Dropdown(lim.resolutions(), value=lim.default_resolution, allow_custom_value=True,
                                         label=f"Resolution HxW (multiples of {lim.multiple}, "
                                               f"{lim.min_side}-{lim.max_side} px)", elem_id="resolution",
                                         info=None if lim.max_tokens is None else
                                         f"at most {lim.max_tokens} tokens on the {backend.device}: frames x "
                                         f"H/{lim.multiple} x W/{lim.multiple}")
                with gr.Group():
                    plan_source = gr.Radio(list(PLAN_SOURCES), value=backend.default_source, label="Sparse plan",
                                           elem_id="plan-source")
                    shipped_plan = gr.Dropdown(shipped, value=shipped[0] if shipped else None, label="Shipped plan",
                                               visible=backend.default_source == SHIPPED, elem_id="shipped-plan")
                    plan_file = gr.File(label="Plan file (.plan.json)", file_types=[".json"], type="filepath",
                                        visible=backend.default_source == UPLOAD, elem_id="plan-file")
                    strategy = gr.Dropdown(strategies, value=backend.default_strategy, label="Strategy (every head)",
                                           visible=backend.default_source == UNIFORM, elem_id="strategy")
                    knob = gr.Slider(0.05, 1.0, value=DEFAULT_KNOB, step=0.05,
                                     label="Density knob k (smaller is sparser)",
                                     visible=backend.default_source == UNIFORM, elem_id="knob")
                    knob_info = gr.Markdown(knob_effect(backend.default_strategy),
                                            visible=backend.default_source == UNIFORM)
                run = gr.Button("Generate dense and sparse", variant="primary", elem_id="run")
                status = gr.Markdown(elem_id="status")
                plan_picture = gr.Image(label="Plan: strategy per layer and head", type="filepath",
                                        interactive=False, elem_id="plan-picture")
            with gr.Column(scale=3, min_width=480):
                with gr.Row(equal_height=True):
                    dense_video = gr.Video(label="Dense attention", autoplay=True, loop=True, interactive=False,
                                           height=VIDEO_HEIGHT, elem_id="dense-video")
                    sparse_video = gr.Video(label="Sparse attention", autoplay=True, loop=True, interactive=False,
                                            height=VIDEO_HEIGHT, elem_id="sparse-video")
                side_by_side = gr.Video(label="Side by side (dense | sparse), one clip: synchronised playback",
                                        autoplay=True, loop=True, interactive=False, height=VIDEO_HEIGHT,
                                        elem_id="side-by-side")
                heatmap = gr.Image(label="Difference heat map", type="filepath", interactive=False,
                                   elem_id="heatmap")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Metrics", interactive=False, elem_id="metrics",
                                     wrap=True)
                with gr.Accordion("Raw metrics (JSON, as returned by the API)", open=False):
                    raw = gr.JSON(elem_id="raw-metrics")

        plan_inputs = [plan_source, shipped_plan, plan_file, strategy, knob]
        run.click(cb.compare,
                  inputs=[prompt, seed, steps, guidance, resolution, frames, *plan_inputs],
                  outputs=[dense_video, sparse_video, side_by_side, heatmap, table, plan_picture, raw, status],
                  api_name="compare", concurrency_limit=1, concurrency_id="model")
        plan_source.change(cb.plan_source_changed, inputs=[plan_source, strategy],
                           outputs=[shipped_plan, plan_file, strategy, knob, knob_info], queue=False,
                           api_visibility="private")
        strategy.change(cb.strategy_changed, inputs=[strategy], outputs=[knob_info], queue=False,
                        api_visibility="private")
        preview_args = dict(fn=cb.preview, inputs=[*plan_inputs, resolution, frames], outputs=[plan_picture],
                            show_progress="hidden", concurrency_limit=2, concurrency_id="preview",
                            api_visibility="private")
        app.load(**preview_args)
        for component in (plan_source, shipped_plan, plan_file, strategy, resolution):
            component.change(**preview_args)
        knob.release(**preview_args)
        frames.release(**preview_args)

    app.queue(default_concurrency_limit=1, max_size=max_queue)
    app.demo_backend = backend
    app.demo_callbacks = cb
    return app


def launch_app(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
               **kwargs: Any):
    """app.launch with the page's theme and style (kwargs go to gr.Blocks.launch, e.g. prevent_thread_lock)."""
    kwargs.setdefault("show_error", False)
    kwargs.setdefault("ssr_mode", False)
    return app.launch(server_name=host, server_port=port, share=share, theme=theme(), css=CSS, **kwargs)
