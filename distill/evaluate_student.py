"""Judge a distilled tiny-shapes student: caption accuracy on the held-out prompts and wall time per clip.

    python -m dit_sparse.distill.evaluate_student --student runs/ts4/export [--num-prompts 50] [--out FILE.json]

Rows (same prompts and seeds for all; one clip per held-out prompt, seed = index):

- student: the exported K-step student with its sparse plan, guidance 1 (how it was trained to be sampled);
- teacher 50 steps: the dense teacher, its own scheduler, CFG (the reference);
- teacher K steps: the dense teacher at the student's step count, its own scheduler, CFG;
- teacher K steps (student grid): the same on the student's sigma grid (the fairer few-step baseline);
- student dense: the student without its plan (separates the effect of sparsity from that of distillation).

Wall time is measured per row over all its clips (batches of ``--batch-size``), on this machine's CPU threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from dit_sparse.atomic import write_json, write_text
from dit_sparse.models import load_model
from dit_sparse.provenance import hardware, versions
from dit_sparse.zoo.evaluate import generate_and_check, summarize
from dit_sparse.zoo.pipeline import DEFAULT_GUIDANCE, weights_id
from dit_sparse.zoo.shapes_data import heldout_eval_set

from .export import EXPORT_INFO, load_student
from .sigmas import make_scheduler

logger = logging.getLogger(__name__)


def timed_rows(pipe, pairs, steps, guidance, batch_size):
    start = time.perf_counter()
    rows, _ = generate_and_check(pipe, pairs, steps, guidance, batch_size=batch_size)
    seconds = time.perf_counter() - start
    summary = summarize(rows)
    summary.update({"steps": steps, "guidance": guidance, "seconds_total": round(seconds, 2),
                    "seconds_per_clip": round(seconds / len(rows), 4)})
    return summary, rows


def evaluate(student: str, teacher: str = "tiny-shapes", num_prompts: int = 50, seed: int = 0,
             teacher_steps: int = 50, guidance: float = DEFAULT_GUIDANCE, batch_size: int = 5,
             rows: tuple[str, ...] = ("student", "teacher_50", "teacher_k", "teacher_k_grid", "student_dense"),
             ) -> dict:
    info = json.loads((Path(student) / EXPORT_INFO).read_text())
    k = info["student_steps"]
    pairs = heldout_eval_set(seed)[:num_prompts]
    result = {"benchmark": "distilled student vs teacher", "student": str(student), "teacher": teacher,
              "teacher_weights": weights_id() if teacher == "tiny-shapes" else None, "student_steps": k,
              "num_prompts": len(pairs),
              "seed": seed, "teacher_guidance": guidance, "distill": info, "rows": {},
              "hardware": hardware("cpu"), "versions": versions()}
    details = {}

    def run(name, pipe, steps, g):
        pipe.set_progress_bar_config(disable=True)
        summary, per_clip = timed_rows(pipe, pairs, steps, g, batch_size)
        result["rows"][name] = summary
        details[name] = per_clip
        logger.info("%-22s steps %3d  guidance %-4s  caption accuracy %.3f  %.3f s/clip", name, steps, g,
                    summary["caption_accuracy"], summary["seconds_per_clip"])

    if "student" in rows or "student_dense" in rows:
        pipe, _ = load_student(student)
        if "student" in rows:
            run("student", pipe, k, 1.0)
        if "student_dense" in rows:
            import dit_sparse

            dit_sparse.remove(pipe)
            run("student_dense", pipe, k, 1.0)
        del pipe
    teacher_pipe = load_model(teacher, "cpu", torch.float32)
    if "teacher_50" in rows:
        run("teacher_50", teacher_pipe, teacher_steps, guidance)
    if "teacher_k" in rows:
        run("teacher_k", teacher_pipe, k, guidance)
    if "teacher_k_grid" in rows:
        teacher_pipe.scheduler = make_scheduler(k, info["shift"], info["terminal_sigma"])
        run("teacher_k_grid", teacher_pipe, k, guidance)
    if "student" in result["rows"] and "teacher_50" in result["rows"]:
        s, t = result["rows"]["student"], result["rows"]["teacher_50"]
        result["student_vs_teacher_50"] = {
            "accuracy_points": round(100 * (s["caption_accuracy"] - t["caption_accuracy"]), 1),
            "wall_time_speedup": round(t["seconds_per_clip"] / s["seconds_per_clip"], 2),
            "target": "within 5 points of the 50-step teacher at >= 10x less wall time",
        }
        result["student_vs_teacher_50"]["meets_target"] = (
            result["student_vs_teacher_50"]["accuracy_points"] >= -5.0
            and result["student_vs_teacher_50"]["wall_time_speedup"] >= 10.0)
    result["per_clip"] = details
    return result


WEAK_TEACHER = 0.5  # below this caption accuracy of the teacher, "within 5 points" is close to meaningless


def markdown(result: dict) -> str:
    lines = ["| run | steps | guidance | caption accuracy | colour | shape | motion | background | s / clip |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        pa = r["per_attribute"]
        lines.append(f"| {name} | {r['steps']} | {r['guidance']} | {r['caption_accuracy']:.3f} | {pa['colour']:.2f} | "
                     f"{pa['shape']:.2f} | {pa['motion']:.2f} | {pa['background']:.2f} | {r['seconds_per_clip']:.3f} |")
    if "student_vs_teacher_50" in result:
        c = result["student_vs_teacher_50"]
        lines.append("")
        lines.append(f"student vs 50-step teacher: {c['accuracy_points']:+.1f} points, {c['wall_time_speedup']:.1f}x "
                     f"less wall time (target: {c['target']}; met: {c['meets_target']})")
        teacher = result["rows"]["teacher_50"]["caption_accuracy"]
        if teacher < WEAK_TEACHER:
            lines.append(f"caution: the 50-step teacher itself passes only {teacher:.0%} of the prompts, so the "
                         "accuracy half of this comparison says little until the teacher is better trained")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="the exported student (RUN/export)")
    ap.add_argument("--teacher", default="tiny-shapes")
    ap.add_argument("--num-prompts", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="the teacher's CFG")
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", nargs="+", default=["student", "teacher_50", "teacher_k", "teacher_k_grid",
                                                  "student_dense"])
    ap.add_argument("--out", default=None, help="JSON results (default: STUDENT/../eval_student.json), .md beside")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    result = evaluate(a.student, a.teacher, a.num_prompts, a.seed, a.teacher_steps, a.guidance, a.batch_size,
                      tuple(a.rows))
    out = Path(a.out) if a.out else Path(a.student).resolve().parent / "eval_student.json"
    write_json(out, result)
    table = markdown(result)
    write_text(out.with_suffix(".md"), table + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
