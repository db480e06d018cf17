"""Train tiny-shapes from scratch on procedural clips (rectified flow), then export the EMA pipeline.

    python tools/train_tiny_shapes.py --out /tmp/tiny_shapes_ckpt [--steps N] [--resume]

Seeded and resumable: batch ``i`` is a pure function of ``(seed, i)`` (clips, noise, timesteps and caption
dropout), and a checkpoint (model, EMA, optimizer, step) is written atomically every ``--ckpt-minutes``, so a
resumed run follows the same trajectory as an uninterrupted one. At the end the EMA weights are exported with
``save_pretrained`` to ``--export`` (default: the package folder ``dit_sparse/zoo/weights/tiny-shapes``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dit_sparse.atomic import atomic_path, write_text
from dit_sparse.distill.sigmas import shift_sigma
from dit_sparse.zoo.checkpoint import ema_pipeline, read_checkpoint
from dit_sparse.zoo.cli_types import float_pair
from dit_sparse.zoo.model import TinyShapesConfig, build_pipeline, encode_text
from dit_sparse.zoo.pipeline import WEIGHTS_DIR, load_tiny_shapes
from dit_sparse.zoo.shapes_data import HALF_SIZE, SPEED, batch_specs, max_half_size, sample_batch, shape_contrast
from dit_sparse.zoo.transformer import TinyShapesTransformer

COMMAND = "python tools/train_tiny_shapes.py"  # how a run is recorded (training.json, checkpoints)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint / log directory")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.998, help="maximum EMA decay (warmed up as (1+s)/(10+s))")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="extra loss weight on pixels within 2 px of the object (1 + W there, 1 elsewhere): the "
                        "object is ~15%% of a frame and shapes differ in a few edge pixels, so plain MSE learns "
                        "colour and motion long before shape")
    p.add_argument("--shape-weight", type=float, default=0.0,
                   help="extra loss weight on the pixels that tell the clip's shape from the other shapes of equal "
                        "area at the same place (1 + W x coverage difference; adds to --object-weight): the "
                        "corners, tips and arcs where a circle, a square and a triangle differ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (batches are drawn on the CPU either way)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes drawing batches ahead (GPU training; the batches are the same as with 0)")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                   help="autocast dtype for the forward; auto = bf16 on CUDA, fp32 on CPU (a CPU without native "
                        "bf16, e.g. AVX2 only, runs a bf16 training step about 8x slower than fp32)")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (and export) after this step while keeping the --steps learning-rate schedule")
    p.add_argument("--mixed-from", type=int, default=None,
                   help="from this step on, draw half of the noise levels uniformly in (0, 1) instead of "
                        "logit-normal (trains the very low and very high noise levels more)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (and export) after this wall time")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--init-from", default=None,
                   help="start from the weights of a saved tiny-shapes pipeline (fresh optimizer, step 0); "
                        "recorded in the phases of training.json")
    p.add_argument("--export", default=str(WEIGHTS_DIR), help="where to save_pretrained the EMA pipeline")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--export-only", action="store_true",
                   help="export the EMA weights of OUT/checkpoint.pt to --export and exit (no training)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--frame-mix", default=None, metavar="FxB,...",
                   help="mixed-duration training, e.g. '8x8,4x16,2x32': step n trains on entry n mod len, "
                        "B windows of F consecutive frames cut from --frames-long clips (short windows cost far "
                        "less attention per clip, as joint image/video training does); default: --frames x "
                        "--batch-size every step")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--half-size", type=parse_half_size, default=HALF_SIZE, metavar="LO,HI",
                   help="range of the half-size (pixels at 32x32) of moving and still shapes "
                        f"(default {HALF_SIZE[0]},{HALF_SIZE[1]})")
    p.add_argument("--speed", type=positive_float, default=SPEED, metavar="PX",
                   help=f"pixels per frame (at 32x32) that moving shapes travel (default {SPEED})")
    p.add_argument("--config", default=None,
                   help="JSON object overriding TinyShapesConfig fields (for tests / experiments)")
    p.set_defaults(flow_shift=1.0)  # not an option: main() takes it from the model config (scheduler shift)
    return p.parse_args(argv)


def parse_half_size(text: str) -> tuple[float, float]:
    lo, hi = float_pair(text, "7.5,9.5")
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"half-size range must have 0 < LO <= HI, got {text!r}")
    return lo, hi


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def lr_at(step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def parse_frame_mix(spec: str | None, frames: int, batch_size: int) -> list[tuple[int, int]]:
    """'8x8,4x16' -> [(8, 8), (4, 16)]: (frames, batch size) per step, cycled. None -> [(frames, batch_size)]."""
    if not spec:
        return [(frames, batch_size)]
    mix = []
    for entry in spec.split(","):
        try:
            f, b = (int(x) for x in entry.strip().lower().split("x"))
        except ValueError:
            raise SystemExit(f"--frame-mix entry {entry!r} is not FRAMESxBATCH (e.g. '8x8,4x16')") from None
        if not 1 <= f <= frames or b < 1:
            raise SystemExit(f"--frame-mix entry {entry!r}: frames must be in 1..--frames ({frames}) and batch >= 1")
        mix.append((f, b))
    return mix


def object_loss_weights(x0: torch.Tensor, weight: float, reach: int = 2) -> torch.Tensor:
    """(B, 1, T, H, W) loss weights: 1 + ``weight`` within ``reach`` pixels of the object, 1 elsewhere.

    The background is flat, so the object is every pixel whose colour differs from the clip's top-left pixel
    (shapes keep a margin from the border, so that pixel is always background).
    """
    background = x0[:, :, :1, :1, :1]
    mask = ((x0 - background).abs().amax(dim=1, keepdim=True) > 0.05).float()
    k = 2 * reach + 1
    near = torch.nn.functional.max_pool3d(mask, (1, k, k), stride=1, padding=(0, reach, reach))
    return 1.0 + weight * near


def loss_weights(x0: torch.Tensor, contrast: torch.Tensor | None, a) -> torch.Tensor | None:
    """(B, 1, T, H, W) per-pixel loss weights of ``--object-weight`` and ``--shape-weight``; None when both are off."""
    w = object_loss_weights(x0, a.object_weight) if a.object_weight else None
    if a.shape_weight:
        w = (1.0 if w is None else w) + a.shape_weight * contrast
    return w


def make_batch(step: int, a, tokenizer, text_encoder):
    """Everything random about step ``step`` comes from (seed, step).

    Returns captions, clean clips, noise, noise levels and, with ``--shape-weight``, the clips'
    :func:`shape_contrast` maps (B, 1, T, H, W) (else None).
    """
    mix = parse_frame_mix(a.frame_mix, a.frames, a.batch_size)
    window, batch_size = mix[step % len(mix)]
    batch_seed = a.seed * 1_000_003 + step
    caps, x0 = sample_batch(batch_seed, batch_size, a.frames, a.size, half_size=a.half_size, speed=a.speed)
    contrast = None
    if a.shape_weight:
        contrast = torch.stack([shape_contrast(attrs, clip_seed, a.frames, a.size, a.half_size, a.speed)
                                for attrs, clip_seed in batch_specs(batch_seed, batch_size)])[:, None]
    if window < a.frames:  # a random run of consecutive frames per clip: the motion per frame stays the same
        gw = torch.Generator().manual_seed(a.seed * 104_729 + step)
        starts = torch.randint(0, a.frames - window + 1, (batch_size,), generator=gw).tolist()
        x0 = torch.stack([clip[:, t:t + window] for clip, t in zip(x0, starts)])
        if contrast is not None:
            contrast = torch.stack([c[:, t:t + window] for c, t in zip(contrast, starts)])
    g = torch.Generator().manual_seed(a.seed * 7_919 + step + 17)
    drop = torch.rand(len(caps), generator=g) < a.caption_dropout
    caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(len(caps), generator=g))  # logit-normal(0, 1)
    if a.mixed_from is not None and step >= a.mixed_from:
        uniform = torch.rand(len(caps), generator=g).clamp(1e-3, 1 - 1e-3)
        sigma = torch.where(torch.rand(len(caps), generator=g) < 0.5, uniform, sigma)
    # The scheduler's time shift applied to the training noise levels: flat-coloured clips keep their layout visible
    # under a lot of noise, so position, shape and motion are decided at sigma > 0.8, and training goes there too.
    return caps, x0, noise, shift_sigma(sigma, a.flow_shift), contrast


class BatchSource:
    """Batch ``step`` of the run, drawn in this process or, with workers, by a process pool a window ahead."""

    WINDOW = 32  # steps drawn ahead per round (bounded memory)

    def __init__(self, a):
        self.a = a
        self.pool = multiprocessing.get_context("spawn").Pool(a.workers) if a.workers > 0 else None
        self.ready: dict[int, tuple] = {}

    def get(self, step: int):
        if self.pool is None:
            return make_batch(step, self.a, None, None)
        if step not in self.ready:
            steps = range(step, step + self.WINDOW)
            self.ready = dict(zip(steps, self.pool.map(functools.partial(_batch, a=self.a), steps)))
        return self.ready.pop(step)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


def _batch(step: int, a):
    return make_batch(step, a, None, None)


def save_checkpoint(path: Path, state: dict):
    with atomic_path(path) as tmp:  # a run stopped while writing keeps its previous checkpoint
        torch.save(state, tmp)


def export(ema_state, out_dir: Path, info: dict):
    pipe = ema_pipeline(info["config"], ema_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    write_text(out_dir / "training.json", json.dumps(info, indent=2) + "\n")
    return pipe


def with_coordinate_inputs(state: dict) -> dict:
    """A plain Wan transformer's weights widened for :class:`TinyShapesTransformer`: the patch embedding gets zero
    weights for the three coordinate channels, so the widened model computes exactly what the plain one did and
    training starts from there (how coordinates were added to the shipped model without retraining it)."""
    state = dict(state)
    w = state["patch_embedding.weight"]  # (inner, 3, pt, ph, pw)
    state["patch_embedding.weight"] = torch.cat([w, w.new_zeros(w.shape[0], 3, *w.shape[2:])], 1)
    return state


def init_from(pipe, path: Path, cfg: TinyShapesConfig) -> dict | None:
    """Load the transformer and text encoder weights of a saved pipeline whose sizes match ``cfg``; return that
    pipeline's ``training.json`` (how its weights were made), which the new run carries forward."""
    src = load_tiny_shapes(path=path)
    for name in ("transformer", "text_encoder"):
        state = getattr(src, name).state_dict()
        if name == "transformer" and cfg.coordinate_channels and not isinstance(src.transformer, TinyShapesTransformer):
            state = with_coordinate_inputs(state)
        try:
            getattr(pipe, name).load_state_dict(state)
        except RuntimeError as e:
            raise SystemExit(f"--init-from {path}: its {name} does not match --config {cfg.to_dict()}: {e}") from e
    record = path / "training.json"
    return json.loads(record.read_text()) if record.is_file() else {"path": str(path), "training": "unrecorded"}


def command_of(args: dict) -> str:
    """A runnable command line equivalent to a run's recorded arguments (for exports of a checkpoint)."""
    parts = [COMMAND]
    for k, v in args.items():
        if v is None or v is False or k in ("out", "export", "resume", "export_only", "flow_shift"):
            continue
        if isinstance(v, (list, tuple)):  # e.g. --half-size, recorded as a pair
            v = ",".join(str(x) for x in v)
        parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}"))
    return " ".join(parts)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    cfg = TinyShapesConfig(**(json.loads(a.config) if a.config else {}))
    if a.export_only:
        st = read_checkpoint(ckpt_path)
        info = {"config": st["config"], "args": {k: v for k, v in st["args"].items() if k not in ("out", "export")},
                "steps_done": st["step"], "wall_seconds": round(st["elapsed"], 1), "final_loss_avg": st["loss_avg"],
                "command": command_of(st["args"]),
                "phases": st.get("phases"), "init_from": st.get("init_from"), "torch": torch.__version__}
        export(st["ema"], Path(a.export), info)
        print(f"exported EMA weights of step {st['step']} to {a.export}", flush=True)
        return info
    a.flow_shift = cfg.flow_shift
    parse_frame_mix(a.frame_mix, a.frames, a.batch_size)  # a malformed spec fails before any work
    if a.half_size[1] > max_half_size(a.frames, a.speed):
        raise SystemExit(f"--half-size {a.half_size[0]},{a.half_size[1]}: shapes of half-size {a.half_size[1]} moving "
                         f"{a.speed} px per frame leave the frame within {a.frames} frames; use at most "
                         f"{max_half_size(a.frames, a.speed):.2f} (or a lower --speed)")
    torch.manual_seed(a.seed)
    pipe = build_pipeline(cfg, seed=a.seed)
    init_record = init_from(pipe, Path(a.init_from), cfg) if a.init_from else None
    device = torch.device(a.device)
    tok, te, tr = pipe.tokenizer, pipe.text_encoder.to(device), pipe.transformer.to(device)
    te.train()
    tr.train()
    params = list(tr.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=a.weight_decay)
    ema = {"transformer": {k: v.detach().clone() for k, v in tr.state_dict().items()},
           "text_encoder": {k: v.detach().clone() for k, v in te.state_dict().items()}}
    step, elapsed_before, loss_avg, history = 0, 0.0, None, []
    command = f"{COMMAND} " + " ".join(sys.argv[1:] if argv is None else argv)
    phases = []  # one record per (re)start: the exact command and the step it started from
    if a.resume and ckpt_path.exists():
        st = read_checkpoint(ckpt_path)
        # e.g. a flow_shift-1 checkpoint resumed under today's default of 3 (fields added since take their defaults)
        if TinyShapesConfig(**st["config"]).to_dict() != cfg.to_dict():
            raise SystemExit(f"--resume {ckpt_path}: the checkpoint was trained with config {st['config']}, this run "
                             f"has {cfg.to_dict()}; pass --config with the checkpoint's values")
        tr.load_state_dict(st["transformer"])
        te.load_state_dict(st["text_encoder"])
        opt.load_state_dict(st["optimizer"])
        ema = {name: {k: v.to(device) for k, v in part.items()} for name, part in st["ema"].items()}
        step, elapsed_before, loss_avg, history = st["step"], st["elapsed"], st["loss_avg"], st["history"]
        init_record = st.get("init_from") or init_record
        # checkpoints written before phases were recorded know only their last command
        phases = st.get("phases") or [{"from_step": 0, "command": st.get("command", "unrecorded"),
                                       "args": {k: v for k, v in st["args"].items() if k not in ("out", "export")}}]
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    phases.append({"from_step": step, "command": command,
                   "args": {k: v for k, v in vars(a).items() if k not in ("out", "export")}})
    log = open(out / "train_log.jsonl", "a")

    def state():
        return {"transformer": tr.state_dict(), "text_encoder": te.state_dict(), "optimizer": opt.state_dict(),
                "ema": ema, "step": step, "elapsed": elapsed_before + time.time() - t_start, "loss_avg": loss_avg,
                "history": history, "args": vars(a), "config": cfg.to_dict(),
                "command": command, "phases": phases, "init_from": init_record}

    t_start = time.time()
    last_ckpt = time.time()
    amp = a.amp == "bf16" or (a.amp == "auto" and device.type == "cuda")
    stop = {"signal": None}

    def on_signal(signum, frame):  # finish the current step, checkpoint, and exit without exporting
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bar = tqdm(total=a.steps, initial=step, desc="train tiny-shapes", dynamic_ncols=True, mininterval=2.0)
    source = BatchSource(a)
    while step < (a.steps if a.stop_at is None else min(a.steps, a.stop_at)):
        if stop["signal"] is not None:
            save_checkpoint(ckpt_path, state())
            print(f"stopped by signal {stop['signal']} at step {step}; resume with --resume", flush=True)
            source.close()
            return None
        if a.max_minutes is not None and (elapsed_before + time.time() - t_start) / 60 > a.max_minutes:
            print(f"time budget of {a.max_minutes} min reached at step {step}", flush=True)
            break
        caps, x0, noise, sigma, contrast = (t.to(device) if torch.is_tensor(t) else t for t in source.get(step))
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = noise - x0
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, a)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            emb = encode_text(tok, te, caps)
            pred = tr(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=emb, return_dict=False)[0]
        w = loss_weights(x0, contrast, a)
        if w is not None:
            loss = (w * (pred.float() - target) ** 2).mean() / w.mean()
        else:
            loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        d = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, mod in (("transformer", tr), ("text_encoder", te)):
                for k, v in mod.state_dict().items():
                    e = ema[name][k]
                    if v.dtype.is_floating_point:
                        e.mul_(d).add_(v.detach(), alpha=1 - d)
                    else:
                        e.copy_(v)
        lv = loss.item()
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr_at(step - 1, a):.2e}")
        if step % 25 == 0 or step == a.steps:
            rec = {"step": step, "loss": lv, "loss_avg": loss_avg, "grad_norm": float(gnorm),
                   "lr": lr_at(step - 1, a), "elapsed_s": round(elapsed_before + time.time() - t_start, 1)}
            history.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if time.time() - last_ckpt > a.ckpt_minutes * 60:
            save_checkpoint(ckpt_path, state())
            last_ckpt = time.time()
    bar.close()
    source.close()
    save_checkpoint(ckpt_path, state())
    total = elapsed_before + time.time() - t_start
    info = {"config": cfg.to_dict(), "args": {k: v for k, v in vars(a).items() if k not in ("out", "export")},
            "steps_done": step, "wall_seconds": round(total, 1), "final_loss_avg": loss_avg,
            "command": command, "phases": phases, "init_from": init_record, "torch": torch.__version__}
    print(json.dumps({k: info[k] for k in ("steps_done", "wall_seconds", "final_loss_avg")}), flush=True)
    if not a.no_export:
        export(ema, Path(a.export), info)
        print(f"exported EMA pipeline to {a.export}", flush=True)
    return info


if __name__ == "__main__":
    main()
