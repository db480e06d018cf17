"""Shared pieces of the demo tests: one backend (tiny-shapes, trained weights or the untrained fallback), small
requests that keep the CPU work to a second or so, and torch on one thread while these tests run."""

import importlib.util
import os

import pytest
import torch

GRADIO_MISSING = importlib.util.find_spec("gradio") is None


@pytest.fixture(autouse=True)
def _needs_gradio():
    """The demo needs gradio: CI installs it (the test extra), so there a missing gradio fails the tests."""
    if GRADIO_MISSING:
        message = "gradio is not installed: pip install -e '.[test]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# prompt, seed, steps, guidance, resolution, frames: 3 steps of 4 frames at 32x32 (512 tokens, where the shipped
# plan's diagonal windows are sparser than dense; 3 steps, because the plan runs the first dense, refreshes its
# re-scaled heads densely at the second and runs them sparse only from the third)
SMALL = ["a red circle moving right on a dark background", 0, 3, 4.5, "32x32", 4]
# plan source, shipped plan, plan file, strategy, density knob
SHIPPED_PLAN = ["shipped plan", "tiny-shapes.plan.json", None, None, 0.25]


@pytest.fixture
def small():
    """The page's inputs for a small request with the shipped plan, in the order of the compare endpoint."""
    return SMALL + SHIPPED_PLAN


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def backend():
    from dit_sparse.demo.backend import DemoBackend

    b = DemoBackend()
    yield b
    b.close()


@pytest.fixture(scope="session")
def callbacks(backend):
    from dit_sparse.demo.app import Callbacks

    return Callbacks(backend)
