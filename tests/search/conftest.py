import pytest
from search_helpers import TINY_TEST_MODEL, synthetic_stats


@pytest.fixture
def stats():
    return synthetic_stats()


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny tensor ops; on a CPU shared with other jobs, one thread is far faster (thread
    wake-ups dominate small ops under contention)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_pipe():
    from dit_sparse.zoo.model import build_pipeline

    pipe = build_pipeline(TINY_TEST_MODEL, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe
