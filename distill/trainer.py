"""The distillation loop (TDM, data-free) on one accelerate.Accelerator.

One student update (``train_step``) is ``fake_updates`` fake-score updates followed by one student update:

    rollout without grad: x_0 ~ N(0, I); the student's own K-step trajectory up to a random step k
    fake:    x0, eps at k -> re-noised into (sigma_{k+1}, sigma_k] at t -> F regresses (x_t - x0) / t
    student: x0_real = x_t - t v_teacher(CFG), x0_fake = x_t - t v_F; the student's prediction at step k (with
             grad) is pushed along -(x0_fake - x0_real) through a pseudo-Huber loss; then the EMA

Everything random about step s (prompts, noise, k, t) is drawn from generators seeded by (seed, s, phase, rank),
and checkpoints hold the parameters, optimizers, schedulers, EMA, counters and RNG states, so a resumed run
repeats the uninterrupted one exactly. Checkpoints are written to a temporary folder, finished by a marker file
(complete.json: the size of every file) and renamed into place; the newest ``keep_checkpoints`` are kept. A resume
cleans the partial files a crash left, falls back from a damaged newest checkpoint to the newest complete one, and
trims metrics.jsonl (later steps, a torn last line). A failed write (a full disk) ends with one line naming the file
and leaves nothing partial (runfolder.py).

Multi-process (DDP): only the differentiated forwards go through the prepared (DDP) modules; the rollout and the
targets use the plain modules, so ranks may draw different k (different numbers of forwards) without mismatched
collectives.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_sparse.atomic import atomic_path, write_json

from .config import DistillConfig
from .losses import default_huber_c, fake_score_loss, student_loss
from .pipelines import kind_of
from .roles import Roles
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
from .sigmas import (
    default_terminal,
    diffuse,
    make_scheduler,
    pred_x0_eps,
    renoise,
    sample_in_interval,
    sigma_grid,
    x0_from,
)

logger = logging.getLogger(__name__)

EMBEDS = "prompt_embeds.pt"
COMPLETE = "complete.json"  # written last into a checkpoint: the relative path and size of each of its files


# -- small stateful pieces saved with every checkpoint -----------------------------------------------------------
class EMA:
    """Exponential moving average of the student's trainable parameters (fp32 shadows, warm-up (1+n)/(10+n))."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for n, p in named_params:
            self.shadow[n].lerp_(p.detach().float(), 1 - d)

    @contextlib.contextmanager
    def applied(self, named_params):
        """Temporarily put the averages into the parameters."""
        saved = {n: p.detach().clone() for n, p in named_params}
        with torch.no_grad():
            for n, p in named_params:
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named_params:
                    p.copy_(saved[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


class TrainState:
    """Counters that must survive a resume."""

    def __init__(self):
        self.step = 0
        self.fake_updates = 0
        self.elapsed = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "fake_updates": self.fake_updates, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.fake_updates, self.elapsed = state["step"], state["fake_updates"], state["elapsed"]


@dataclass
class Batch:
    emb: torch.Tensor  # (B, L, D)
    k: int  # the rollout step whose prediction is used
    x: torch.Tensor  # (B, C, F, H, W) initial noise
    rollout_noise: list[torch.Tensor] | None  # fresh noise per re-noise (eta < 1)
    u: torch.Tensor  # (B,) uniform, places t in its interval
    z: torch.Tensor  # (B, C, F, H, W) noise of the diffusion to t


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


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
        return None if (path / "trainer_state.json").is_file() else f"no {COMPLETE} (written last): partial"
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


def lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


# -- the trainer -------------------------------------------------------------------------------------------------
class Distiller:
    """Build with a config, then ``train()``. ``resume=True`` continues from the newest checkpoint in cfg.out."""

    def __init__(self, cfg: DistillConfig, resume: bool = False, progress: bool = True, accelerator=None,
                 pipe=None):
        from accelerate import Accelerator

        self.cfg = cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
                                                      step_scheduler_with_optimizer=False)
        self.out = Path(cfg.out)
        self.progress = progress
        self.state = TrainState()
        self._tb = None
        self._setup(pipe)
        if resume:
            self.resume()

    # -- setup -------------------------------------------------------------------------------------------------
    def _setup(self, pipe) -> None:
        from dit_sparse.models import load_model
        from dit_sparse.plan_spec import parse_plan_spec

        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        if pipe is None:
            pipe = load_model(cfg.teacher, "cpu", torch.float32)
        self.kind = kind_of(pipe)
        f, h, w = self.kind.default_size
        self.size = (cfg.frames or f, cfg.height or h, cfg.width or w)
        self.sample_shape = tuple(self.kind.sample_shape(pipe, *self.size))
        self.huber_c = cfg.huber_c if cfg.huber_c is not None else default_huber_c(self.sample_shape)

        teacher_sched = pipe.scheduler.config
        self.shift = cfg.shift if cfg.shift is not None else float(
            teacher_sched.get("shift", teacher_sched.get("flow_shift", 1.0)) or 1.0)
        K = cfg.student_steps
        self.terminal = cfg.terminal_sigma if cfg.terminal_sigma is not None else default_terminal(K)
        self.grid = sigma_grid(K, self.shift, self.terminal)
        self.sigmas = [float(s) for s in self.grid]
        self.teacher_scheduler_config = dict(teacher_sched)
        self.teacher_scheduler_class = type(pipe.scheduler)

        self.prompts = self._prompts()
        self.embeds, self.negative = self._encode_prompts(pipe)
        self.validation_prompts = cfg.validation_prompts or (
            self.kind.validation_prompts() if self.kind.validation_prompts else self.prompts[:4])
        self.validation_embeds, _ = self._encode_list(pipe, self.validation_prompts)
        # The text encoder is not needed any more: drop every reference so training memory does not hold it.
        self.components = {k: v for k, v in pipe.components.items()
                           if k not in ("text_encoder", "transformer", "transformer_2", "scheduler")}
        for module in self.components.values():  # e.g. a VAE, for decoding validation videos
            if isinstance(module, torch.nn.Module):
                module.to(device)
        self.pipeline_class = type(pipe)
        teacher = pipe.transformer
        self.plan = parse_plan_spec(cfg.plan, pipe, teacher).plan
        del pipe
        gc.collect()
        self.step_scheduler = make_scheduler(K, self.shift, self.terminal, stochastic=cfg.eta == 0.0)
        teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        self.roles = Roles(teacher, self.plan, self.step_scheduler, executor=cfg.executor,
                           block_size=tuple(cfg.block_size) if cfg.block_size else None, lora_rank=cfg.lora_rank,
                           lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets, teacher_dtype=teacher_dtype,
                           gradient_checkpointing=cfg.gradient_checkpointing)
        self.roles.teacher.to(device)

        opt_g = torch.optim.AdamW(self.roles.student_parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
        opt_f = torch.optim.AdamW(self.roles.fake.parameters(), lr=cfg.fake_lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
        sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(cfg.warmup_steps))
        sch_f = torch.optim.lr_scheduler.LambdaLR(opt_f, lr_lambda(cfg.warmup_steps * max(1, cfg.fake_updates)))
        student_m, fake_m, self.opt_g, self.opt_f, self.sch_g, self.sch_f = acc.prepare(
            self.roles.student, self.roles.fake, opt_g, opt_f, sch_g, sch_f)
        self.roles.set_prepared(student_m, fake_m)
        self.ema = EMA(self.roles.named_student_parameters(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        acc.register_for_checkpointing(self.state)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        self.embeds = self.embeds.to(device)
        self.negative = self.negative.to(device) if self.negative is not None else None
        self.validation_embeds = self.validation_embeds.to(device)

    def _prompts(self) -> list[str]:
        cfg = self.cfg
        if cfg.prompts:
            lines = [ln.strip() for ln in Path(cfg.prompts).read_text().splitlines() if ln.strip()]
            if not lines:
                raise ValueError(f"prompts: {cfg.prompts} has no prompts")
            return lines
        if self.kind.training_prompts is None:
            raise ValueError(f"prompts: {self.kind.name} has no default prompts; give a file with one per line")
        return self.kind.training_prompts()

    def _encode_list(self, pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out, neg = [], None
        for i in range(0, len(prompts), 16):
            chunk = prompts[i:i + 16]
            pe, ne = pipe.encode_prompt(prompt=chunk, negative_prompt=[self.cfg.negative_prompt] * len(chunk),
                                        do_classifier_free_guidance=True, device=torch.device("cpu"))
            out.append(pe.float().cpu())
            neg = ne[:1].float().cpu()
        return torch.cat(out), neg

    def _encode_prompts(self, pipe) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, D) prompt embeddings and (1, L, D) negative ones, cached in OUT/prompt_embeds.pt."""
        acc = self.accelerator
        path = self.out / EMBEDS
        if acc.is_main_process and not path.is_file():
            with torch.no_grad():
                emb, neg = self._encode_list(pipe, self.prompts)
            _atomic_torch_save({"prompts": self.prompts, "embeds": emb, "negative": neg,
                                "negative_prompt": self.cfg.negative_prompt}, path)
        acc.wait_for_everyone()
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data["prompts"] != self.prompts or data["negative_prompt"] != self.cfg.negative_prompt:
            raise ValueError(f"{path} holds embeddings of other prompts; remove it or use another --out")
        return data["embeds"], data["negative"]

    # -- randomness --------------------------------------------------------------------------------------------
    def _generator(self, step: int, phase: int, index: int, micro: int) -> torch.Generator:
        rank = self.accelerator.process_index
        return torch.Generator().manual_seed(_seed(self.cfg.seed, step, phase, index, micro, rank))

    def draw(self, g: torch.Generator) -> Batch:
        cfg, dev = self.cfg, self.accelerator.device
        n, b, shape = len(self.embeds), cfg.batch_size, self.sample_shape
        idx = torch.randint(n, (b,), generator=g)
        k = int(torch.randint(cfg.student_steps, (1,), generator=g))
        x = torch.randn(b, *shape, generator=g)
        noise = [torch.randn(b, *shape, generator=g).to(dev) for _ in range(k + 1)] if cfg.eta < 1 else None
        u = torch.rand(b, generator=g)
        z = torch.randn(b, *shape, generator=g)
        return Batch(self.embeds[idx.to(self.embeds.device)], k, x.to(dev), noise, u.to(dev), z.to(dev))

    # -- the maths of one phase --------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's trajectory from noise to step k (plain module, no grad): x_k and its (x0, eps)."""
        s, x = self.sigmas, batch.x
        self.roles.new_rollout()
        with self.accelerator.autocast():
            for j in range(batch.k + 1):
                v = self.roles.student_velocity(x, s[j], batch.emb)
                x0, eps = pred_x0_eps(v, x, s[j])
                if j < batch.k:
                    x = renoise(x0, eps, s[j + 1], self.cfg.eta,
                                batch.rollout_noise[j] if batch.rollout_noise else None)
        return x, x0, eps

    def noisy_point(self, batch: Batch, x0: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-noise (x0, eps) to sigma_{k+1} (the next state of the trajectory), then diffuse it to t in
        (sigma_{k+1}, sigma_k]. Returns x_t (B, ...) and t (B,)."""
        s, k = self.sigmas, batch.k
        z_mid = batch.rollout_noise[k] if batch.rollout_noise else None
        x_mid = renoise(x0, eps, s[k + 1], self.cfg.eta, z_mid)
        t = sample_in_interval(s[k + 1], s[k], batch.u, self.cfg.min_sigma)
        return diffuse(x_mid, s[k + 1], t, batch.z), t

    def fake_loss(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            _, x0, eps = self.rollout(batch)
            x_t, t = self.noisy_point(batch, x0, eps)
        with self.accelerator.autocast():
            v = self.roles.fake_velocity(x_t, t, batch.emb)
        return fake_score_loss(v, x_t, x0, t)

    def student_targets(self, batch: Batch):
        """Without grad: x_k, and the teacher's and the fake score's clean predictions at x_t."""
        cfg = self.cfg
        with torch.no_grad():
            x_k, x0, eps = self.rollout(batch)
            x_t, t = self.noisy_point(batch, x0, eps)
            with self.accelerator.autocast():
                v_real = self.roles.teacher_velocity(x_t, t, batch.emb, self.negative, cfg.guidance)
                v_fake = self.roles.fake_velocity(x_t, t, batch.emb, wrapped=False)
            x0_real = x0_from(v_real, x_t, t)
            x0_fake = x0_from(v_fake, x_t, t)
        return x_k, x0_real, x0_fake

    def student_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        x_k, x0_real, x0_fake = self.student_targets(batch)
        s_k = self.sigmas[batch.k]
        with self.accelerator.autocast():
            v = self.roles.student_velocity(x_k, s_k, batch.emb, wrapped=True)
        x0 = x0_from(v, x_k, s_k)
        loss, g = student_loss(x0, x0_real, x0_fake, self.huber_c)
        with torch.no_grad():
            info = {"dmd_gap": float((x0_fake - x0_real).abs().mean()),
                    "x0_to_real": float((x0 - x0_real).abs().mean())}
        return loss, info

    # -- updates -----------------------------------------------------------------------------------------------
    def _micro_batches(self, module, step: int, phase: int, index: int, loss_fn):
        acc, cfg = self.accelerator, self.cfg
        total, infos = 0.0, []
        for micro in range(cfg.grad_accum):
            batch = self.draw(self._generator(step, phase, index, micro))
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(module):
                out = loss_fn(batch)
                loss, info = out if isinstance(out, tuple) else (out, {})
                acc.backward(loss / cfg.grad_accum)
            total += float(loss.detach()) / cfg.grad_accum
            infos.append(info)
        merged = {k: float(np.mean([i[k] for i in infos])) for k in (infos[0] if infos else {})}
        return total, merged

    def fake_update(self, step: int, index: int) -> dict:
        acc, cfg = self.accelerator, self.cfg
        loss, _ = self._micro_batches(self.roles.fake_module, step, 0, index, self.fake_loss)
        gn = acc.clip_grad_norm_(self.roles.fake.parameters(), cfg.max_grad_norm)
        self.opt_f.step()
        self.sch_f.step()
        self.opt_f.zero_grad(set_to_none=True)
        self.state.fake_updates += 1
        return {"loss_fake": loss, "grad_norm_fake": float(gn)}

    def student_update(self, step: int) -> dict:
        acc, cfg = self.accelerator, self.cfg
        loss, info = self._micro_batches(self.roles.student_module, step, 1, 0, self.student_loss)
        gn = acc.clip_grad_norm_(self.roles.student_parameters(), cfg.max_grad_norm)
        self.opt_g.step()
        self.sch_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.roles.named_student_parameters())
        return {"loss_student": loss, "grad_norm_student": float(gn), **info}

    def train_step(self) -> dict:
        """One student update preceded by `fake_updates` fake-score updates; returns the step's metrics."""
        step = self.state.step
        fake = [self.fake_update(step, r) for r in range(self.cfg.fake_updates)]
        rec = {"step": step + 1}
        if fake:
            rec["loss_fake"] = float(np.mean([f["loss_fake"] for f in fake]))
            rec["grad_norm_fake"] = float(np.mean([f["grad_norm_fake"] for f in fake]))
        rec.update(self.student_update(step))
        rec["lr"] = self.sch_g.get_last_lr()[0]
        rec["fake_lr"] = self.sch_f.get_last_lr()[0]
        self.state.step += 1
        return rec

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with writing(self.out / "config.yaml"):
                cfg.save(self.out / "config.yaml")
            self._clean_partial_checkpoints()
        acc.wait_for_everyone()
        if cfg.validation:
            self.validate_teacher()
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, desc="distill", dynamic_ncols=True,
                   disable=not (self.progress and acc.is_main_process))
        last = {}
        t_start, elapsed0 = time.time(), self.state.elapsed
        stopped_early = False
        while self.state.step < cfg.max_steps:
            if cfg.max_minutes is not None and self._out_of_time(t_start):
                stopped_early = True
                break
            t0 = time.time()
            rec = self.train_step()
            rec = self._reduce(rec)
            rec["seconds"] = round(time.time() - t0, 4)
            self.state.elapsed = elapsed0 + time.time() - t_start
            rec["sparse_attention_calls"] = self.roles.sparse_calls
            step = self.state.step
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                self.log(rec)
            bar.update(1)
            bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss_fake", "loss_student") if k in rec})
            last = rec
            if cfg.validation and cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.max_steps:
                self.validate()
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        if stopped_early:
            logger.warning("max_minutes=%s reached at step %d; resume with --resume %s", cfg.max_minutes,
                           self.state.step, self.out)
            if not list_checkpoints(self.out) or list_checkpoints(self.out)[-1].name != f"checkpoint-{self.state.step}":
                self.save_checkpoint()
        result = {"step": self.state.step, "last": last, "out": str(self.out), "stopped_early": stopped_early}
        if cfg.validation:
            result["validation"] = self.validate()
        if cfg.export:
            result["export"] = str(self.export())
        acc.wait_for_everyone()
        if self._tb:
            self._tb.close()
        return result

    def _out_of_time(self, t_start: float) -> bool:
        """True when any process is out of time; all stop together, so none waits alone in a collective."""
        acc = self.accelerator
        late = torch.tensor([float(time.time() - t_start > self.cfg.max_minutes * 60)], device=acc.device)
        if acc.num_processes > 1:
            late = acc.reduce(late, reduction="sum")
        return bool(late.item() > 0)

    def _reduce(self, rec: dict) -> dict:
        """Average the numeric metrics over processes (every rank calls this every step)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return rec
        keys = sorted(k for k, v in rec.items() if isinstance(v, float))
        vals = torch.tensor([rec[k] for k in keys], dtype=torch.float64, device=acc.device)
        vals = acc.reduce(vals, reduction="mean")
        return {**rec, **dict(zip(keys, vals.tolist()))}

    def log(self, rec: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        path = self.out / METRICS
        size = path.stat().st_size if path.is_file() else 0
        try:
            with writing(path), open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except RunFolderError:
            with contextlib.suppress(OSError):
                os.truncate(path, size)  # no torn last line (a resume would drop one: trim_metrics)
            raise
        tb = self._tensorboard()
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(k, v, rec["step"])

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
                return None
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        return self._tb or None

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _clean_partial_checkpoints(self) -> None:
        clean_partials(self.out)

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/checkpoint-<step> atomically (temporary folder, complete.json last, then rename);
        prune old ones. A failed write (a full disk) removes the temporary folder and raises WriteFailed."""
        acc = self.accelerator
        root = self.out / CHECKPOINTS
        final = root / f"checkpoint-{self.state.step}"
        tmp = root / f".tmp-checkpoint-{self.state.step}"
        intact = complete_checkpoints(self.out)
        hint = (f" (removed the partial checkpoint; {intact[-1].name} is intact: dit-sparse distill --resume "
                f"{self.out} continues from it)" if intact else " (removed the partial checkpoint)")
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        with writing(final, partial=tmp, hint=hint):
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_json(tmp / "trainer_state.json", self.state.state_dict())
                files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
                write_json(tmp / COMPLETE, {"step": self.state.step, "files": files})
                _fsync_tree(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(root)
        if acc.is_main_process:
            for old in list_checkpoints(self.out)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Load `checkpoint`, or the newest complete checkpoint of the run; returns the step it continues from.

        First the partial files a crash left are removed (space on a full disk). A newest checkpoint that is
        partial or does not load is skipped with a warning, for the next older one; once one loads, the skipped
        ones are renamed damaged-checkpoint-<step>. metrics.jsonl loses the lines after the loaded step and a torn
        last line (warning naming the file); a line torn in its middle is a RunFolderError naming file and line."""
        acc = self.accelerator
        if acc.is_main_process:
            clean_partials(self.out)
        acc.wait_for_everyone()
        read_metrics(self.out / METRICS)  # every process: a damaged log stops all of them before anything loads
        if checkpoint is not None:
            acc.load_state(str(checkpoint))
        else:
            found = list_checkpoints(self.out)
            if not found:
                logger.info("no checkpoint in %s: starting from step 0", self.out)
                return 0
            checkpoint = self._load_newest_loadable(found)
        if acc.is_main_process:
            trim_metrics(self.out / METRICS, self.state.step)
        acc.wait_for_everyone()
        logger.info("resumed from %s at step %d", checkpoint, self.state.step)
        return self.state.step

    def _load_newest_loadable(self, found: list[Path]) -> Path:
        acc = self.accelerator
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
            raise RunFolderError(f"--resume {self.out}: no checkpoint in {self.out / CHECKPOINTS} loads ({reasons})")
        if skipped and acc.is_main_process:
            for bad, _ in skipped:
                aside = bad.with_name(f"damaged-{bad.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(bad, aside)
            logger.warning("resume: continuing from %s (step %d) instead of the damaged %s (kept as %s)", ckpt.name,
                           self.state.step, ", ".join(p.name for p, _ in skipped),
                           ", ".join(f"damaged-{p.name}" for p, _ in skipped))
        return ckpt

    # -- validation --------------------------------------------------------------------------------------------
    def _pipeline(self, transformer, scheduler):
        return self.pipeline_class(**self.components, transformer=transformer, scheduler=scheduler,
                                   **({"text_encoder": None} if "text_encoder" in _init_params(self.pipeline_class)
                                      else {}))

    def _generate(self, pipe, steps: int, guidance: float) -> list[np.ndarray]:
        f, h, w = self.size
        pipe.set_progress_bar_config(disable=True)
        videos = []
        for _i, emb in enumerate(self.validation_embeds):
            gens = [torch.Generator().manual_seed(s) for s in self.cfg.validation_seeds]
            n = len(gens)
            kwargs = {"negative_prompt_embeds": self.negative.expand(n, -1, -1)} if guidance > 1 else {}
            out = pipe(prompt_embeds=emb[None].expand(n, -1, -1), num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens, height=h, width=w, num_frames=f, output_type="np", **kwargs)
            videos.extend(np.asarray(v) for v in out.frames)
        return videos

    def _write_videos(self, folder: Path, name: str, videos: list[np.ndarray]) -> list[bool | None]:
        from dit_sparse.video import write_video

        folder.mkdir(parents=True, exist_ok=True)
        checks = []
        seeds = self.cfg.validation_seeds
        for i, video in enumerate(videos):
            prompt = self.validation_prompts[i // len(seeds)]
            path = folder / f"{name}_p{i // len(seeds)}_s{seeds[i % len(seeds)]}.mp4"
            with writing(path, partial=path):
                write_video(path, video)
            checks.append(self.kind.check(video, prompt) if self.kind.check else None)
        return checks

    @torch.no_grad()
    def validate_teacher(self) -> None:
        """The dense teacher's reference videos (teacher_steps steps, CFG), once per run."""
        acc = self.accelerator
        folder = self.out / "validation"
        if acc.is_main_process and not (folder / "teacher.json").is_file():
            scheduler = self.teacher_scheduler_class.from_config(self.teacher_scheduler_config)
            with self.roles.dense_teacher() as teacher:
                videos = self._generate(self._pipeline(teacher, scheduler), self.cfg.teacher_steps, self.cfg.guidance)
            checks = self._write_videos(folder, "teacher", videos)
            with writing(folder / "teacher.json"):
                write_json(folder / "teacher.json", {"steps": self.cfg.teacher_steps, "checks": checks})
        acc.wait_for_everyone()

    @torch.no_grad()
    def validate(self) -> dict | None:
        """Student videos at the validation seeds (K steps, CFG 1, sparse plan, EMA weights)."""
        acc = self.accelerator
        result = None
        if acc.is_main_process:
            scheduler = make_scheduler(self.cfg.student_steps, self.shift, self.terminal, stochastic=self.cfg.eta == 0)
            named = self.roles.named_student_parameters()
            ctx = self.ema.applied(named) if self.ema is not None and self.cfg.export_ema else contextlib.nullcontext()
            self.roles.new_rollout()
            with ctx:
                videos = self._generate(self._pipeline(self.roles.student, scheduler), self.cfg.student_steps, 1.0)
            self.roles.new_rollout()
            folder = self.out / "validation" / f"step-{self.state.step}"
            checks = self._write_videos(folder, "student", videos)
            result = {"step": self.state.step, "validation_checks": checks}
            if checks and checks[0] is not None:
                result["validation_caption_accuracy"] = float(np.mean(checks))
            with writing(self.out / "validation" / "student.jsonl"), \
                    open(self.out / "validation" / "student.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
        acc.wait_for_everyone()
        return result

    # -- export ------------------------------------------------------------------------------------------------
    def student_state(self) -> dict[str, torch.Tensor]:
        overrides = dict(self.ema.shadow) if self.ema is not None and self.cfg.export_ema else None
        return self.roles.student_weights(overrides)

    def export(self, out_dir: str | Path | None = None) -> Path:
        from .export import export_student

        out_dir = Path(out_dir) if out_dir is not None else self.out / "export"
        if self.accelerator.is_main_process:
            export_student(self.cfg, self.student_state(), self.plan, out_dir, shift=self.shift,
                           terminal=self.terminal, steps_done=self.state.step)
        self.accelerator.wait_for_everyone()
        return out_dir

    # -- estimates ---------------------------------------------------------------------------------------------
    def dry_run(self) -> dict:
        """Memory (analytic, plus the measured peak of one update) and time (one measured update x max_steps)."""
        cfg, acc = self.cfg, self.accelerator
        nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
        teacher_b = 0 if self.roles.lora else nbytes(self.roles.teacher.parameters())
        student_b = nbytes(self.roles.student.parameters())
        fake_b = nbytes(self.roles.fake.parameters())
        train_g = sum(p.numel() for p in self.roles.student_parameters())
        train_f = sum(p.numel() for p in self.roles.fake.parameters())
        # grads (4 B) + Adam moments (8 B) per trainable parameter, EMA 4 B per student parameter
        optim_b = (train_g + train_f) * 12 + (train_g * 4 if self.ema is not None else 0)
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.train_step()  # warm-up (layouts, allocator)
        t0 = time.time()
        self.train_step()
        per_step = time.time() - t0
        peak = torch.cuda.max_memory_allocated() if acc.device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report = {
            "device": str(acc.device), "processes": acc.num_processes, "mixed_precision": cfg.mixed_precision,
            "sample_shape": list(self.sample_shape), "batch_per_process": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "student_steps": cfg.student_steps, "sigmas": [round(s, 6) for s in self.sigmas],
            "params_teacher_GB": teacher_b / 1e9, "params_student_GB": student_b / 1e9, "params_fake_GB": fake_b / 1e9,
            "trainable_student": train_g, "trainable_fake": train_f,
            "grads_optimizer_ema_GB": optim_b / 1e9,
            "static_total_GB": (teacher_b + student_b + fake_b + optim_b) / 1e9,
            "measured_peak_GB": peak / 1e9,
            "measured_peak_kind": "cuda max_memory_allocated" if acc.device.type == "cuda" else "process max RSS",
            "cpu_rss_before_GB": rss0 / 1e9,
            "seconds_per_step": per_step,
            "forwards_per_step": self._forwards_per_step(),
            "estimated_hours": per_step * cfg.max_steps / 3600,
            "max_steps": cfg.max_steps,
        }
        return report

    def _forwards_per_step(self) -> dict:
        cfg = self.cfg
        rollout = (cfg.student_steps + 1) / 2  # expected forwards to reach a uniform k
        cfg_calls = 2 if cfg.guidance != 1 else 1
        per_micro = {"student_no_grad": rollout * (cfg.fake_updates + 1), "student_with_grad": 1,
                     "fake_with_grad": cfg.fake_updates, "fake_no_grad": 1, "teacher": cfg_calls}
        return {k: v * cfg.grad_accum for k, v in per_micro.items()}


def _init_params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    # a file object, not a path: torch.save's RuntimeError then carries the OSError (errno) of the failed write
    with atomic_path(path) as tmp, writing(path), open(tmp, "wb") as f:
        torch.save(obj, f)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
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
