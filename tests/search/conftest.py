import pytest
from search_helpers import synthetic_stats


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
