"""`dit-sparse distill`: registered into the main CLI by ``add_distill_parser(subparsers)``.

    dit-sparse distill --teacher tiny-shapes --plan default --student-steps 4 --max-steps 300 --out runs/ts4
    dit-sparse distill --resume runs/ts4                  # continues exactly where it stopped
    dit-sparse distill --out runs/ts4 --overwrite ...     # a new run in a folder that holds one: removes it first
    dit-sparse distill --config run.yaml --set lr=2e-5 --set betas=[0,0.99]
    accelerate launch -m dit_sparse.distill --config wan13b.yaml   # several processes, same code
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dit_sparse.extras import MissingExtra, require

# flag -> config key, for the flags that map one to one (None defaults: only given flags override)
_FLAGS = {
    "teacher": str, "plan": str, "executor": str, "student_steps": int, "max_steps": int, "out": str,
    "fake_updates": int, "lr": float, "fake_lr": float, "guidance": float, "batch_size": int, "grad_accum": int,
    "prompts": str, "height": int, "width": int, "frames": int, "seed": int, "mixed_precision": str,
    "lora_rank": int, "checkpoint_every": int, "keep_checkpoints": int, "validate_every": int, "threads": int,
    "ema_decay": float, "max_minutes": float, "shift": float, "terminal_sigma": float, "teacher_steps": int,
}
_HELP = {
    "teacher": "tiny-shapes, or a local diffusers pipeline directory / hub id (the dense many-step model)",
    "plan": "'default', a plan file, or a uniform strategy with parameters, e.g. 'diagonal:window=[1,0.25,0.25]'",
    "executor": "attention executor of the student: reference, cpu or triton (default: best for the device)",
    "student_steps": "K, the student's number of sampling steps (default 4)",
    "max_steps": "student updates to run (default 300); small values for smoke runs",
    "max_minutes": "stop earlier after this wall time: checkpoint, validate and export (resume continues)",
    "out": "run folder: config, checkpoints, metrics.jsonl, validation videos, export/; a folder that already "
           "holds a run is refused (--resume DIR continues it, --overwrite replaces it)",
    "fake_updates": "fake-score updates per student update (default 5)",
    "lr": "student learning rate (default 1e-5)",
    "fake_lr": "fake-score learning rate (default 5e-5)",
    "guidance": "classifier-free guidance of the teacher's score (default 4.5); the student samples with 1",
    "batch_size": "samples per process and micro-batch (default 2)",
    "grad_accum": "micro-batches per update (default 1)",
    "prompts": "text file with one training prompt per line (tiny-shapes: its training captions)",
    "mixed_precision": "no, bf16 or fp16",
    "lora_rank": "> 0: train LoRA adapters (peft) instead of the full student; the teacher is the base model",
    "checkpoint_every": "checkpoint every N steps (default 50; 0: only at the end)",
    "keep_checkpoints": "how many checkpoints to keep (default 2)",
    "validate_every": "student validation videos every N steps (default: only at the end)",
    "shift": "static shift of the student's sigma grid (default: the teacher scheduler's)",
    "terminal_sigma": "last non-zero level of the grid (default 1/K: evenly spaced at shift 1)",
    "teacher_steps": "steps of the dense teacher's reference videos (default 50)",
}


def add_distill_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="train a few-step student that runs a sparse plan, from a dense many-step teacher",
        description="Sparsity-aware step distillation (data-free trajectory distribution matching): the student runs "
                    "the sparse plan in every forward, the teacher stays dense. Writes checkpoints, a metrics log, "
                    "validation videos and an exported pipeline (OUT/export) with its plan and sampler.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(p)
    p.set_defaults(func=run_distill)


# What a run does besides training, as on/off switches.
_SWITCHES = {
    "--overwrite": "start a new run in an --out that holds one: first REMOVES that run's config.yaml, metrics.jsonl, "
                   "checkpoints/, validation/, export/, tensorboard/ and prompt_embeds.pt (other files stay; with "
                   "--dry-run nothing is removed)",
    "--dry-run": "build everything, time two updates, print memory and time estimates; writes only the "
                 "prompt-embedding cache (no checkpoints, logs or export)",
    "--export-only": "with --resume: export the newest checkpoint's student to DIR/export and stop",
    "--no-validation": "skip the teacher and student validation videos",
}


def configure_parser(p: argparse.ArgumentParser) -> None:
    for key, kind in _FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=_HELP.get(key))
    p.add_argument("--config", default=None, help="YAML file of DistillConfig keys (flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, value parsed as YAML (repeatable)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its newest complete checkpoint (its config.yaml, then these "
                        "overrides); partial files a crash left are removed, a damaged newest checkpoint is skipped "
                        "(warning) and a torn last line of metrics.jsonl dropped")
    for flag, help_text in _SWITCHES.items():
        p.add_argument(flag, action="store_true", help=help_text)
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--cpu", action="store_true", default=None, help="train on CPU even where CUDA exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_config(args):
    from .config import DistillConfig, parse_set

    if args.resume:
        saved = Path(args.resume) / "config.yaml"  # without it the folder is not a run: check_arguments refuses
        cfg = DistillConfig.load(saved) if saved.is_file() else DistillConfig()
        cfg = cfg.updated(out=str(args.resume))
    else:
        cfg = DistillConfig.load(args.config) if args.config else DistillConfig()
    given = {k: getattr(args, k) for k in _FLAGS if getattr(args, k, None) is not None}
    if args.no_validation:
        given["validation"] = False
    if args.gradient_checkpointing:
        given["gradient_checkpointing"] = True
    if args.cpu:
        given["cpu"] = True
    cfg = cfg.updated(**given)
    return cfg.updated(**parse_set(args.set))


def check_arguments(args, cfg) -> None:
    """Before anything loads: refuse what would fail late or do something other than asked (a missing extra
    raises MissingExtra; a folder that cannot be written, RunFolderError). With --resume, first removes the partial
    files a crash left in the run (on a full disk, the space the checks and the resume need)."""
    from dit_sparse.checks import check_out_folder
    from dit_sparse.executors import require_executor_extra

    from .checkpoints import complete_checkpoints, list_checkpoints
    from .config import ConfigError
    from .runfolder import CONFIG, check_writable, clean_partials, run_entries

    if args.resume and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume {args.resume}: no such run folder")
    if args.export_only and not args.resume:
        # without a run to resume there is only the untrained student of step 0
        raise ConfigError("--export-only exports a run's newest checkpoint: give the run folder with --resume DIR")
    if args.export_only and not list_checkpoints(args.resume):
        raise ConfigError(f"--export-only: no checkpoint in {args.resume} to export (train the run first)")
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite starts a new run, --resume continues one: give one of them")
    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise ConfigError(f"--resume {args.resume} continues the run in that folder; --out {args.out} would write "
                          "it elsewhere: leave --out out")
    if args.resume:
        run = Path(args.resume)
        if not (run / CONFIG).is_file():
            raise ConfigError(f"--resume {run}: not a run folder (no {CONFIG}); start a run there with --out {run}")
        if not complete_checkpoints(run):
            found = ", ".join(p.name for p in list_checkpoints(run))
            raise ConfigError(f"--resume {run}: no complete checkpoint in {run / 'checkpoints'} to continue from"
                              f"{f' ({found}: partial)' if found else ''}; start it again with --out {run} "
                              "--overwrite")
        if _first_process():
            clean_partials(run)
    elif not args.dry_run and not args.overwrite and run_entries(cfg.out):
        raise ConfigError(f"--out {cfg.out} already holds a run ({', '.join(run_entries(cfg.out))}): continue it with "
                          f"--resume {cfg.out}, or replace it with --overwrite (removes that run's files)")
    if not (Path(cfg.out).exists() and not Path(cfg.out).is_dir()):  # an existing file: check_out_folder says so
        check_writable(cfg.out, "--resume" if args.resume else "--out")
    check_out_folder(cfg.out)
    if cfg.lora_rank > 0:
        require("distill", "peft", what="dit-sparse distill with lora_rank > 0")
    require_executor_extra(cfg.executor)


# generate's loaders name generate's options; the same values come from these distill options
_GENERATE_OPTIONS = {"--model": "--teacher", "--plans": "--plan"}


def in_distill_terms(message: str) -> str:
    """An error message with a leading generate option renamed to the distill option the user typed."""
    for theirs, ours in _GENERATE_OPTIONS.items():
        if message.startswith(theirs):
            return ours + message[len(theirs):]
    return message


def run_distill(args) -> int:
    # configs and run folders are YAML; peft only for LoRA (check_arguments). MissingExtra reaches main.
    require("distill", "yaml", what="dit-sparse distill")
    from dit_sparse.checks import ArgumentError

    from .config import ConfigError
    from .runfolder import RunFolderError

    try:
        cfg = build_config(args)
        check_arguments(args, cfg)
        if args.overwrite and not args.dry_run:
            _start_over(cfg.out)
    except (ConfigError, ArgumentError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dit_sparse.plan import PlanError
    from dit_sparse.processor import PlanMismatchError

    from .pipelines import PipelineKindError
    from .roles import RoleError
    from .trainer import Distiller

    try:
        distiller = Distiller(cfg, resume=bool(args.resume), progress=not args.quiet)
    except (ArgumentError, PlanError, PlanMismatchError, PipelineKindError, RoleError, ConfigError,
            FileNotFoundError, ValueError, RunFolderError) as e:
        print(f"error: {in_distill_terms(str(e))}", file=sys.stderr)
        return 2
    try:
        return _work(args, cfg, distiller)
    except RunFolderError as e:  # a failed write (a full disk): one line naming the file, nothing partial left
        print(f"error: {e}", file=sys.stderr)
        return 2


def _first_process() -> bool:
    """Before accelerate starts: whether this is the first of the processes a launcher started (or the only one)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _start_over(out: str) -> None:
    """--overwrite: remove the previous run's files (by the first process only; the others find them gone)."""
    import logging

    from .runfolder import start_over

    if _first_process():
        removed = start_over(out)
        if removed:
            logging.getLogger(__name__).warning("--overwrite: removed the previous run's %s from %s",
                                                ", ".join(removed), out)


def _work(args, cfg, distiller) -> int:
    if args.dry_run:
        report = distiller.dry_run()
        if distiller.accelerator.is_main_process:
            print(format_dry_run(report))
    elif args.export_only:
        path = distiller.export()
        if distiller.accelerator.is_main_process:
            print(f"exported the student of step {distiller.state.step} to {path}")
    else:
        result = distiller.train()
        if distiller.accelerator.is_main_process:
            print(json.dumps({k: v for k, v in result.items() if k != "last"}, indent=1, default=str))
            if "export" in result:
                print(f"run it: dit-sparse generate --model {result['export']} --steps {cfg.student_steps} "
                      f"--guidance 1 --plan {result['export']}/plan.json")
    return 0


def format_dry_run(r: dict) -> str:
    lines = [
        f"device {r['device']} x {r['processes']} process(es), mixed precision {r['mixed_precision']}",
        f"sample {r['sample_shape']}, batch {r['batch_per_process']} x accumulation {r['grad_accum']}, "
        f"K={r['student_steps']} sigmas {r['sigmas']}",
        "memory (per process):",
        f"  teacher {r['params_teacher_GB']:.3f} GB, student {r['params_student_GB']:.3f} GB, "
        f"fake score {r['params_fake_GB']:.3f} GB",
        f"  trainable: student {r['trainable_student']:,} fake {r['trainable_fake']:,} parameters; grads + Adam + EMA "
        f"{r['grads_optimizer_ema_GB']:.3f} GB",
        f"  static total {r['static_total_GB']:.3f} GB; measured peak of one update {r['measured_peak_GB']:.3f} GB "
        f"({r['measured_peak_kind']})",
        f"time: {r['seconds_per_step']:.2f} s per step (measured) x {r['max_steps']} steps = "
        f"{r['estimated_hours'] * 60:.1f} min (without validation and checkpoints)",
        f"forwards per step: {', '.join(f'{k} {v:g}' for k, v in r['forwards_per_step'].items())}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser(prog="dit-sparse distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run_distill(args)
    except MissingExtra as e:  # as dit_sparse.cli.main does
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
