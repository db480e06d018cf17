import numpy as np
import torch

from dit_sparse.zoo.attention_report import region_masks, report

PROMPT = "a red circle moving left on a dark background"
KW = dict(num_frames=4, height=16, width=16)


def test_region_masks_window():
    m = region_masks((3, 4, 4), window=(1, 1, 1))
    local = m["local"].view(3, 4, 4, 3, 4, 4)
    assert local[1, 1, 1].sum() == 27 and local[0, 0, 0].sum() == 8
    assert m["same_frame"].sum(-1).eq(16).all()


def test_report_measures_without_changing_output(tiny_pipe, tmp_path):
    ref = tiny_pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **KW).frames
    png = tmp_path / "maps.png"
    res = report(tiny_pipe, [PROMPT], steps=2, png=str(png), **KW)
    assert res["grid"] == [4, 8, 8] and res["calls_per_layer"] == 4
    heads = res["layers"]["0"]["heads"]
    assert len(heads) == 2
    for h in heads:
        assert 0 <= h["local"] <= 1 and 0 <= h["same_frame"] <= 1
    assert 0 <= res["share_local_heads_overall"] <= 1
    assert png.stat().st_size > 0
    after = tiny_pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **KW).frames
    np.testing.assert_array_equal(ref, after)  # processors restored


def test_probe_probabilities_match_model_attention(tiny_pipe):
    """The probe's q/k math reproduces the model's attention: p @ v equals the processor's attention output."""
    from dit_sparse.adapters.wan import apply_wan_rotary
    from dit_sparse.zoo import attention_report as ar

    captured = {}

    class Check(ar.AttentionProbe):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            if encoder_hidden_states is None:
                x = hidden_states[:1].float()
                q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
                k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
                v = attn.to_v(x).unflatten(2, (attn.heads, -1))
                cos, sin = rotary_emb
                q, k = apply_wan_rotary(q, cos, sin), apply_wan_rotary(k, cos, sin)
                p = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
                o = (p @ v.transpose(1, 2)).transpose(1, 2).flatten(2)
                captured["mine"] = attn.to_out[0](o)
                captured["model"] = self.inner(attn, hidden_states, None, attention_mask, rotary_emb)
                return captured["model"]
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    tr = tiny_pipe.transformer
    original = dict(tr.attn_processors)
    tr.set_attn_processor({n: Check(p, 0, None) if ".attn1." in n else p for n, p in original.items()})
    tiny_pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0, **KW)
    tr.set_attn_processor(original)
    torch.testing.assert_close(captured["mine"], captured["model"], atol=1e-5, rtol=1e-4)
