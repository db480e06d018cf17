"""Ways of applying a plan that used to leave a model broken or said something unhelpful (tiny models, CPU)."""

from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_wan, wan_inputs

import dit_sparse
from dit_sparse import AlreadyAppliedError, SparsePlan, SparseProcessor, UnsupportedModelError

BLOCKS = (16, 16)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    )
    g = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 3, 8, generator=g), return_dict=False)
    return model.eval(), inputs


def _tiny_sana():
    """Sana's self-attention runs a linear-attention processor, not its module class's default one."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        mlp_ratio=2.0, sample_size=8, patch_size=1,
    )
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 3, 8, generator=g), return_dict=False)
    return model.eval(), inputs


@pytest.mark.parametrize("build", [_tiny_unet, _tiny_sana])
def test_the_one_line_form_on_an_unsupported_model_says_so_and_remove_restores_its_stock_processors(build):
    model, x = build()
    stock_types = {name: type(p) for name, p in model.attn_processors.items()}
    before = run(model, x)
    model.set_attn_processor(SparseProcessor(SparsePlan.uniform(tiny_wan(), "diagonal", window=[0, 1, 1])))
    name = type(model).__name__
    with pytest.raises(UnsupportedModelError, match=rf"set on {name}, which dit-sparse has no adapter for") as e:
        run(model, x)
    assert "WanTransformer3DModel" in str(e.value) and "dit_sparse.remove(model)" in str(e.value)
    assert "not usable" in dit_sparse.summary(model)
    dit_sparse.remove(model)
    assert {name: type(p) for name, p in model.attn_processors.items()} == stock_types
    assert torch.equal(run(model, x), before)


def test_the_one_line_form_over_apply_is_refused_with_what_to_do_and_remove_restores():
    model, x = tiny_wan(), wan_inputs()
    stock = run(model, x)
    originals = dict(model.attn_processors)
    plan = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1])
    dit_sparse.apply(model, plan, block_size=BLOCKS)
    model.set_attn_processor(SparseProcessor(plan, block_size=BLOCKS))
    with pytest.raises(AlreadyAppliedError, match=r"applied with dit_sparse\.apply\(\).*dit_sparse\.remove"):
        run(model, x)
    dit_sparse.remove(model)
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert torch.equal(run(model, x), stock)
    # The other order (apply over the one-line form) stays refused: tests/test_processor.py holds it.


def test_a_second_one_line_form_replaces_the_first():
    model, x = tiny_wan(), wan_inputs()
    stock = run(model, x)
    first = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1])
    second = SparsePlan.uniform(model, "diagonal", window=[0, 0, 1])
    dit_sparse.apply(model, second, block_size=BLOCKS)
    expected = run(model, x)
    dit_sparse.remove(model)
    model.set_attn_processor(SparseProcessor(first, block_size=BLOCKS))
    run(model, x)
    model.set_attn_processor(SparseProcessor(second, block_size=BLOCKS))
    assert torch.equal(run(model, x), expected)
    assert "window=[0, 0, 1]" in dit_sparse.summary(model)
    dit_sparse.remove(model)
    assert torch.equal(run(model, x), stock)
    assert not model._diffusers_hook.hooks and not model._forward_pre_hooks


def test_a_plan_applied_through_torch_compile_runs_on_the_compiled_model_like_eager():
    """torch.compile's backend="eager" runs dynamo's tracing (what meets the hooks and the processor) without
    inductor's code generation, which takes minutes on CPU; inductor gave the same output to 5e-7 when tried."""
    model, x = tiny_wan(), wan_inputs()
    stock = run(model, x)
    plan = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1])
    dit_sparse.apply(model, plan, block_size=BLOCKS)
    eager = run(model, x)
    dit_sparse.remove(model)
    compiled = torch.compile(model, backend="eager")
    dit_sparse.apply(compiled, plan, block_size=BLOCKS)
    with pytest.raises(AlreadyAppliedError):
        dit_sparse.apply(compiled, plan)
    torch.testing.assert_close(run(compiled, x), eager, rtol=1e-5, atol=1e-5)
    assert "WanTransformer3DModel (wan)" in dit_sparse.summary(compiled)
    dit_sparse.remove(compiled)
    assert not any(isinstance(p, SparseProcessor) for p in model.attn_processors.values())
    torch.testing.assert_close(run(compiled, x), stock, rtol=1e-5, atol=1e-5)


def test_the_one_line_form_binds_through_torch_compile_without_compiling():
    """The one-line form finds the transformer whose forward runs the attention; called through an OptimizedModule
    it binds the module torch.compile wraps. Here the wrapper runs the wrapped forward without compiling it (on CPU
    compiling is slow; the test above runs a compiled model), so only the wrapper's frame can name the model."""
    model, x = tiny_wan(), wan_inputs()
    plan = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1])
    dit_sparse.apply(model, plan, block_size=BLOCKS)
    eager = run(model, x)
    dit_sparse.remove(model)
    compiled = torch.compile(model)
    compiled.forward = model.forward  # the wrapped forward, not through the wrapped module's __call__
    compiled.set_attn_processor(SparseProcessor(plan, block_size=BLOCKS))
    assert torch.equal(run(compiled, x), eager)
    assert dit_sparse.summary(compiled).startswith("WanTransformer3DModel (wan)")
    dit_sparse.remove(compiled)
    assert not any(isinstance(p, SparseProcessor) for p in model.attn_processors.values())


def _wan_subclass(forward):
    from diffusers import WanTransformer3DModel

    class PassThroughWan(WanTransformer3DModel):
        pass

    PassThroughWan.forward = forward
    reference = tiny_wan(0)
    model = PassThroughWan.from_config(reference.config)
    model.load_state_dict(reference.state_dict())
    return model.eval(), reference


def _pass_on(self, *args, **kwargs):
    return super(type(self), self).forward(*args, **kwargs)


def _pass_on_after_hidden_states(self, hidden_states, *args, **kwargs):
    return super(type(self), self).forward(hidden_states, *args, **kwargs)


@pytest.mark.parametrize("forward", [_pass_on, _pass_on_after_hidden_states])
def test_a_subclass_whose_forward_passes_its_arguments_on_runs_the_plan(forward):
    model, reference = _wan_subclass(forward)
    x = wan_inputs()  # timestep 500: noise level 0.5, dense under this schedule (which needs the timestep)
    plan = SparsePlan.uniform(reference, "diagonal", window=[0, 1, 1]).with_schedule(dense_above=0.3)
    sparse = SparsePlan.uniform(reference, "diagonal", window=[0, 1, 1])
    expected = {}
    for name, p in (("dense", plan), ("sparse", sparse)):
        dit_sparse.apply(reference, p, block_size=BLOCKS)
        expected[name] = run(reference, x)
        dit_sparse.remove(reference)
    assert not torch.equal(expected["dense"], expected["sparse"])
    for name, p in (("dense", plan), ("sparse", sparse)):
        # The same plan, made for the subclass (plans name the class they were made for).
        own = replace(SparsePlan.uniform(model, "diagonal", window=[0, 1, 1]), schedule=p.schedule)
        dit_sparse.apply(model, own, block_size=BLOCKS)
        assert torch.equal(run(model, x), expected[name])
        positional = [x["hidden_states"], x["timestep"], x["encoder_hidden_states"]]
        with torch.no_grad():
            assert torch.equal(model(*positional, return_dict=False)[0], expected[name])
        dit_sparse.remove(model)
        model.set_attn_processor(SparseProcessor(own, block_size=BLOCKS))
        assert torch.equal(run(model, x), expected[name])
        dit_sparse.remove(model)


def test_a_subclass_called_with_arguments_its_parent_does_not_take_gets_one_clear_error():
    def forward(self, *args, latents=None, **kwargs):  # renames hidden_states: no signature finds it
        return super(type(self), self).forward(latents, *args, **kwargs)

    model, _ = _wan_subclass(forward)
    x = wan_inputs()
    dit_sparse.apply(model, SparsePlan.uniform(model, "diagonal", window=[0, 1, 1]), block_size=BLOCKS)
    x["latents"] = x.pop("hidden_states")
    with pytest.raises(TypeError, match=r"PassThroughWan\.forward's arguments and finds no hidden_states .* "
                                        r"WanTransformer3DModel\.forward's signature"):
        run(model, x)
