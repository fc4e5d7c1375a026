"""Loads the native extension ``dalle3_fast._C`` if it was built.

Import never fails because the extension is missing: the ops fall back to Triton and
the PyTorch reference. ``dalle3_fast.ops.dispatch`` reports the live backends once,
when it first works them out. Of the package this module imports only ``op_limits`` (which
imports nothing).
"""
from __future__ import annotations

import logging
import os
import warnings

from dalle3_fast import op_limits

log = logging.getLogger("dalle3_fast")

_C = None
_load_error: str | None = None
_reported = False

if os.environ.get("DALLE3_FAST_NO_NATIVE") == "1":
    _load_error = "DALLE3_FAST_NO_NATIVE=1 is set"
else:
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        from dalle3_fast import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # not built: a pure-Python install
        _C = None
        _load_error = f"the native extension is not built ({exc}); reinstall with `make install`"


def limit(name: str):
    """``SUPPORTED_HEAD_DIMS`` (tuple of int) or ``MAX_KEY_TOKENS`` (int), as compiled into the kernels.

    The values are written in ``dalle3_fast/op_limits.py``; a built extension exports those it was
    compiled with (csrc/op_limits.h is generated from that file), a build without one reads the file.
    """
    if _C is not None:
        return getattr(_C, name)
    return getattr(op_limits, name)


def has_cpu_kernels() -> bool:
    return _C is not None


# Read once: torch.compile cannot trace a call into the extension module.
_HAS_CUDA = _C is not None and bool(_C.has_cuda())


def has_cuda_kernels() -> bool:
    return _HAS_CUDA


def why_not(backend: str) -> str:
    if backend == "cpu":
        return _load_error or "unknown reason"
    if backend == "cuda":
        if _C is None:
            return _load_error or "unknown reason"
        if not _HAS_CUDA:
            return "the extension was built without CUDA (torch had no CUDA or nvcc was missing at build time)"
        return "no CUDA device is visible"
    if backend == "triton":
        return "Triton is not importable, or there is no CUDA device (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"
    return ""


def report_once(live: list[str]) -> None:
    """Log, once per process, which backends are live; warn when the extension failed to load."""
    global _reported
    if _reported:
        return
    _reported = True
    msg = "dalle3_fast backends live: " + ", ".join(live)
    if _C is None and os.environ.get("DALLE3_FAST_NO_NATIVE") != "1":
        warnings.warn(f"{msg}; {_load_error}", RuntimeWarning, stacklevel=3)
    else:
        log.info(msg)
