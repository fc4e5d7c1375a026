"""Backend selection for the fused ops.

Backends: "reference" (plain PyTorch, always live), "cpu" (C++ kernels in
``dalle3_fast._C``), "cuda" (CUDA C++ kernels in ``dalle3_fast._C``) and
"triton". ``use_backend`` forces one for a block of code; otherwise each call
takes the fastest live backend for its tensors' device.
"""
from __future__ import annotations

import contextlib
import functools
import os

from dalle3_fast import _native
from dalle3_fast.ops import cpu_policy

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Preference per op on a CUDA device, fastest first.
_CUDA_PREFERENCE = {
    "group_norm_silu": ("cuda", "triton"),
    "attention": ("triton", "cuda"),
    "cross_attention": ("cuda", "triton"),
}

_forced: list[str] = []


def _triton_live() -> bool:
    if os.environ.get("DALLE3_FAST_DISABLE_TRITON") == "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """The backends that can run in this process, in the order of ``BACKENDS``."""
    return list(_live_backends())


@functools.cache
def _live_backends() -> tuple[str, ...]:
    import torch

    live = ["reference"]
    if _native.has_cpu_kernels():
        live.append("cpu")
    if _triton_live():
        live.append("triton")
    if _native.has_cuda_kernels() and torch.cuda.is_available():
        live.append("cuda")
    return tuple(live)


@contextlib.contextmanager
def use_backend(name: str):
    """Force backend ``name`` for every fused op called inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    live = _live_backends()
    if name not in live:
        raise RuntimeError(
            f"use_backend: backend {name!r} is not live in this process (live: {', '.join(live)}); "
            + _native.why_not(name)
        )
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def forced_backend() -> str | None:
    return _forced[-1] if _forced else None


def resolve(op: str, device, inputs: tuple = ()) -> str:
    """The backend that runs ``op`` for tensors on ``device``.

    ``inputs`` (the op's leading arguments, see ``cpu_policy.prefers_kernel``) lets a CPU call
    take the plain-PyTorch path at the shapes where that is faster than our kernel.
    """
    name = forced_backend()
    if name is not None:
        if name in ("cuda",) and device.type != "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' was forced but the tensors are on {device}; move them to a GPU")
        if name == "cpu" and device.type != "cpu":
            raise RuntimeError(f"{op}: backend 'cpu' was forced but the tensors are on {device}; use .cpu() or another backend")
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return name
    if device.type == "cuda":
        live = _live_backends()
        for candidate in _CUDA_PREFERENCE[op]:
            if candidate in live:
                return candidate
        return "reference"
    if device.type == "cpu" and _native.has_cpu_kernels() and cpu_policy.prefers_kernel(op, *inputs):
        return "cpu"
    return "reference"
