import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_sparse.zoo import WEIGHTS_DIR, TinyShapesPipeline, load_tiny_shapes
from dit_sparse.zoo.model import MAX_TEXT_LEN, build_tokenizer, encode_text
from dit_sparse.zoo.shapes_data import vocabulary
from dit_sparse.zoo.transformer import TinyShapesTransformer

PROMPT = "a red circle moving left on a dark background"
SMALL = dict(num_inference_steps=2, num_frames=2, height=8, width=8)


def _gen(pipe, **kw):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**SMALL, **kw}).frames


def test_save_load_round_trip_is_bit_identical(tiny_pipe, tmp_path):
    before = _gen(tiny_pipe)
    tiny_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "TinyShapesPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    loaded = TinyShapesPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    after = _gen(loaded)
    assert before.shape == (1, 2, 8, 8, 3)
    np.testing.assert_array_equal(before, after)
    # and load_tiny_shapes accepts a path
    again = load_tiny_shapes(path=tmp_path)
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(before, _gen(again))


def test_output_types_and_seed(tiny_pipe):
    f = _gen(tiny_pipe)
    assert f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1
    pt = _gen(tiny_pipe, output_type="pt")
    assert pt.shape == (1, 2, 3, 8, 8)
    lat = _gen(tiny_pipe, output_type="latent")
    assert lat.shape == (1, 3, 2, 8, 8)
    other = tiny_pipe(PROMPT, generator=torch.Generator().manual_seed(1), **SMALL).frames
    assert not np.array_equal(f, other)
    two = tiny_pipe([PROMPT, PROMPT], generator=[torch.Generator().manual_seed(0)] * 2, **SMALL).frames
    assert two.shape[0] == 2
    np.testing.assert_allclose(two[0], f[0], atol=1e-5)


def test_cfg_branches_use_cache_context(tiny_pipe, monkeypatch):
    seen = []
    orig = tiny_pipe.transformer.cache_context

    def spy(name, **where):
        seen.append(name)
        return orig(name, **where)

    monkeypatch.setattr(tiny_pipe.transformer, "cache_context", spy)
    calls = []
    h = tiny_pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]),
                                                       with_kwargs=True)
    _gen(tiny_pipe, guidance_scale=4.0)
    assert seen == ["cond", "uncond"] * 2 and calls == [1] * 4  # separate calls, batch 1 each
    seen.clear()
    _gen(tiny_pipe, guidance_scale=1.0)
    assert seen == ["cond"] * 2
    h.remove()


def test_guidance_interval_guides_only_the_steps_inside_it(tiny_pipe, monkeypatch):
    seen = []
    orig = tiny_pipe.transformer.cache_context
    monkeypatch.setattr(tiny_pipe.transformer, "cache_context",
                        lambda name, **where: seen.append(name) or orig(name, **where))
    steps = dict(num_inference_steps=4)
    every_step = _gen(tiny_pipe, guidance_scale=4.0, **steps)
    np.testing.assert_array_equal(every_step, _gen(tiny_pipe, guidance_scale=4.0, guidance_interval=(0, 1), **steps))
    seen.clear()
    unguided = _gen(tiny_pipe, guidance_scale=1.0, **steps)
    np.testing.assert_array_equal(unguided, _gen(tiny_pipe, guidance_scale=4.0, guidance_interval=(0, 0), **steps))
    assert "uncond" not in seen
    tiny_pipe.scheduler.set_timesteps(4)
    sigmas = tiny_pipe.scheduler.sigmas[:4].tolist()
    seen.clear()
    partly = _gen(tiny_pipe, guidance_scale=4.0, guidance_interval=(sigmas[2], sigmas[1]), **steps)
    assert seen.count("uncond") == 2 and seen.count("cond") == 4
    assert not np.array_equal(partly, every_step) and not np.array_equal(partly, unguided)


@pytest.mark.parametrize("interval", [(0.5, 0.2), (-0.1, 0.5), (0.2, 1.5)])
def test_bad_guidance_interval_raises(tiny_pipe, interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        _gen(tiny_pipe, guidance_interval=interval)


def test_encoder_hidden_states_are_text_embeddings(tiny_pipe):
    got = []
    h = tiny_pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: got.append(k["encoder_hidden_states"]), with_kwargs=True)
    _gen(tiny_pipe)
    h.remove()
    cond, uncond = got[0], got[1]
    assert cond.shape == (1, MAX_TEXT_LEN, tiny_pipe.text_encoder.config.d_model)
    n_words = len(PROMPT.split()) + 1  # + </s>
    assert cond[0, n_words:].abs().sum() == 0 and cond[0, :n_words].abs().sum() > 0
    assert uncond[0, 1:].abs().sum() == 0  # the empty prompt is just </s>


@pytest.mark.parametrize("kw", [dict(height=7), dict(width=0), dict(num_frames=0), dict(num_inference_steps=0)])
def test_bad_inputs_raise(tiny_pipe, kw):
    with pytest.raises(ValueError):
        _gen(tiny_pipe, **kw)


def test_tokenizer_needs_no_download(tmp_path):
    tok = build_tokenizer()
    ids = tok(PROMPT).input_ids
    assert len(ids) == len(PROMPT.split()) + 1 and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids
    assert tok("A RED circle").input_ids == tok("a red circle").input_ids
    assert tok("a purple circle").input_ids[1] == tok.unk_token_id
    for w in vocabulary():
        assert tok.convert_tokens_to_ids(w) != tok.unk_token_id
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again(PROMPT).input_ids == ids


def test_encode_text_padding(tiny_pipe):
    e = encode_text(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [PROMPT, ""])
    assert e.shape == (2, MAX_TEXT_LEN, 16)
    assert e[1, 1:].abs().sum() == 0


SHIPPED = WEIGHTS_DIR / "model_index.json"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped tiny-shapes weights are absent")
def test_shipped_weights_load_and_generate():
    files = [p for p in Path(WEIGHTS_DIR).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    pipe = load_tiny_shapes()
    pipe.set_progress_bar_config(disable=True)
    # 3 colour channels plus the 3 coordinate planes the transformer appends (TinyShapesTransformer)
    assert isinstance(pipe.transformer, TinyShapesTransformer) and pipe.transformer.config.in_channels == 6
    assert pipe.transformer.config.out_channels == 3 and tuple(pipe.transformer.config.patch_size) == (1, 2, 2)
    f = pipe(PROMPT, num_inference_steps=2, num_frames=2, height=16, width=16,
             generator=torch.Generator().manual_seed(0)).frames
    assert f.shape == (1, 2, 16, 16, 3) and np.isfinite(f).all()


def test_load_tiny_shapes_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tiny_shapes"):
        load_tiny_shapes(path=tmp_path / "nope")


CANDIDATES_DIR = WEIGHTS_DIR.parent.parent / "candidates"


def test_candidate_folders_are_listed_and_named_after_their_weights():
    """candidates/README.md lists exactly the candidate folders in its table (none once one is shipped); each is
    named after its weights id (the README and the records cite it), holds how it was trained, and loads as a
    pipeline that generates a visible clip."""
    import re

    from dit_sparse.zoo.pipeline import weights_id

    folders = sorted(CANDIDATES_DIR.glob("tiny-shapes-*"))
    rows = [line for line in (CANDIDATES_DIR / "README.md").read_text().splitlines() if line.startswith("| `")]
    listed = {m for row in rows for m in re.findall(r"`(tiny-shapes-[0-9a-f]{12})`", row)}
    assert listed == {f.name for f in folders}
    for folder in folders:
        assert folder.name == f"tiny-shapes-{weights_id(folder)}"
        assert "command" in json.loads((folder / "training.json").read_text())
        pipe = load_tiny_shapes(path=folder)
        pipe.set_progress_bar_config(disable=True)
        frames = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames[0]
        assert frames.shape == (8, 32, 32, 3) and frames.std() > 0.05
