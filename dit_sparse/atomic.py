"""Atomic file writes: a crash or an error never leaves a half-written file (or folder: ``replace_folder``) behind.

A failed write raises :class:`WriteError` (an OSError) whose message names the file and says why in words ("could not
write out/report.json: no space left on device"); :func:`check_writable_folder` finds an unwritable output folder
before any work."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class WriteError(OSError):
    """A file could not be written: str() is one line naming the file and the reason."""

    def __init__(self, path: str | os.PathLike, cause: BaseException, action: str = "write"):
        code = cause.errno if isinstance(cause, OSError) else None
        super().__init__(code, reason_of(cause), str(path))
        self.action = action

    def __str__(self) -> str:
        return f"could not {self.action} {self.filename}: {self.strerror}"


def reason_of(error: BaseException) -> str:
    """An OSError's reason in words, lower case ("no space left on device", "read-only file system")."""
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno).lower()
    if isinstance(error, OSError) and error.strerror:
        return str(error.strerror)
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False):
    """Yield a temporary path beside `path`; on success it replaces `path` (with the permissions a plain new file
    gets, not mkstemp's private 0600), on error it is removed. An OSError while writing becomes a WriteError naming
    `path`. keep_suffix: the temporary name ends like `path` (.mp4, .png), for writers that pick a format by it."""
    path = Path(path)
    suffix = f".tmp{path.suffix}" if keep_suffix else ".tmp"
    stem = path.stem if keep_suffix else path.name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}.", suffix=suffix)
        os.close(fd)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except WriteError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, finite: bool = False) -> Path:
    """`data` as indented JSON. finite: a strict-JSON result file: no NaN or Infinity, which strict parsers reject
    (the writer replaces those whose meaning it owns, e.g. an exact PSNR, by null with a reason first; any other is
    written as null, with a warning naming its key)."""
    if finite:
        data = finite_json(data, str(path))
    return write_text(path, json.dumps(data, indent=1, allow_nan=not finite) + "\n")


def finite_json(data: Any, where: str = "data") -> Any:
    """A copy of `data` with every NaN or infinite float replaced by None (a warning names each)."""
    if isinstance(data, float) and not math.isfinite(data):
        logger.warning("%s: %s is not a JSON number; written as null", where, data)
        return None
    if isinstance(data, dict):
        return {k: finite_json(v, f"{where}:{k}") for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v, f"{where}[{i}]") for i, v in enumerate(data)]
    return data


def replace_folder(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Put the finished folder `src` in the place of `dst` by renaming it, so that `dst` is never a half-written
    folder (a checkpoint, an exported pipeline). The files of `src` are flushed to disk first; an existing `dst` is
    moved aside (.old-<name>, moved back if the rename fails) and removed once `src` is in place. An OSError becomes
    a WriteError naming `dst`; `src` is then left for the caller to remove."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".old-{dst.name}")
    try:
        _fsync_tree(src)
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        try:
            os.replace(src, dst)
        except OSError:
            if old.exists() and not dst.exists():
                os.replace(old, dst)
            raise
        _fsync_dir(dst.parent)
    except OSError as e:
        raise WriteError(dst, e) from e
    shutil.rmtree(old, ignore_errors=True)
    return dst


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it); best effort: some file systems cannot open or flush folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_folder(folder: str | os.PathLike, option: str = "--out") -> Path:
    """Before any work: create `folder` if needed and write and remove a probe file in it, so that a read-only,
    full or misnamed output folder is found before a model loads, not when the results are written. The folders
    this creates are removed again (the writers create them when they write; a later refusal leaves no empty
    folder). Raises WriteError ("could not write to --out FOLDER: read-only file system")."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(folder, NotADirectoryError(errno.ENOTDIR, "is an existing file"),
                         action=f"write to {option}")
    made, p = [], folder
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        for d in reversed(made):
            d.mkdir()
        _probe(folder)
    except OSError as e:
        raise WriteError(folder, e, action=f"write to {option}") from e
    finally:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
    return folder


def _probe(folder: Path) -> None:
    """Write a small file in `folder` and remove it (tests replace this to simulate a read-only or full disk)."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        Path(name).unlink(missing_ok=True)
