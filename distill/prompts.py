"""The prompts of a distillation run and their text embeddings, encoded once and cached in OUT/prompt_embeds.pt
(the text encoder is dropped afterwards: training memory does not hold it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dit_sparse.atomic import atomic_path

from .runfolder import writing

EMBEDS = "prompt_embeds.pt"
ENCODE_CHUNK = 16  # prompts per encoder call


def training_prompts(prompts_file: str | None, kind) -> list[str]:
    """The lines of `prompts_file`, or the pipeline kind's own training prompts."""
    if prompts_file:
        lines = [ln.strip() for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"prompts: {prompts_file} has no prompts")
        return lines
    if kind.training_prompts is None:
        raise ValueError(f"prompts: {kind.name} has no default prompts; give a file with one per line")
    return kind.training_prompts()


def encode(pipe, prompts: list[str], negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D) embeddings of `prompts` and the (1, L, D) one of `negative_prompt`, float32 on the CPU."""
    out, neg = [], None
    for i in range(0, len(prompts), ENCODE_CHUNK):
        chunk = prompts[i:i + ENCODE_CHUNK]
        pe, ne = pipe.encode_prompt(prompt=chunk, negative_prompt=[negative_prompt] * len(chunk),
                                    do_classifier_free_guidance=True, device=torch.device("cpu"))
        out.append(pe.float().cpu())
        neg = ne[:1].float().cpu()
    return torch.cat(out), neg


def cached_embeddings(acc, path: Path, pipe, prompts: list[str],
                      negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode`` by the main process into `path` unless it is there already; every process reads it back. A cache
    of other prompts is refused (ValueError naming the file)."""
    if acc.is_main_process and not path.is_file():
        with torch.no_grad():
            emb, neg = encode(pipe, prompts, negative_prompt)
        _save(path, {"prompts": prompts, "embeds": emb, "negative": neg, "negative_prompt": negative_prompt})
    acc.wait_for_everyone()
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data["prompts"] != prompts or data["negative_prompt"] != negative_prompt:
        raise ValueError(f"{path} holds embeddings of other prompts; remove it or use another --out")
    return data["embeds"], data["negative"]


def _save(path: Path, obj: Any) -> None:
    # a file object, not a path: torch.save's RuntimeError then carries the OSError (errno) of the failed write
    with atomic_path(path) as tmp, writing(path), open(tmp, "wb") as f:
        torch.save(obj, f)
