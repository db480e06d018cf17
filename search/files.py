"""The files of a search: the prompts it reads, and where the plan, its report and the statistics go."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .errors import SearchError


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are ignored."""
    from dit_sparse.inputs import InputFileError, read_text_file

    path = Path(path)
    try:  # a binary file, a device or a FIFO is one line naming it, not a UnicodeDecodeError or a hang
        text = read_text_file(path, "`prompts`", "a text file with one prompt per line")
    except InputFileError as e:
        raise SearchError(str(e)) from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SearchError(f"`prompts`: {path} has no prompt (give one prompt per line)")
    return prompts


def prompt_list(prompts: Sequence[str] | str | Path | None) -> list[str] | None:
    """The prompts of a configuration: read from the file it names, or as given (None: the model's own)."""
    if isinstance(prompts, (str, Path)):
        return read_prompts(prompts)
    return None if prompts is None else list(prompts)


def output_paths(out: str | Path | None, model: str) -> dict[str, Path]:
    """The plan at `out` (default out/search/<model>.plan.json) and, beside it, the report, its PNG and the
    statistics."""
    if out is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name or model)
        out = Path("out/search") / f"{name}.plan.json"
    out = Path(out)
    stem = out.name[: -len(".plan.json")] if out.name.endswith(".plan.json") else out.stem
    return {"plan": out, "report": out.with_name(f"{stem}.report.md"), "png": out.with_name(f"{stem}.report.png"),
            "stats": out.with_name(f"{stem}.stats.json")}


def check_out_folder(plan_path: Path) -> None:
    """Before any work: the plan's folder (where the report and statistics go too) can be created and written in."""
    from dit_sparse.atomic import WriteError, check_writable_folder

    try:
        check_writable_folder(Path(plan_path).parent, option="the folder of `out`")
    except WriteError as e:
        raise SearchError(f"{e} (checked before any work; give a writable `out`)") from None
