"""The C++/CUDA kernels of ``dalle3_fast._C``, registered as ``torch.ops.dalle3_fast_C``.

The same schema serves the CPU and the CUDA kernels; the dispatcher picks by device.
"""
from __future__ import annotations

import torch

from dalle3_fast import _native  # noqa: F401  (loads the library that registers the ops)


def _ops():
    return torch.ops.dalle3_fast_C


def group_norm_silu_fwd(x, weight, bias, add, scale, shift, num_groups, eps, silu):
    return _ops().group_norm_silu_fwd(x, weight, bias, add, scale, shift, num_groups, eps, silu)


def group_norm_silu_bwd(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu):
    return _ops().group_norm_silu_bwd(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu)


def attention_fwd(q, k, v, key_lengths, scale):
    return _ops().attention_fwd(q, k, v, key_lengths, scale)


def attention_bwd(grad_out, q, k, v, out, lse, key_lengths, scale):
    return _ops().attention_bwd(grad_out, q, k, v, out, lse, key_lengths, scale)
