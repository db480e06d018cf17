"""The test of the adapter contract (dit_sparse/adapters/base.py): the four checks every model family passes, on a
tiny model built from its diffusers config (random weights). A family's adapter gives the processor its grid
(`grid`, from the transformer's arguments), its covered modules and their layers, and its attention math around
`attend` (`attention(attend, attn, hidden_states, ..., tokens=TokenLayout)`); these checks hold it to the stock
processors it replaces:

1. an all-dense plan gives the stock output, whole forward and every attention module's own output (text rows
   included), batch 1 and batch 2, padded text where the family has it;
2. `dit_sparse.remove` puts the very same processor objects back and the output is stock again;
3. a sparse plan changes the output by a measured nonzero amount at an executed density below 1;
4. the one-line form (one SparseProcessor object on every attention module) equals `dit_sparse.apply`.
"""

from __future__ import annotations

import torch

import dit_sparse
from dit_sparse import SparsePlan, SparseProcessor
from dit_sparse.binding import attention_modules

BLOCKS = (16, 16)
WINDOW = [0, 1, 1]


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def processors(model) -> dict:
    return {name: module.processor for name, module in attention_modules(model).items()}


def module_outputs(model, inputs) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """The forward's output and, per attention module, every tensor it returned (video and text parts)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in attention_modules(model).items():
        def hook(module, args, output, name=name):
            parts = output if isinstance(output, tuple) else (output,)
            seen.setdefault(name, []).extend(p.detach().clone() for p in parts)

        handles.append(module.register_forward_hook(hook))
    try:
        out = run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def check_dense_plan_equals_stock_and_remove_restores(build, inputs_list, tol=1e-6):
    model = build()
    originals = processors(model)
    stock = [module_outputs(model, x) for x in inputs_list]
    processor = dit_sparse.apply(model, SparsePlan.uniform(model, "dense"))
    assert all(isinstance(p, SparseProcessor) for p in processors(model).values())
    for x, (stock_out, stock_modules) in zip(inputs_list, stock):
        out, modules = module_outputs(model, x)
        assert max_diff(out, stock_out) <= tol
        assert modules.keys() == stock_modules.keys()
        for name, parts in modules.items():
            assert len(parts) == len(stock_modules[name]), name
            for part, ref in zip(parts, stock_modules[name]):
                assert part.shape == ref.shape and max_diff(part, ref) <= tol, name
    assert processor.stats.calls == len(inputs_list) * processor.plan.model.num_layers
    dit_sparse.remove(model)
    restored = processors(model)
    assert restored.keys() == originals.keys()
    assert all(restored[name] is originals[name] for name in originals)
    for x, (stock_out, _) in zip(inputs_list, stock):
        assert torch.equal(run(model, x), stock_out)


def check_sparse_plan_changes_output(build, inputs) -> float:
    """Returns the relative L2 change of the output under a small diagonal window.

    First a window covering the whole grid: the sparse path (layout, executor, text merged through the LSE, padding)
    runs at density 1 and must give the stock output up to float rounding.
    """
    model = build()
    stock = run(model, inputs)
    processor = dit_sparse.apply(model, SparsePlan.uniform(model, "diagonal", window=[99, 99, 99]), block_size=BLOCKS)
    assert max_diff(run(model, inputs), stock) <= 1e-5
    assert processor.stats.executed_density == 1
    dit_sparse.remove(model)
    processor = dit_sparse.apply(model, SparsePlan.uniform(model, "diagonal", window=WINDOW), block_size=BLOCKS)
    out = run(model, inputs)
    rel = float((out - stock).norm() / stock.norm())
    assert torch.isfinite(out).all()
    assert 0 < rel < 1
    assert 0 < processor.stats.executed_density < 1
    assert processor.stats.calls == processor.plan.model.num_layers
    return rel


def set_on_every_module(model, processor):
    """The one-line form for models without set_attn_processor (Mochi)."""
    for module in attention_modules(model).values():
        module.processor = processor


def check_one_line_form_equals_apply(build, inputs, install=None):
    install = install or (lambda model, processor: model.set_attn_processor(processor))
    model = build()
    stock_types = {name: type(p) for name, p in processors(model).items()}
    plan = SparsePlan.uniform(model, "diagonal", window=WINDOW)
    dit_sparse.apply(model, plan, block_size=BLOCKS)
    applied = run(model, inputs)
    dit_sparse.remove(model)
    one = SparseProcessor(plan, block_size=BLOCKS)
    install(model, one)
    assert torch.equal(run(model, inputs), applied)
    assert one.stats.calls == plan.model.num_layers
    dit_sparse.remove(model)
    # After the one-line form, remove puts the family's stock processors back (fresh objects of the same classes).
    assert {name: type(p) for name, p in processors(model).items()} == stock_types
