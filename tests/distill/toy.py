"""A toy multi-mode text-to-"video" task for the slow distillation test, and tiny teachers built from config.

Data: tiny clips (3, 2, 8, 8) in pixel space (32 tokens at patch (1, 2, 2)); each prompt (one word of the
tiny-shapes vocabulary) owns a few modes, each a fixed smooth random clip; a sample is one of its prompt's modes
plus a little noise. A many-step sampler finds the modes; a 2-step sampler of the same model lands between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit_sparse.zoo.model import TinyShapesConfig, build_pipeline

TOY_SHAPE = (3, 2, 8, 8)  # C, F, H, W
TOY_PROMPTS = ("red", "blue")
MODE_OFFSETS = (-1.5, 0.0, 1.5)  # modes of a prompt: base + a * u along one unit-norm direction u
NOISE = 0.02

TINY_TEACHER = TinyShapesConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, freq_dim=32,
                                text_dim=16, text_layers=1, text_heads=2, text_ff=32,
                                flow_shift=1.0)  # the toy is trained on unshifted noise levels


def tiny_teacher_pipeline(seed: int = 0, config: TinyShapesConfig = TINY_TEACHER):
    """A randomly initialised TinyShapesPipeline (Wan transformer) with a tiny config."""
    pipe = build_pipeline(config, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_modes(seed: int = 0) -> torch.Tensor:
    """(prompts, modes, C, F, H, W): per prompt a base clip and modes spaced 1.5 apart (L2) along one direction u,
    close enough that a 2-step sampler blends neighbouring modes.

    Base and direction are constant over the pixels of a frame (a colour per frame): Wan has no absolute position
    embedding (RoPE is relative), so position-independent content is what a tiny Wan learns in seconds.
    """
    g = torch.Generator().manual_seed(seed)
    c, f, h, w = TOY_SHAPE
    n = len(TOY_PROMPTS)
    base = 0.6 * torch.tanh(torch.randn(n, c, f, 1, 1, generator=g)).expand(n, c, f, h, w)
    u = torch.randn(n, c, f, 1, 1, generator=g).expand(n, c, f, h, w)
    u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
    offsets = torch.tensor(MODE_OFFSETS).view(1, -1, 1, 1, 1, 1)
    return base[:, None] + offsets * u[:, None]


def toy_batch(modes: torch.Tensor, g: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt index (B,), clips (B, C, F, H, W))."""
    p = torch.randint(modes.shape[0], (batch,), generator=g)
    m = torch.randint(modes.shape[1], (batch,), generator=g)
    x = modes[p, m] + NOISE * torch.randn(batch, *TOY_SHAPE, generator=g)
    return p, x


def train_toy_teacher(steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0, dropout: float = 0.15):
    """Rectified-flow training of the tiny teacher on the toy task; returns (pipe, modes, prompt embeddings,
    negative embedding). Deterministic in `seed`."""
    pipe = tiny_teacher_pipeline(seed)
    modes = toy_modes(seed)
    with torch.no_grad():
        emb, neg = pipe.encode_prompt(list(TOY_PROMPTS), negative_prompt="", do_classifier_free_guidance=True)
    neg = neg[:1]
    tr = pipe.transformer.train()
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        p, x0 = toy_batch(modes, g, batch)
        drop = torch.rand(batch, generator=g) < dropout
        e = torch.where(drop.view(-1, 1, 1), neg, emb[p])
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(batch, generator=g)).view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        v = tr(hidden_states=xt, timestep=s.flatten() * 1000, encoder_hidden_states=e, return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        sched.step()
    tr.eval()
    return pipe, modes, emb, neg


@torch.no_grad()
def sample(transformer, emb: torch.Tensor, neg: torch.Tensor | None, sigmas: list[float], guidance: float,
           noise: torch.Tensor) -> torch.Tensor:
    """Euler sampling on an explicit sigma grid (K + 1 levels ending at 0); noise (B, C, F, H, W); emb (B, L, D)."""
    x = noise.clone()
    b = x.shape[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((b,), s, dtype=torch.float32) * 1000
        v = transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        if guidance != 1.0:
            vu = transformer(hidden_states=x, timestep=t, encoder_hidden_states=neg.expand(b, -1, -1),
                             return_dict=False)[0]
            v = vu + guidance * (v - vu)
        x = x + (s_next - s) * v
    return x
