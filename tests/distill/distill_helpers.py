"""Shared by the distillation tests (a plain module with a unique name: `from conftest import` is ambiguous once
several test folders have a conftest)."""

from dit_sparse.zoo.model import TinyShapesConfig

# A tiny Wan-based text-to-video teacher (random weights, built from config): 2 layers, 2 heads.
FAST_TEACHER = TinyShapesConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8, ffn_dim=32, freq_dim=16,
                                text_dim=16, text_layers=1, text_heads=2, text_ff=32)
SPARSE = "diagonal:window=[0,1,1]"  # frame-local: half of the key blocks at 8-token blocks on the 2x4x4 grid


def make_config(teacher_dir, out, **overrides):
    from dit_sparse.distill import DistillConfig

    base = dict(teacher=str(teacher_dir), plan=SPARSE, block_size=[8, 8], executor="cpu", student_steps=2,
                max_steps=2, fake_updates=2, batch_size=2, frames=2, height=8, width=8, out=str(out),
                checkpoint_every=0, validation=False, export=False, lr=1e-3, fake_lr=1e-3, guidance=3.0,
                ema_decay=0.9)
    base.update(overrides)
    return DistillConfig(**base)


def make_distiller(teacher_dir, out, resume=False, **overrides):
    from dit_sparse.distill import Distiller

    return Distiller(make_config(teacher_dir, out, **overrides), resume=resume, progress=False)
