"""Test configuration: Triton in interpreter mode without a GPU, NaN-poisoned allocations."""

from __future__ import annotations

import os

import torch

# Must happen before any module that defines Triton kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    # Only plain tensors: FakeTensor/meta tensors (torch.compile, opcheck) have no data to poison.
    if type(t) is torch.Tensor and t.is_floating_point() and t.numel() and t.device.type != "meta":
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_poison_empty(monkeypatch):
    """``torch.empty``/``empty_like`` return NaN-filled float tensors, so unwritten outputs fail."""

    def empty(*args, **kwargs):
        t = _real_empty(*args, **kwargs)
        return _poisoned(t)

    def empty_like(*args, **kwargs):
        t = _real_empty_like(*args, **kwargs)
        return _poisoned(t)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny inputs: fastest, and no oversubscription on busy CI)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
