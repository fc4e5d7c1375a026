"""Launch configuration shared by the Triton kernels.

Under ``TRITON_INTERPRET=1`` (CPU tensors, used by the tests) kernels launch with one
fixed small config; on a GPU they are wrapped in ``triton.autotune``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dalle3_fast.ops.layout import acc_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def acc_tl_dtype(dtype: torch.dtype):
    """The accumulation dtype of ``layout.acc_dtype`` as a Triton type."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def autotune(kernel, configs, key, early_config_prune=None):
    """``triton.autotune(configs, key)(kernel)`` on a GPU; the bare kernel under the interpreter."""
    if INTERPRET:
        return kernel
    prune = {"early_config_prune": early_config_prune} if early_config_prune else None
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune)(kernel)
