"""Backend selection for the fused ops.

Backends: "reference" (plain PyTorch, always live), "cpu" (C++ kernels in
``dalle3_fast._C``), "cuda" (CUDA C++ kernels in ``dalle3_fast._C``) and
"triton". ``use_backend`` forces one for a block of code in the calling thread;
otherwise each call takes the fastest live backend for its tensors' device.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

from dalle3_fast import _native
from dalle3_fast.ops import cpu_policy

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Preference per op on a CUDA device, fastest first.
_CUDA_PREFERENCE = {
    "group_norm_silu": ("cuda", "triton"),
    "attention": ("triton", "cuda"),
    "cross_attention": ("cuda", "triton"),
}


class _Forced(threading.local):
    """The stack of backends forced by ``use_backend``, one per thread.

    Thread-local like torch's own grad mode and autocast state: torch.compile traces and
    guards a threading.local attribute, whereas it cannot trace ``ContextVar.get``, so a
    contextvars-based switch would break every compiled graph that calls an op.
    """

    def __init__(self):
        self.stack: tuple[str, ...] = ()


_forced = _Forced()


def _triton_live() -> bool:
    if os.environ.get("DALLE3_FAST_DISABLE_TRITON") == "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """The backends that can run in this process, in the order of ``BACKENDS``."""
    _report()
    return list(_live_backends())


@functools.cache
def _live_backends() -> tuple[str, ...]:
    live = ["reference"]
    if _native.has_cpu_kernels():
        live.append("cpu")
    if _triton_live():
        live.append("triton")
    if _native.has_cuda_kernels() and torch.cuda.is_available():
        live.append("cuda")
    return tuple(live)


def _report() -> None:
    """Log the live backends once per process (a warning if the extension failed to load)."""
    _native.report_once(list(_live_backends()))


@contextlib.contextmanager
def use_backend(name: str):
    """Force backend ``name`` for every fused op this thread calls inside the block.

    Other threads keep their own choice: two threads may force different backends at once.
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    live = _live_backends()
    if name not in live:
        raise RuntimeError(
            f"use_backend: backend {name!r} is not live in this process (live: {', '.join(live)}); "
            + _native.why_not(name)
        )
    outer = _forced.stack
    _forced.stack = outer + (name,)
    try:
        yield
    finally:
        _forced.stack = outer


def forced_backend() -> str | None:
    """The backend forced in this thread by the innermost ``use_backend`` block, or None."""
    stack = _forced.stack
    return stack[-1] if stack else None


def resolve(op: str, device, inputs: tuple = ()) -> str:
    """The backend that runs ``op`` for tensors on ``device``.

    ``inputs`` (the op's leading arguments, see ``cpu_policy.prefers_kernel``) lets a CPU call
    take the plain-PyTorch path at the shapes where that is faster than our kernel.
    """
    name = forced_backend()
    kind = device.type  # read once: each read builds the string again (~1 us on this hot path)
    if name is not None:
        if name in ("cuda",) and kind != "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' was forced but the tensors are on {device}; move them to a GPU")
        if name == "cpu" and kind != "cpu":
            raise RuntimeError(f"{op}: backend 'cpu' was forced but the tensors are on {device}; use .cpu() or another backend")
        if name == "triton" and kind != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return name
    if kind == "cuda":
        live = _live_backends()
        for candidate in _CUDA_PREFERENCE[op]:
            if candidate in live:
                return candidate
    elif kind == "cpu" and _native.has_cpu_kernels():
        # Where PyTorch's own path beats our kernel (small tiles, dense self-attention) the
        # reference (eager GroupNorm, SDPA) is the faster choice, not a fallback.
        return "cpu" if cpu_policy.prefers_kernel(op, *inputs) else "reference"
    if not torch.compiler.is_compiling():
        _report()  # the first fallback to the reference says why no kernel runs
    return "reference"
