"""Checkpoints of a distillation run: OUT/checkpoints/checkpoint-<step>/, written whole or not at all, and the
resume that picks the newest one that loads.

A checkpoint is written into a temporary folder by every process (accelerate's save_state: parameters, optimizers,
schedulers, the EMA and counters registered with it, RNG states), finished by a marker file (complete.json: the size
of every file) and renamed into place; the newest ``keep`` are kept. A resume first removes the partial files a crash
left, falls back from a damaged newest checkpoint to the newest complete one, and trims metrics.jsonl (later steps,
a torn last line). A failed write (a full disk) ends with one line naming the checkpoint (runfolder.writing).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from dit_sparse.atomic import replace_folder, write_json

from .runfolder import (
    CHECKPOINTS,
    METRICS,
    RunFolderError,
    checkpoint_folders,
    clean_partials,
    read_metrics,
    trim_metrics,
    writing,
)
from .train_state import TrainState

logger = logging.getLogger(__name__)

COMPLETE = "complete.json"  # written last into a checkpoint: the relative path and size of each of its files
TRAINER_STATE = "trainer_state.json"  # the counters, readable without torch (the last file written before COMPLETE)


def list_checkpoints(out: str | Path) -> list[Path]:
    """The checkpoint-<step> folders of a run, oldest first (a folder only gets its name once fully written; it may
    have been damaged since: ``checkpoint_problem``, ``complete_checkpoints``)."""
    return checkpoint_folders(out)


def checkpoint_problem(path: str | Path) -> str | None:
    """None when checkpoint folder `path` is complete as far as the files show (its complete.json lists each file
    with its size; folders written before complete.json existed count when their trainer_state.json, the last file
    written then, is there); otherwise what is wrong, in a few words. Loading can still fail (damaged contents)."""
    path = Path(path)
    marker = path / COMPLETE
    if not marker.is_file():
        return None if (path / TRAINER_STATE).is_file() else f"no {COMPLETE} (written last): partial"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE} is not readable"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    return None


def complete_checkpoints(out: str | Path) -> list[Path]:
    """The checkpoints of a run that ``checkpoint_problem`` finds complete, oldest first."""
    return [p for p in list_checkpoints(out) if checkpoint_problem(p) is None]


def save_checkpoint(acc, out: Path, state: TrainState, keep: int) -> Path:
    """Write OUT/checkpoints/checkpoint-<step> (every process takes part); prune to the newest `keep`. A failed
    write (a full disk) removes the temporary folder and raises WriteFailed, whose line says which checkpoint a
    resume would continue from."""
    root = out / CHECKPOINTS
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}"
    intact = complete_checkpoints(out)
    hint = (f" (removed the partial checkpoint; {intact[-1].name} is intact: dit-sparse distill --resume "
            f"{out} continues from it)" if intact else " (removed the partial checkpoint)")
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    with writing(final, partial=tmp, hint=hint):
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json(tmp / TRAINER_STATE, state.state_dict())
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            write_json(tmp / COMPLETE, {"step": state.step, "files": files})
            replace_folder(tmp, final)
    if acc.is_main_process:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def resume_run(acc, out: Path, state: TrainState, checkpoint: str | Path | None = None) -> int:
    """Load `checkpoint`, or the newest complete checkpoint of the run in `out`; returns the step it continues from.

    First the partial files a crash left are removed (space on a full disk). A newest checkpoint that is partial or
    does not load is skipped with a warning, for the next older one; once one loads, the skipped ones are renamed
    damaged-checkpoint-<step>. metrics.jsonl loses the lines after the loaded step and a torn last line (warning
    naming the file); a line torn in its middle is a RunFolderError naming file and line."""
    if acc.is_main_process:
        clean_partials(out)
    acc.wait_for_everyone()
    read_metrics(out / METRICS)  # every process: a damaged log stops all of them before anything loads
    if checkpoint is not None:
        acc.load_state(str(checkpoint))
    else:
        found = list_checkpoints(out)
        if not found:
            logger.info("no checkpoint in %s: starting from step 0", out)
            return 0
        checkpoint = _load_newest_loadable(acc, out, state, found)
    if acc.is_main_process:
        trim_metrics(out / METRICS, state.step)
    acc.wait_for_everyone()
    logger.info("resumed from %s at step %d", checkpoint, state.step)
    return state.step


def _load_newest_loadable(acc, out: Path, state: TrainState, found: list[Path]) -> Path:
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(found):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            try:
                acc.load_state(str(ckpt))
            except Exception as e:  # damaged contents (SafetensorError, unpickling, zip) or not of this run
                problem = f"does not load: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
        if acc.num_processes > 1:  # all processes take the same checkpoint
            failed = acc.reduce(torch.tensor([float(problem is not None)], device=acc.device), reduction="sum")
            if problem is None and failed.item() > 0:
                problem = "does not load on another process"
        if problem is None:
            break
        logger.warning("resume: %s is damaged (%s); trying the previous checkpoint", ckpt, problem)
        skipped.append((ckpt, problem))
    else:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise RunFolderError(f"--resume {out}: no checkpoint in {out / CHECKPOINTS} loads ({reasons})")
    if skipped and acc.is_main_process:
        for bad, _ in skipped:
            aside = bad.with_name(f"damaged-{bad.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
        logger.warning("resume: continuing from %s (step %d) instead of the damaged %s (kept as %s)", ckpt.name,
                       state.step, ", ".join(p.name for p, _ in skipped),
                       ", ".join(f"damaged-{p.name}" for p, _ in skipped))
    return ckpt
