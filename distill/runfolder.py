"""The run folder (--out): what makes one, starting over in one, whether it can be written, the partial files a
crash leaves, a torn metrics log, and write failures (a full disk) as one line.

    OUT/config.yaml  metrics.jsonl  prompt_embeds.pt  checkpoints/checkpoint-<step>/  validation/  export/

Every problem here is a ``RunFolderError``: one line that names the file, which the CLI prints as ``error: ...``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
# what a run writes into its folder (``start_over`` removes these and nothing else)
RUN_ENTRIES = (CONFIG, METRICS, CHECKPOINTS, "validation", "export", "tensorboard", "prompt_embeds.pt", ".tmp-export",
               ".old-export")
# a folder holds a run when one of these is there (checkpoints: a checkpoint-<step> in it; prompt_embeds.pt alone
# is a dry run's cache, not a run)
_RUN_MARKS = (CONFIG, METRICS, CHECKPOINTS, "validation", "export")
# below this many free bytes after a failed write, the disk counts as full (torch.save names no errno)
FULL_DISK_BYTES = 1 << 20


class RunFolderError(Exception):
    """A run folder that cannot be used or written as asked: one line naming the file or folder."""


class WriteFailed(RunFolderError):
    """Writing a file of the run failed (a full disk, a read-only folder); nothing partial was left behind."""


# -- what is in a folder ----------------------------------------------------------------------------------------
def checkpoint_folders(out: str | Path) -> list[Path]:
    """OUT/checkpoints/checkpoint-<step> folders, oldest first (whether complete or not)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name[len("checkpoint-"):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len("checkpoint-"):]))


def run_entries(out: str | Path) -> list[str]:
    """The names in `out` that show it holds a run ([] for a new, empty or dry-run-only folder)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return [name for name in _RUN_MARKS if (checkpoint_folders(out) if name == CHECKPOINTS else (out / name).exists())]


def start_over(out: str | Path) -> list[str]:
    """Remove the previous run's files from `out` (RUN_ENTRIES; other files stay); returns the names removed."""
    out = Path(out)
    removed = []
    for name in RUN_ENTRIES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _partial_file(name: str) -> bool:
    """A temporary file of an atomic write of a run file (.<name>.tmp, .<name>.<random>.tmp) or a write probe."""
    return name.endswith(".tmp") and name.startswith(tuple(f".{entry}." for entry in RUN_ENTRIES) + (".write-",))


def clean_partials(out: str | Path) -> list[Path]:
    """Remove what a crash mid-write leaves in run folder `out`: checkpoints/.tmp-* folders (and .old-* ones, a
    checkpoint being replaced), .tmp-export, the temporary files of atomic writes of its files and write probes.
    Returns what was removed."""
    out = Path(out)
    removed = []
    candidates = []
    if (out / CHECKPOINTS).is_dir():
        candidates += [p for p in (out / CHECKPOINTS).iterdir() if p.name.startswith((".tmp-", ".old-"))]
    if out.is_dir():
        candidates += [p for p in out.iterdir()
                       if p.name == ".tmp-export" or (_partial_file(p.name) and not p.is_dir())]
    for p in candidates:
        _remove(p)
        if not p.exists():
            removed.append(p)
    if removed:
        logger.warning("removed partial files a crash left in %s: %s", out, ", ".join(p.name for p in removed))
    return removed


# -- can it be written ------------------------------------------------------------------------------------------
def check_writable(folder: str | Path, option: str = "--out") -> None:
    """Before any work: a small file (4 KiB) can be written in `folder`, so that a read-only or full disk is found
    before a model loads. Folders this creates are removed again. Raises RunFolderError naming the option and the
    folder: ``could not write to --out FOLDER: read-only file system (checked before any work; ...)``."""
    from dit_sparse.atomic import WriteError, check_writable_folder

    try:
        check_writable_folder(folder, option)
    except WriteError as e:
        need = "a resumed run writes into its folder" if option == "--resume" else f"give a writable {option}"
        raise RunFolderError(f"could not write to {option} {folder}: {e.strerror} (checked before any work; {need})") \
            from None


def _no_space(exc: BaseException, path: Path) -> bool:
    """Whether a failed write failed for want of space: ENOSPC anywhere in the exception chain (safetensors and
    plain writes say so), or else (torch.save raises a RuntimeError that names no errno) less than FULL_DISK_BYTES
    free on that disk right after the failure, before the partial file is removed."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "os error 28" in str(e):
            return True
        e = e.__cause__ or e.__context__
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < FULL_DISK_BYTES
    except OSError:
        return False


def write_failure(path: str | Path, exc: BaseException) -> str:
    """The one line for a failed write of `path`."""
    path = Path(path)
    if _no_space(exc, path):
        return f"no space left on device while writing {path}"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).strip().splitlines() or
                                                                            [type(exc).__name__])[0]
    return f"could not write {path}: {reason}"


def _write_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError, RuntimeError]  # torch.save: RuntimeError from its failing stream
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    return tuple(kinds)


@contextlib.contextmanager
def writing(path: str | Path, partial: str | Path | None = None, hint: str = ""):
    """Around the writes of `path`: a failure (OSError, torch's RuntimeError, SafetensorError) becomes WriteFailed
    with one line (``no space left on device while writing PATH`` or ``could not write PATH: REASON``); `partial`
    (a temporary file or folder) is removed on any error, after the free space was looked at."""
    try:
        yield
    except BaseException as e:
        message = write_failure(path, e) if isinstance(e, _write_errors()) else None
        if partial is not None:
            _remove(Path(partial))
        if message is None:
            raise
        raise WriteFailed(message + hint) from e


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


# -- the metrics log --------------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> tuple[list[dict], bool]:
    """The records of metrics.jsonl and whether its last line is torn (what a full disk or a crash mid-write leaves:
    dropped by ``trim_metrics``). A line that does not parse anywhere else is a RunFolderError naming file and line."""
    path = Path(path)
    if not path.is_file():
        return [], False
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records, torn = [], False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) and not text.endswith("\n"):
                torn = True
                break
            raise RunFolderError(f"{path} line {i} is not a metrics record ({e}); fix or delete that line, then "
                                 "resume again") from None
        records.append(rec)
    return records, torn


def trim_metrics(path: str | Path, step: int) -> None:
    """Keep the log lines of steps <= `step` (later ones belong to steps the resumed run repeats) and drop a torn
    last line, with a warning naming the file; rewritten atomically, only when something changes."""
    from dit_sparse.atomic import write_text

    path = Path(path)
    records, torn = read_metrics(path)
    if torn:
        logger.warning("%s: dropped its torn last line (a write cut short, e.g. by a full disk)", path)
    keep = [r for r in records if r.get("step", 0) <= step]
    if torn or len(keep) != len(records) or (path.is_file() and not path.read_text().endswith("\n") and keep):
        with writing(path):
            write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
