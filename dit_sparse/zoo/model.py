"""Components of the tiny-shapes pipeline, built from configuration only (nothing is downloaded).

- tokenizer: a word-level ``tokenizers`` model over the caption grammar, wrapped as a transformers fast tokenizer
  (saved as ``tokenizer/tokenizer.json``); every caption ends with ``</s>``, padding is ``<pad>`` (id 0).
- text encoder: a tiny ``transformers.T5EncoderModel`` (random init, trained jointly with the transformer).
- transformer: ``diffusers.WanTransformer3DModel`` in pixel space (3 channels in/out, patch (1, 2, 2)).
- scheduler: ``diffusers.FlowMatchEulerDiscreteScheduler`` (rectified flow, velocity = noise - x0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .shapes_data import vocabulary

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
MAX_TEXT_LEN = 16


@dataclass
class TinyShapesConfig:
    """Sizes of the shipped model (see README/notes for how it was trained)."""

    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    ffn_dim: int = 512
    freq_dim: int = 256
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 128
    # Scheduler time shift, also applied to the training noise levels. Flat-coloured clips stay legible under heavy
    # noise, so layout, shape and motion are decided at sigma > 0.8: with shift 1 the 3000-step model denoised
    # well below sigma 0.5 but drifted (objects fading out frame by frame) when sampling started from pure noise.
    flow_shift: float = 3.0
    # Three input channels with each pixel's (frame, row, column) coordinate. RoPE is relative and pixel space has
    # no VAE padding, so without them the model cannot see where a token is, and "moving left" (which, with objects
    # kept in frame, starts right and ends left) stays unlearnable: tools/experiments/probe16-coords.json.
    coordinate_channels: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer(max_length: int = MAX_TEXT_LEN):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_text_encoder(cfg: TinyShapesConfig, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    tc = T5Config(
        vocab_size=vocab_size,
        d_model=cfg.text_dim,
        d_kv=cfg.text_dim // cfg.text_heads,
        d_ff=cfg.text_ff,
        num_layers=cfg.text_layers,
        num_heads=cfg.text_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=MAX_TEXT_LEN,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(tc)


def build_transformer(cfg: TinyShapesConfig):
    from diffusers import WanTransformer3DModel

    from .transformer import TinyShapesTransformer

    cls, extra = (TinyShapesTransformer, 3) if cfg.coordinate_channels else (WanTransformer3DModel, 0)
    return cls(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=3 + extra,
        out_channels=3,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )


def build_scheduler(cfg: TinyShapesConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.flow_shift)


def build_pipeline(cfg: TinyShapesConfig | None = None, seed: int = 0):
    """A randomly initialised TinyShapesPipeline (deterministic in ``seed``)."""
    from .pipeline import TinyShapesPipeline

    cfg = cfg or TinyShapesConfig()
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = build_text_encoder(cfg, len(tokenizer))
        transformer = build_transformer(cfg)
    return TinyShapesPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=build_scheduler(cfg)
    )


def encode_text(tokenizer, text_encoder, prompts: list[str], max_length: int = MAX_TEXT_LEN,
                device=None, dtype=None) -> torch.Tensor:
    """(B, max_length, text_dim) embeddings; positions past each caption's end are zero (as WanPipeline does)."""
    enc = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_attention_mask=True, return_tensors="pt",
    )
    device = device or text_encoder.device
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    h = text_encoder(ids, attention_mask=mask).last_hidden_state
    h = h * mask.unsqueeze(-1).to(h.dtype)
    return h.to(dtype) if dtype is not None else h
