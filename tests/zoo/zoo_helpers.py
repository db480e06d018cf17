"""Shared by the zoo tests (a plain module with a unique name: `from conftest import` is ambiguous once another
folder's conftest.py is loaded, as when tests/zoo and tests/kernels are named on one command line)."""

from dit_sparse.zoo.model import TinyShapesConfig

TINY = TinyShapesConfig(num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, freq_dim=16,
                        text_dim=16, text_layers=1, text_heads=2, text_ff=32)
