"""Launch configuration shared by the Triton kernels.

Under ``TRITON_INTERPRET=1`` (CPU tensors, used by the tests) kernels launch with one
fixed small config; on a GPU they are wrapped in ``triton.autotune``.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def autotune(kernel, configs, key):
    """``triton.autotune(configs, key)(kernel)`` on a GPU; the bare kernel under the interpreter."""
    if INTERPRET:
        return kernel
    return triton.autotune(configs=configs, key=key)(kernel)
