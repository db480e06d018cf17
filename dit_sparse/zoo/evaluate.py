"""Caption accuracy of tiny-shapes on the 50 held-out prompts, and the checker's accuracy on ground truth.

    python -m dit_sparse.zoo.evaluate [--model DIR] [--steps 20] [--guidance 4.5] [--out results.json]

Each held-out prompt ``i`` (attribute combinations never used in training, see ``shapes_data``) is generated
once with seed ``seed + i`` at the default size (8 frames, 32x32) and checked with :mod:`.checker`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from .checker import check_clip, checker_accuracy
from .cli_types import float_pair
from .conditioning import attribute_sensitivity, word_choice_accuracy
from .pipeline import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    WEIGHTS_DIR,
    check_guidance_interval,
    load_tiny_shapes,
    weights_id,
)
from .shapes_data import MOTIONS, TRAIN_COMBOS, heldout_eval_set, parse_caption

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "eval.json"


def generate_and_check(pipe, pairs, steps, guidance, batch_size=5, keep_frames=False, guidance_interval=None):
    rows, frames = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        out = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="np", guidance_interval=guidance_interval).frames
        for (p, s), f in zip(chunk, out):
            r = check_clip(f, p)
            rows.append({"prompt": p, "seed": s, "ok": r.ok, "found": r.found, "matches": r.matches})
            if keep_frames:
                frames.append(f)
    return rows, frames


def summarize(rows):
    n = len(rows)
    keys = ("colour", "shape", "motion", "background")
    return {"n": n, "caption_accuracy": sum(r["ok"] for r in rows) / max(n, 1),
            "per_attribute": {k: sum(r["matches"][k] for r in rows) / max(n, 1) for k in keys},
            **shape_breakdown(rows)}


def shape_breakdown(rows) -> dict:
    """Where shape fails: asked -> found counts, and how often a square or triangle comes out right per motion
    (a round blob passes as a circle, so circles would hide the pattern)."""
    confusion: dict[str, int] = {}
    right, asked = dict.fromkeys(MOTIONS, 0), dict.fromkeys(MOTIONS, 0)
    for r in rows:
        want = parse_caption(r["prompt"])
        pair = f"{want.shape}->{r['found']['shape']}"
        confusion[pair] = confusion.get(pair, 0) + 1
        if want.shape != "circle":
            asked[want.motion] += 1
            right[want.motion] += r["matches"]["shape"]
    return {"shape_confusion_asked_to_found": dict(sorted(confusion.items())),
            "non_circle_shape_right_by_motion": {m: f"{right[m]}/{asked[m]}" for m in MOTIONS if asked[m]}}


def save_grid(frames, prompts, path):
    from PIL import Image

    rows = [np.concatenate(list(f), axis=1) for f in frames]
    img = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(path)


def parse_interval(text: str) -> tuple[float, float]:
    lo, hi = float_pair(text, "0.3,0.9")
    try:
        check_guidance_interval((lo, hi))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return lo, hi


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(WEIGHTS_DIR))
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--guidance-interval", type=parse_interval, default=None, metavar="LO,HI",
                    help="guide only at noise levels sigma in [LO, HI] (see TinyShapesPipeline.__call__)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seen-prompts", type=int, default=0,
                    help="also evaluate this many training combinations (new seeds), as a diagnostic")
    ap.add_argument("--checker-clips", type=int, default=300,
                    help="ground-truth clips for the checker's own accuracy; 0 skips it (quick looks at a model)")
    ap.add_argument("--heldout-prompts", type=int, default=50,
                    help="evaluate only the first N of the 50 held-out prompts (quick looks; the figure is on 50)")
    ap.add_argument("--word-choice-clips", type=int, default=10,
                    help="clips for the word-choice (diffusion classifier) check, see conditioning.py; 0 skips it")
    ap.add_argument("--grid", default=None, help="write a PNG of the first 10 held-out clips here")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    result = {"model": a.model, "weights_id": weights_id(a.model),
              "steps": a.steps, "guidance_scale": a.guidance, "guidance_interval": a.guidance_interval,
              "seed": a.seed,
              "size": "8 frames x 32x32", "heldout": "50 attribute combinations never seen in training"}
    t0 = time.time()
    if a.checker_clips:
        ck = checker_accuracy(a.checker_clips)
        ck_blur = checker_accuracy(a.checker_clips, blur_sigma=1.0, noise_std=0.05)
        result["checker_ground_truth"] = {k: ck[k] for k in ("n", "accuracy", "per_attribute")}
        result["checker_blurred_ground_truth"] = {k: ck_blur[k] for k in ("n", "accuracy", "per_attribute",
                                                                         "blur_sigma", "noise_std")}
        print(f"checker on ground truth: {ck['accuracy']:.3f} (blurred+noisy: {ck_blur['accuracy']:.3f})",
              flush=True)

    pipe = load_tiny_shapes(path=a.model)
    pipe.set_progress_bar_config(disable=True)
    t1 = time.time()
    rows, frames = generate_and_check(pipe, heldout_eval_set(a.seed)[:a.heldout_prompts], a.steps, a.guidance,
                                      keep_frames=bool(a.grid), guidance_interval=a.guidance_interval)
    result["heldout"] = summarize(rows)
    result["heldout"]["seconds_per_clip"] = round((time.time() - t1) / len(rows), 2)
    result["heldout_rows"] = rows
    print(f"held-out caption accuracy: {result['heldout']['caption_accuracy']:.3f} "
          f"{result['heldout']['per_attribute']}", flush=True)
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        save_grid(frames[:10], None, a.grid)
    if a.seen_prompts:
        rng = random.Random(a.seed + 99)
        seen = [(rng.choice(TRAIN_COMBOS).caption, 10_000 + a.seed + i) for i in range(a.seen_prompts)]
        srows, _ = generate_and_check(pipe, seen, a.steps, a.guidance, guidance_interval=a.guidance_interval)
        result["seen_combinations"] = summarize(srows)
        print(f"seen-combination caption accuracy: {result['seen_combinations']['caption_accuracy']:.3f}",
              flush=True)
    # which caption attributes the transformer responds to at all (see conditioning.py)
    result["attribute_sensitivity"] = attribute_sensitivity(pipe)
    print(f"attribute sensitivity: {result['attribute_sensitivity']}", flush=True)
    if a.word_choice_clips:
        result["word_choice"] = word_choice_accuracy(pipe, num_clips=a.word_choice_clips)
        print(f"word choice: {result['word_choice']}", flush=True)
    result["wall_seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
