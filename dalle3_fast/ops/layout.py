"""Dtype, memory-format and autograd rules every backend of the fused ops follows."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, softmax and accumulators: float64 for float64 inputs, float32 for all others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D channels-last tensor that is not also contiguous, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense(x: torch.Tensor) -> torch.Tensor:
    """x if it is dense in its own memory format (contiguous or channels_last), else a contiguous copy."""
    return x if x.is_contiguous(memory_format=memory_format(x)) else x.contiguous()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
