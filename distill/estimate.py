"""`dit-sparse distill --dry-run`: what a run will cost before it runs: memory (analytic, plus the measured peak of
one update) and time (one measured update x max_steps)."""

from __future__ import annotations

import resource
import time

import torch

from .config import DistillConfig

GRAD_AND_ADAM_BYTES = 12  # per trainable parameter: an fp32 gradient (4 B) and two Adam moments (8 B)
EMA_BYTES = 4  # per trainable student parameter: its fp32 average


def dry_run_report(distiller) -> dict:
    """Runs two updates of `distiller` (a Distiller: the first warms up layouts and the allocator)."""
    cfg, acc, roles = distiller.cfg, distiller.accelerator, distiller.roles
    teacher_b = 0 if roles.lora else _nbytes(roles.teacher.parameters())
    student_b = _nbytes(roles.student.parameters())
    fake_b = _nbytes(roles.fake.parameters())
    train_g = sum(p.numel() for p in roles.student_parameters())
    train_f = sum(p.numel() for p in roles.fake.parameters())
    optim_b = (train_g + train_f) * GRAD_AND_ADAM_BYTES + (train_g * EMA_BYTES if distiller.ema is not None else 0)
    cuda = acc.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = _max_rss()
    distiller.train_step()
    t0 = time.time()
    distiller.train_step()
    per_step = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _max_rss()
    return {
        "device": str(acc.device), "processes": acc.num_processes, "mixed_precision": cfg.mixed_precision,
        "sample_shape": list(distiller.sample_shape), "batch_per_process": cfg.batch_size,
        "grad_accum": cfg.grad_accum, "student_steps": cfg.student_steps,
        "sigmas": [round(s, 6) for s in distiller.sigmas],
        "params_teacher_GB": teacher_b / 1e9, "params_student_GB": student_b / 1e9, "params_fake_GB": fake_b / 1e9,
        "trainable_student": train_g, "trainable_fake": train_f,
        "grads_optimizer_ema_GB": optim_b / 1e9,
        "static_total_GB": (teacher_b + student_b + fake_b + optim_b) / 1e9,
        "measured_peak_GB": peak / 1e9,
        "measured_peak_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
        "cpu_rss_before_GB": rss0 / 1e9,
        "seconds_per_step": per_step,
        "forwards_per_step": forwards_per_step(cfg),
        "estimated_hours": per_step * cfg.max_steps / 3600,
        "max_steps": cfg.max_steps,
    }


def forwards_per_step(cfg: DistillConfig) -> dict:
    """Expected transformer forwards of one student update, by role and whether they carry gradients."""
    rollout = (cfg.student_steps + 1) / 2  # expected forwards to reach a uniform k
    cfg_calls = 2 if cfg.guidance != 1 else 1
    per_micro = {"student_no_grad": rollout * (cfg.fake_updates + 1), "student_with_grad": 1,
                 "fake_with_grad": cfg.fake_updates, "fake_no_grad": 1, "teacher": cfg_calls}
    return {k: v * cfg.grad_accum for k, v in per_micro.items()}


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
