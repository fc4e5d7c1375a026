"""Shared test set-up.

Without CUDA, the Triton kernels run on CPU tensors through Triton's interpreter; that
must be switched on before anything imports triton, hence at the top of this file.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dalle3_fast.ops as ops  # noqa: E402
from dalle3_fast import _native  # noqa: E402

KERNEL_BACKENDS = ("cpu", "triton", "cuda")


def backend_device(name: str) -> torch.device:
    """Where a backend's tensors live: CUDA for the GPU backends when a GPU is present."""
    if name in ("cuda", "triton") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """Each non-reference backend; skipped, with the reason, where it is not live."""
    name = request.param
    if name not in ops.available_backends():
        pytest.skip(f"backend {name!r} is not live: {_native.why_not(name)}")
    return name


@pytest.fixture
def device(backend) -> torch.device:
    """The device of the tensors that `backend` runs on."""
    return backend_device(backend)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: as fast as two, and immune to an oversubscribed machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
