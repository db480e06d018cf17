import pytest
from zoo_helpers import TINY

from dit_sparse.zoo.model import build_pipeline


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
