"""How much does the tiny-shapes transformer listen to each attribute of its caption?

For a few base captions, swap one attribute (colour, shape, motion or background) for another value of the
grammar and run the transformer on the *same* noisy clip with both captions; the sensitivity of that attribute at a
noise level is the relative L2 change of the predicted clean clip ``x0 = x_t - sigma * v``. An attribute whose
sensitivity stays near 0 at high noise, where layout, shape and motion are decided, is one the sampler cannot
follow, whatever the guidance scale (guidance scales a difference that is not there).

Caption accuracy moves in steps of 2 points on 50 prompts and takes minutes of sampling; this takes seconds and
says which attribute training has not yet tied to the caption.

Word choice (a diffusion classifier) asks the sharper question: for a real clip noised to sigma, does the caption
with the clip's true value of an attribute give a strictly lower denoising loss than every caption with another
value of it? The share of clips where it does is compared with chance (1 / number of values); a model that has not
tied a word to what it shows scores near chance or below, a model that ignores its caption scores 0.

    python -m dit_sparse.zoo.conditioning [--model DIR] [--word-choice]
    python -m dit_sparse.zoo.conditioning --checkpoint OUT/checkpoint.pt --word-choice   # a run while it trains

Word choice on 10 clips moves in steps of 10 points: a difference of one or two clips is noise (a 16-clip probe
once read 8 of 16 for a motion word that 48 clips put at chance), so use ``--clips 48`` before believing a change.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace

import torch

from .model import encode_text
from .shapes_data import BACKGROUNDS, COLOURS, DEFAULT_SIZE, MOTIONS, SHAPES, TRAIN_COMBOS, Attrs, render_clip

ATTRIBUTE_VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "motion": MOTIONS, "background": tuple(BACKGROUNDS)}
DEFAULT_SIGMAS = (0.95, 0.8, 0.6)


def _variants(base: Attrs, rng: random.Random) -> dict[str, Attrs]:
    return {name: replace(base, **{name: rng.choice([v for v in values if v != getattr(base, name)])})
            for name, values in ATTRIBUTE_VALUES.items()}


@torch.no_grad()
def attribute_sensitivity(pipe, sigmas=DEFAULT_SIGMAS, num_captions: int = 6, seed: int = 0,
                          size: int = DEFAULT_SIZE) -> dict:
    """{attribute: {sigma: mean relative change of the x0 prediction}} over ``num_captions`` base captions."""
    rng = random.Random(seed)
    bases = [TRAIN_COMBOS[rng.randrange(len(TRAIN_COMBOS))] for _ in range(num_captions)]
    names = list(ATTRIBUTE_VALUES)
    captions, clips = [], []
    for i, base in enumerate(bases):
        variants = _variants(base, rng)
        captions += [base.caption] + [variants[n].caption for n in names]
        clips.append(render_clip(base, seed * 1000 + i, size=size))
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    emb = encode_text(pipe.tokenizer, pipe.text_encoder, captions, device=device, dtype=dtype)
    x0 = torch.stack(clips).permute(0, 4, 1, 2, 3).to(device, dtype)  # (N, 3, T, H, W)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    group = 1 + len(names)
    result = {n: {} for n in names}
    for sigma in sigmas:
        xt = ((1 - sigma) * x0 + sigma * noise).repeat_interleave(group, dim=0)
        t = torch.full((xt.shape[0],), sigma * 1000.0, device=device, dtype=dtype)
        v = pipe.transformer(hidden_states=xt, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        pred = (xt - sigma * v).float().view(num_captions, group, -1)
        base_pred = pred[:, 0]
        change = (pred[:, 1:] - base_pred[:, None]).norm(dim=-1) / base_pred.norm(dim=-1, keepdim=True)
        for j, n in enumerate(names):
            result[n][str(sigma)] = round(float(change[:, j].mean()), 4)
    return result


@torch.no_grad()
def word_choice_accuracy(pipe, sigmas=(0.9, 0.7), num_clips: int = 10, draws: int = 2, seed: int = 0,
                         attributes=("colour", "shape", "motion"), size: int = DEFAULT_SIZE) -> dict:
    """{attribute: {sigma: share of clips whose true caption has the strictly lowest loss}, "chance": {...}}.

    Clips are training combinations; every candidate caption of a clip is scored on the same noisy inputs
    (``draws`` noise draws per clip, losses summed), so only the caption differs.
    """
    rng = random.Random(seed)
    bases = [TRAIN_COMBOS[rng.randrange(len(TRAIN_COMBOS))] for _ in range(num_clips)]
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    # Each clip and its noise draws once, shared by every attribute and noise level.
    clips = [render_clip(base, seed * 1000 + i, size=size).permute(3, 0, 1, 2)[None].to(device, dtype)
             for i, base in enumerate(bases)]
    noises = [[torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 1000 + i * draws + d))
               .to(device, dtype) for d in range(draws)] for i, x0 in enumerate(clips)]
    result: dict = {name: {} for name in attributes}
    result["chance"] = {name: round(1 / len(ATTRIBUTE_VALUES[name]), 4) for name in attributes}
    for name in attributes:
        values = ATTRIBUTE_VALUES[name]
        hits = {sigma: 0 for sigma in sigmas}
        for base, x0, draws_of_clip in zip(bases, clips, noises):
            captions = [replace(base, **{name: value}).caption for value in values]
            truth = values.index(getattr(base, name))
            emb = encode_text(pipe.tokenizer, pipe.text_encoder, captions, device=device, dtype=dtype)
            for sigma in sigmas:
                loss = torch.zeros(len(values), device=device)
                for noise in draws_of_clip:
                    xt = ((1 - sigma) * x0 + sigma * noise).expand(len(values), -1, -1, -1, -1)
                    t = torch.full((len(values),), sigma * 1000.0, device=device, dtype=dtype)
                    v = pipe.transformer(hidden_states=xt, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
                    loss += (v.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)
                others = torch.cat([loss[:truth], loss[truth + 1:]])
                hits[sigma] += int(bool((loss[truth] < others).all()))
        result[name] = {str(sigma): round(hits[sigma] / num_clips, 4) for sigma in sigmas}
    return result


def _sigmas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected noise levels like 0.98,0.9, got {text!r}") from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"noise levels must be in (0, 1], got {text!r}")
    return values


def main(argv=None):
    from .checkpoint import load_checkpoint
    from .pipeline import WEIGHTS_DIR, load_tiny_shapes, weights_id

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--model", default=str(WEIGHTS_DIR), help="a saved tiny-shapes pipeline")
    source.add_argument("--checkpoint", default=None,
                        help="a tools/train_tiny_shapes.py checkpoint (OUT/checkpoint.pt): measures its EMA weights")
    ap.add_argument("--size", type=int, default=None,
                    help="clip size in pixels (default: the checkpoint's training size, else 32)")
    ap.add_argument("--captions", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--word-choice", action="store_true",
                    help="also score word choice (diffusion classifier; a few minutes on a 2-core CPU)")
    ap.add_argument("--clips", type=int, default=10, help="clips per attribute for word choice")
    ap.add_argument("--sigmas", type=_sigmas, default=(0.9, 0.7), help="noise levels for word choice")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.checkpoint:
        pipe, st = load_checkpoint(a.checkpoint)
        size = a.size or st["args"].get("size", DEFAULT_SIZE)
        result = {"checkpoint": str(a.checkpoint), "step": st["step"], "size": size}
    else:
        pipe, size = load_tiny_shapes(path=a.model), a.size or DEFAULT_SIZE
        result = {"weights_id": weights_id(a.model), "size": size}
    pipe.to(a.device)
    result["sensitivity"] = attribute_sensitivity(pipe, num_captions=a.captions, size=size)
    if a.word_choice:
        result["word_choice"] = word_choice_accuracy(pipe, sigmas=a.sigmas, num_clips=a.clips, size=size)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
