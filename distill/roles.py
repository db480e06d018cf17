"""The three networks of TDM distillation and how each is called.

- teacher: the dense many-step model, frozen (eval, no gradients), called with classifier-free guidance;
- student: initialised from the teacher; the sparse plan runs in every one of its forwards (``dit_sparse.apply``
  on it, bound to a scheduler holding the student's sigma grid so the plan's step schedule sees the same step
  indices as at inference). With ``lora_rank > 0`` the student is the teacher plus LoRA adapters (peft), and the
  teacher is the same module with the adapters disabled and the plan removed, which saves a full copy;
- fake score: initialised from the teacher, dense, trained on the student's samples.

All three are Wan-style transformers: ``net(hidden_states, timestep=1000 sigma, encoder_hidden_states)`` returns
the flow-matching velocity (B, C, F, H, W).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from types import SimpleNamespace
from typing import Iterator

import torch

from dit_sparse import apply, remove
from dit_sparse.adapters import nearest_class_name
from dit_sparse.extras import install_command
from dit_sparse.plan import SparsePlan
from dit_sparse.processor import SparseProcessor

from .sigmas import timestep

logger = logging.getLogger(__name__)

SUPPORTED_TRANSFORMERS = ("WanTransformer3DModel",)


class RoleError(ValueError):
    pass


def call_velocity(net, x: torch.Tensor, sigma, emb: torch.Tensor) -> torch.Tensor:
    """v = net(x, 1000 sigma, emb) in float32. x (B, C, F, H, W); sigma float or (B,); emb (B, L, D)."""
    dtype = emb.dtype
    t = timestep(sigma, x.shape[0], x.device)
    out = net(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
    return out.float()


class Roles:
    """Teacher, student and fake score; call them through the methods, which set up what each call needs.

    ``student_module`` and ``fake_module`` are what gets called (the accelerate-prepared wrappers once
    :meth:`set_prepared` ran); ``student`` and ``fake`` stay the plain modules (plan, EMA, export).
    """

    def __init__(self, teacher: torch.nn.Module, plan: SparsePlan, step_scheduler, *, executor: str | None = None,
                 block_size: tuple[int, int] | None = None, lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: list[str] | tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                 teacher_dtype: torch.dtype | None = None, gradient_checkpointing: bool = False):
        # Subclasses count (tiny-shapes' TinyShapesTransformer is a Wan transformer with coordinate channels).
        if nearest_class_name(type(teacher), SUPPORTED_TRANSFORMERS) is None:
            raise RoleError(f"distillation supports {', '.join(SUPPORTED_TRANSFORMERS)} teachers (and subclasses), "
                            f"not {type(teacher).__name__}")
        reused = sorted({name for name in plan.modules for spec in plan.heads_for(name)
                         if spec.impl.reuses})
        reused += ["the default strategy"] * plan.default.impl.reuses
        if reused:
            # A student forward at a sampled step would take an output kept from another sample's forward.
            raise RoleError(f"the plan reuses attention outputs across denoising steps ({reused[0]}"
                            f"{' and more' if len(reused) > 1 else ''}); a distilled student runs every step of "
                            "every sample on its own, so distil with a plan without `reuse` heads")
        self.plan = plan
        self.executor = executor
        self.block_size = tuple(block_size) if block_size else None
        self.lora = lora_rank > 0
        # The processor looks step indices up in this scheduler's timesteps (the student's grid), as it does in
        # the exported pipeline; keep a strong reference (the processor holds a weak one).
        self.step_scheduler = step_scheduler
        self._calls_before = 0

        teacher.requires_grad_(False)
        teacher.eval()
        self.fake = copy.deepcopy(teacher).requires_grad_(True).train()
        if self.lora:
            self.student = teacher
            self._add_lora(lora_rank, lora_alpha or lora_rank, list(lora_targets))
        else:
            self.student = copy.deepcopy(teacher).requires_grad_(True).train()
            if teacher_dtype is not None:
                teacher.to(teacher_dtype)
        self.teacher = teacher
        if gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
            self.fake.enable_gradient_checkpointing()
        self.student_module = self.student
        self.fake_module = self.fake
        self.processor = self._apply()

    # -- setup -------------------------------------------------------------------------------------------------
    def _add_lora(self, rank: int, alpha: float, targets: list[str]) -> None:
        try:
            from peft import LoraConfig
        except ImportError:
            raise RoleError(f"lora_rank > 0 needs peft: {install_command('distill')}") from None
        self.student.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True),
                                 adapter_name="student")
        self.student.requires_grad_(False)
        for name, p in self.student.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        self.student.train()

    def _apply(self) -> SparseProcessor:
        host = SimpleNamespace(transformer=self.student, scheduler=self.step_scheduler)
        return apply(host, self.plan, executor=self.executor, block_size=self.block_size)

    def set_prepared(self, student_module, fake_module) -> None:
        self.student_module, self.fake_module = student_module, fake_module

    # -- bookkeeping -------------------------------------------------------------------------------------------
    @property
    def sparse_calls(self) -> int:
        """Covered self-attention calls the student's plan executed so far (every student forward adds one per
        covered layer)."""
        return self._calls_before + self.processor.stats.calls

    def student_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def named_student_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]

    def new_rollout(self) -> None:
        """A rollout is a new generation for the plan's caches (dynamic layouts, re-scale statistics)."""
        self._calls_before += self.processor.stats.calls
        self.processor.reset_caches()

    # -- calls -------------------------------------------------------------------------------------------------
    def student_velocity(self, x: torch.Tensor, sigma, emb: torch.Tensor, wrapped: bool = False) -> torch.Tensor:
        """The student at one of its grid levels sigma (sparse plan). wrapped: through the prepared (DDP) module,
        for the forward that is differentiated; otherwise the plain module."""
        return call_velocity(self.student_module if wrapped else self.student, x, sigma, emb)

    def fake_velocity(self, x: torch.Tensor, t, emb: torch.Tensor, wrapped: bool = True) -> torch.Tensor:
        """The fake score (dense); by default through the prepared module (its differentiated forward)."""
        return call_velocity(self.fake_module if wrapped else self.fake, x, t, emb)

    @torch.no_grad()
    def teacher_velocity(self, x: torch.Tensor, t, emb: torch.Tensor, negative: torch.Tensor | None,
                         guidance: float) -> torch.Tensor:
        """The teacher's guided velocity v_u + w (v_c - v_u) (dense); w = 1 or no negative: conditional only."""
        with self.dense_teacher() as teacher:
            v_c = call_velocity(teacher, x, t, emb)
            if negative is None or guidance == 1.0:
                return v_c
            v_u = call_velocity(teacher, x, t, negative.expand(emb.shape[0], -1, -1))
            return v_u + guidance * (v_c - v_u)

    @contextlib.contextmanager
    def dense_teacher(self) -> Iterator[torch.nn.Module]:
        """The teacher module. In LoRA mode: the student's module with its adapters disabled and the plan removed
        for the duration, then put back with fresh caches (dynamic layouts of the student's differentiated
        forward are then estimated at its own step instead of reused from the rollout's last refresh)."""
        if not self.lora:
            yield self.teacher
            return
        self._calls_before += self.processor.stats.calls
        remove(self.student)
        self.student.disable_adapters()
        try:
            yield self.student
        finally:
            self.student.enable_adapters()
            self.processor = self._apply()

    # -- export ------------------------------------------------------------------------------------------------
    def student_weights(self, overrides: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A plain transformer state dict of the student (LoRA merged into the base weights), with `overrides`
        (e.g. EMA values, by parameter name) taking the place of the trained parameters."""
        model = self.student
        if not self.lora:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            for k, v in (overrides or {}).items():
                state[k] = v.detach().to(state[k].dtype).clone()
            return state
        return merged_lora_state(model, overrides)


def merged_lora_state(model: torch.nn.Module, overrides: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Base weights + scale * B @ A for every LoRA layer of `model`, keyed like the plain model."""
    from peft.tuners.lora import LoraLayer

    params = dict(model.named_parameters())
    values = {k: (overrides or {}).get(k, p).detach() for k, p in params.items()}
    state = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = values.get(k, v).detach().clone()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            a = values[f"{name}.lora_A.{adapter}.weight"].float()
            b = values[f"{name}.lora_B.{adapter}.weight"].float()
            key = f"{name}.weight"
            state[key] = (state[key].float() + module.scaling[adapter] * (b @ a)).to(state[key].dtype)
    return state
