"""Export the student as an ordinary diffusers pipeline directory, with its plan and a scheduler on its grid.

    OUT/export/
      model_index.json, transformer/, scheduler/, (tokenizer/, text_encoder/, vae/ ... from the teacher)
      plan.json       the sparse plan the student was trained with
      distill.json    steps, guidance 1, sigmas, teacher, plan, how to run it

The scheduler is a FlowMatchEulerDiscreteScheduler whose ``set_timesteps(K)`` gives exactly the sigmas the student
was trained at (checked after a reload). Load it with::

    dit-sparse generate --model OUT/export --steps K --guidance 1 --plan OUT/export/plan.json
    pipe = TinyShapesPipeline.from_pretrained("OUT/export")     # or DiffusionPipeline for stock pipelines
    dit_sparse.apply(pipe, SparsePlan.load("OUT/export/plan.json"))
    video = pipe(prompt, num_inference_steps=K, guidance_scale=1.0).frames[0]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dit_sparse.atomic import replace_folder, write_json
from dit_sparse.plan import SparsePlan

from .config import DistillConfig
from .runfolder import writing
from .sigmas import check_scheduler, make_scheduler, sigma_grid

EXPORT_INFO = "distill.json"
PLAN_FILE = "plan.json"


def export_student(cfg: DistillConfig, weights: dict[str, torch.Tensor], plan: SparsePlan, out_dir: str | Path, *,
                   shift: float, terminal: float | None, steps_done: int) -> Path:
    """Write the pipeline directory atomically (temporary folder, then rename) and verify its scheduler. A failed
    write (a full disk) raises runfolder.WriteFailed and leaves no partial folder."""
    from dit_sparse.models import load_model

    out_dir = Path(out_dir)
    K = cfg.student_steps
    pipe = load_model(cfg.teacher, "cpu", torch.float32)
    pipe.transformer.load_state_dict(weights, strict=True)
    pipe.register_modules(scheduler=make_scheduler(K, shift, terminal, stochastic=cfg.eta == 0.0))
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(out_dir, partial=tmp):  # a full disk: one line, no partial folder
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        plan.save(tmp / PLAN_FILE)
    grid = sigma_grid(K, shift, terminal)
    info = {
        "student_steps": K,
        "guidance_scale": 1.0,
        "sigmas": grid.tolist(),
        "timesteps": (grid[:-1] * 1000).tolist(),
        "shift": shift,
        "terminal_sigma": terminal,
        "eta": cfg.eta,
        "plan": PLAN_FILE,
        "teacher": cfg.teacher,
        "teacher_guidance": cfg.guidance,
        "distill_steps": steps_done,
        "ema": cfg.export_ema and cfg.ema_decay > 0,
        "lora_rank": cfg.lora_rank,
        "executor": cfg.executor,
        "block_size": list(cfg.block_size) if cfg.block_size else None,
        "usage": f"dit-sparse generate --model {out_dir} --steps {K} --guidance 1 --plan {out_dir / PLAN_FILE}",
    }
    with writing(out_dir, partial=tmp):
        write_json(tmp / EXPORT_INFO, info)
    verify_export(tmp)
    with writing(out_dir, partial=tmp):
        replace_folder(tmp, out_dir)
    return out_dir


def verify_export(path: str | Path) -> None:
    """Reload the exported scheduler and check it visits exactly the training grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = Path(path)
    info = json.loads((path / EXPORT_INFO).read_text())
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(path), subfolder="scheduler")
    check_scheduler(scheduler, info["student_steps"], torch.tensor(info["sigmas"], dtype=torch.float32))


def load_student(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, executor: str | None = None,
                 apply_plan: bool = True):
    """The exported pipeline with its plan applied as in training (executor and block size from distill.json
    unless `executor` is given); returns (pipe, info)."""
    import dit_sparse
    from dit_sparse.models import load_model

    path = Path(path)
    info = json.loads((path / EXPORT_INFO).read_text())
    pipe = load_model(str(path), device, dtype)
    if apply_plan:
        blocks = tuple(info["block_size"]) if info.get("block_size") else None
        dit_sparse.apply(pipe, SparsePlan.load(path / info["plan"]), executor=executor or info.get("executor"),
                         block_size=blocks)
    return pipe, info
