"""Sparsity-aware step distillation: a few-step student that runs a sparse plan, from a dense many-step teacher.

    from dit_sparse.distill import DistillConfig, Distiller
    Distiller(DistillConfig(teacher="tiny-shapes", student_steps=4, max_steps=300, out="runs/ts4")).train()

Modules: config (DistillConfig, YAML + overrides), sigmas (flow-matching maths from sigma, the student's grid),
roles (teacher / student / fake score), losses (TDM), trainer (the accelerate loop), train_state (EMA, counters),
prompts (embeddings cached in the run), checkpoints (write whole, resume), samples (validation videos), estimate
(--dry-run), runfolder (the --out folder, write failures), export (a diffusers pipeline directory with the plan and a
scheduler on the training grid), cli.
Heavy imports (accelerate, diffusers) happen on first use.
"""

from .config import ConfigError, DistillConfig

__all__ = ["ConfigError", "DistillConfig", "Distiller", "export_student", "load_student"]


def __getattr__(name):
    if name == "Distiller":
        from .trainer import Distiller

        return Distiller
    if name in ("export_student", "load_student"):
        from . import export

        return getattr(export, name)
    raise AttributeError(name)
