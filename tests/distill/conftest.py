import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_helpers import FAST_TEACHER  # noqa: E402

from dit_sparse.zoo.model import build_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    build_pipeline(FAST_TEACHER, seed=0).save_pretrained(str(path))
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(monkeypatch):
    """Every Distiller builds its own Accelerator; accelerate keeps process-wide singletons between them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    del PartialState


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)
