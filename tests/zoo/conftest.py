import pytest

from dit_sparse.zoo.model import TinyShapesConfig, build_pipeline

TINY = TinyShapesConfig(num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, freq_dim=16,
                        text_dim=16, text_layers=1, text_heads=2, text_ff=32)


@pytest.fixture
def tiny_pipe():
    """A randomly initialised tiny TinyShapesPipeline (built from config, nothing downloaded)."""
    pipe = build_pipeline(TINY, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
