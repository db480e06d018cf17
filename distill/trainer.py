"""The distillation loop (TDM, data-free) on one accelerate.Accelerator.

One student update (``train_step``) is ``fake_updates`` fake-score updates followed by one student update:

    rollout without grad: x_0 ~ N(0, I); the student's own K-step trajectory up to a random step k
    fake:    x0, eps at k -> re-noised into (sigma_{k+1}, sigma_k] at t -> F regresses (x_t - x0) / t
    student: x0_real = x_t - t v_teacher(CFG), x0_fake = x_t - t v_F; the student's prediction at step k (with
             grad) is pushed along -(x0_fake - x0_real) through a pseudo-Huber loss; then the EMA

Everything random about step s (prompts, noise, k, t) is drawn from generators seeded by (seed, s, phase, rank),
and checkpoints (checkpoints.py) hold the parameters, optimizers, schedulers, EMA, counters and RNG states, so a
resumed run repeats the uninterrupted one exactly. Validation videos: samples.py; the dry run's estimate:
estimate.py; the run folder and write failures (one line naming the file, nothing partial): runfolder.py.

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
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoints import list_checkpoints, resume_run, save_checkpoint
from .config import DistillConfig
from .losses import default_huber_c, fake_score_loss, student_loss
from .pipelines import kind_of
from .prompts import EMBEDS, cached_embeddings, encode, training_prompts
from .roles import Roles
from .runfolder import METRICS, RunFolderError, clean_partials, writing
from .samples import TEACHER_INFO, Samples
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
from .train_state import EMA, Batch, TrainState, lr_lambda, seed_of

logger = logging.getLogger(__name__)


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

        self.prompts = training_prompts(cfg.prompts, self.kind)
        self.embeds, self.negative = cached_embeddings(acc, self.out / EMBEDS, pipe, self.prompts, cfg.negative_prompt)
        validation_prompts = cfg.validation_prompts or (
            self.kind.validation_prompts() if self.kind.validation_prompts else self.prompts[:4])
        validation_embeds, _ = encode(pipe, validation_prompts, cfg.negative_prompt)
        # The text encoder is not needed any more: drop every reference so training memory does not hold it.
        components = {k: v for k, v in pipe.components.items()
                      if k not in ("text_encoder", "transformer", "transformer_2", "scheduler")}
        for module in components.values():  # e.g. a VAE, for decoding validation videos
            if isinstance(module, torch.nn.Module):
                module.to(device)
        self.negative = self.negative.to(device) if self.negative is not None else None
        self.samples = Samples(type(pipe), components, self.size, validation_prompts, validation_embeds.to(device),
                               self.negative, list(cfg.validation_seeds), self.kind.check)
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

    # -- randomness --------------------------------------------------------------------------------------------
    def _generator(self, step: int, phase: int, index: int, micro: int) -> torch.Generator:
        rank = self.accelerator.process_index
        return torch.Generator().manual_seed(seed_of(self.cfg.seed, step, phase, index, micro, rank))

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
            clean_partials(self.out)
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
    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/checkpoint-<step> whole or not at all and prune old ones (checkpoints.py). A failed
        write (a full disk) removes the temporary folder and raises WriteFailed."""
        return save_checkpoint(self.accelerator, self.out, self.state, self.cfg.keep_checkpoints)

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Load `checkpoint`, or the newest complete checkpoint of the run that loads (checkpoints.resume_run);
        returns the step it continues from."""
        return resume_run(self.accelerator, self.out, self.state, checkpoint)

    # -- validation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate_teacher(self) -> None:
        """The dense teacher's reference videos (teacher_steps steps, CFG), once per run."""
        folder = self.out / "validation"
        if self.accelerator.is_main_process and not (folder / TEACHER_INFO).is_file():
            scheduler = self.teacher_scheduler_class.from_config(self.teacher_scheduler_config)
            with self.roles.dense_teacher() as teacher:
                self.samples.write_teacher(folder, teacher, scheduler, self.cfg.teacher_steps, self.cfg.guidance)
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def validate(self) -> dict | None:
        """Student videos at the validation seeds (K steps, CFG 1, sparse plan, EMA weights)."""
        result = None
        if self.accelerator.is_main_process:
            scheduler = make_scheduler(self.cfg.student_steps, self.shift, self.terminal, stochastic=self.cfg.eta == 0)
            named = self.roles.named_student_parameters()
            ctx = self.ema.applied(named) if self.ema is not None and self.cfg.export_ema else contextlib.nullcontext()
            self.roles.new_rollout()
            with ctx:
                result = self.samples.write_student(self.out / "validation", self.roles.student, scheduler,
                                                    self.cfg.student_steps, self.state.step)
            self.roles.new_rollout()
        self.accelerator.wait_for_everyone()
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

    def dry_run(self) -> dict:
        """Memory and time of the run, from two measured updates (estimate.py)."""
        from .estimate import dry_run_report

        return dry_run_report(self)
