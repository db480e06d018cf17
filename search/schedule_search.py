"""`search_reuse_schedule(model, config)` (`dit-sparse search --reuse-schedule`): the fastest schedule of a uniform
`reuse` plan whose calibration prompts reach `config.min_psnr` end to end (see `schedule`); writes the plan and a
report beside it."""

from __future__ import annotations

from dataclasses import replace

from dit_sparse.adapters import adapter_for_transformer
from dit_sparse.api import in_noise_units, noise_levels, transformers_of
from dit_sparse.models import TINY_SHAPES, call_defaults
from dit_sparse.provenance import invoked_command

from .api import SearchResult
from .config import ScheduleSearchConfig
from .errors import SearchError
from .files import check_out_folder, output_paths, prompt_list
from .pipeline import calibration_prompts, call_settings, load_pipeline, pipeline_label
from .schedule import fastest_schedule, write_schedule_report
from .threads import cpu_threads


def search_reuse_schedule(model, config: ScheduleSearchConfig) -> SearchResult:
    """model: a model name (tiny-shapes, a pipeline folder or a hub id; None: tiny-shapes) or a loaded pipeline.
    Returns the result with the plan and report paths (no statistics: a schedule search calibrates nothing)."""
    prompts = prompt_list(config.prompts)
    pipe = None if model is None or isinstance(model, str) else model
    label = pipeline_label(pipe) if pipe is not None else model or TINY_SHAPES
    paths = output_paths(config.out, label)
    paths.pop("stats"), paths.pop("png")
    check_out_folder(paths["plan"])
    with cpu_threads(config.device, config.threads):
        pipe = pipe if pipe is not None else load_pipeline(label, config.device, config.dtype)
        transformer = transformers_of(pipe)[0]
        adapter_for_transformer(transformer)  # unsupported models fail here, before any generation
        num_steps = config.steps or call_defaults(pipe).get("num_inference_steps")
        if not isinstance(num_steps, int):
            raise SearchError(f"{type(pipe).__name__} has no default step count; give `steps`")
        prompts = prompts or calibration_prompts(pipe)
        kwargs = call_settings(pipe, steps=num_steps, guidance=config.guidance, height=config.height,
                               width=config.width, frames=config.frames, output_type="np")
        solution, validation, closest = fastest_schedule(pipe, transformer, prompts, kwargs, num_steps, config)
    solution.plan.calibration["model"] = label
    command = invoked_command()
    if command is not None:
        solution.plan.calibration["command"] = command
    solution = replace(solution, plan=in_noise_units(solution.plan, noise_levels(pipe, num_steps)))
    solution.plan.save(paths["plan"])
    write_schedule_report(solution, validation, paths["report"], command)
    return SearchResult(solution.plan, solution, None, paths, closest)
