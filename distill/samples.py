"""Validation videos of a distillation run: the dense teacher's once, the student's at checkpoints and at the end.

    OUT/validation/teacher_p<prompt>_s<seed>.mp4, teacher.json
    OUT/validation/step-<step>/student_p<prompt>_s<seed>.mp4, student.jsonl (one line per validation)

Each video is generated from the cached prompt embeddings (no text encoder) at fixed seeds, and checked by the
pipeline kind's task check where it has one (tiny-shapes: does the clip show its caption).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dit_sparse.atomic import write_json

from .runfolder import writing

TEACHER_INFO = "teacher.json"
STUDENT_LOG = "student.jsonl"


@dataclass
class Samples:
    """What a validation video is made from: the teacher pipeline's class and its components other than the text
    encoder, transformer and scheduler, the video size, and the validation prompts with their embeddings."""

    pipeline_class: type
    components: dict
    size: tuple[int, int, int]  # frames, height, width
    prompts: list[str]
    embeds: torch.Tensor  # (N, L, D), one per prompt
    negative: torch.Tensor | None  # (1, L, D)
    seeds: list[int]
    check: Callable | None  # (frames, prompt) -> bool, the kind's task check

    def pipeline(self, transformer, scheduler):
        """A pipeline around `transformer` and `scheduler` (without its text encoder where it takes one)."""
        takes_encoder = "text_encoder" in inspect.signature(self.pipeline_class.__init__).parameters
        return self.pipeline_class(**self.components, transformer=transformer, scheduler=scheduler,
                                   **({"text_encoder": None} if takes_encoder else {}))

    def generate(self, pipe, steps: int, guidance: float) -> list[np.ndarray]:
        """Videos (T, H, W, 3) in [0, 1], prompt-major: every seed of prompt 0, then of prompt 1, ..."""
        f, h, w = self.size
        pipe.set_progress_bar_config(disable=True)
        videos = []
        for emb in self.embeds:
            gens = [torch.Generator().manual_seed(s) for s in self.seeds]
            n = len(gens)
            kwargs = {"negative_prompt_embeds": self.negative.expand(n, -1, -1)} if guidance > 1 else {}
            out = pipe(prompt_embeds=emb[None].expand(n, -1, -1), num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens, height=h, width=w, num_frames=f, output_type="np", **kwargs)
            videos.extend(np.asarray(v) for v in out.frames)
        return videos

    def write(self, folder: Path, name: str, videos: list[np.ndarray]) -> list[bool | None]:
        """Write the videos of ``generate`` as FOLDER/<name>_p<prompt>_s<seed>.mp4; returns each one's check."""
        from dit_sparse.video import write_video

        folder.mkdir(parents=True, exist_ok=True)
        checks = []
        seeds = self.seeds
        for i, video in enumerate(videos):
            prompt = self.prompts[i // len(seeds)]
            path = folder / f"{name}_p{i // len(seeds)}_s{seeds[i % len(seeds)]}.mp4"
            with writing(path, partial=path):
                write_video(path, video)
            checks.append(self.check(video, prompt) if self.check else None)
        return checks

    def write_teacher(self, folder: Path, teacher, scheduler, steps: int, guidance: float) -> None:
        """The dense teacher's reference videos and FOLDER/teacher.json (steps, checks)."""
        checks = self.write(folder, "teacher", self.generate(self.pipeline(teacher, scheduler), steps, guidance))
        with writing(folder / TEACHER_INFO):
            write_json(folder / TEACHER_INFO, {"steps": steps, "checks": checks})

    def write_student(self, folder: Path, student, scheduler, steps: int, step: int) -> dict:
        """The student's videos (CFG 1) in FOLDER/step-<step>/, and their record appended to FOLDER/student.jsonl."""
        videos = self.generate(self.pipeline(student, scheduler), steps, 1.0)
        checks = self.write(folder / f"step-{step}", "student", videos)
        result = {"step": step, "validation_checks": checks}
        if checks and checks[0] is not None:
            result["validation_caption_accuracy"] = float(np.mean(checks))
        with writing(folder / STUDENT_LOG), open(folder / STUDENT_LOG, "a") as f:
            f.write(json.dumps(result) + "\n")
        return result
