"""The fused ops as torch custom ops: one schema each, a fake impl, autograd once.

Each op takes the backend name as its last argument; the public functions in
``dalle3_fast.ops`` resolve it. The forward ops also return what the backward
needs (GroupNorm mean/rstd, attention log-sum-exp), so torch.compile and
torch.export see exactly one node per call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dalle3_fast.ops import kernels

# ---------------------------------------------------------------- GroupNorm + SiLU


@torch.library.custom_op("dalle3_fast::group_norm_silu_fwd", mutates_args=())
def group_norm_silu_fwd(
    x: Tensor, weight: Tensor, bias: Tensor, add: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], num_groups: int, eps: float, silu: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.get(backend).group_norm_silu_fwd(x, weight, bias, add, scale, shift, num_groups, eps, silu)


@group_norm_silu_fwd.register_fake
def _(x, weight, bias, add, scale, shift, num_groups, eps, silu, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("dalle3_fast::group_norm_silu_bwd", mutates_args=())
def group_norm_silu_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, add: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], mean: Tensor, rstd: Tensor, num_groups: int, silu: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx, dweight, dbias, dadd, dscale, dshift (the last three (B, C), zeros if the input was None)."""
    return kernels.get(backend).group_norm_silu_bwd(
        grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu)


@group_norm_silu_bwd.register_fake
def _(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu, backend):
    B, C = x.shape[:2]
    per_sample = x.new_empty((B, C))
    return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias),
            torch.empty_like(per_sample), torch.empty_like(per_sample), torch.empty_like(per_sample))


def _gn_setup(ctx, inputs, output):
    x, weight, bias, add, scale, shift, num_groups, eps, silu, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.backend = num_groups, silu, backend


def _gn_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dadd, dscale, dshift = group_norm_silu_bwd(
        grad_y.contiguous(memory_format=_memory_format(x)), x, weight, bias, add, scale, shift, mean, rstd,
        ctx.num_groups, ctx.silu, ctx.backend)
    return (dx, dw, db,
            dadd if add is not None else None,
            dscale if scale is not None else None,
            dshift if shift is not None else None,
            None, None, None, None)


group_norm_silu_fwd.register_autograd(_gn_backward, setup_context=_gn_setup)


def _memory_format(x: Tensor):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------- attention
# Self-attention is the case key_lengths=None: every key is valid.


@torch.library.custom_op("dalle3_fast::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_lengths: Optional[Tensor], scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns out (B, N, H, D) and the softmax log-sum-exp (B, H, N) in float32 (-inf for rows with no keys)."""
    return kernels.get(backend).attention_fwd(q, k, v, key_lengths, scale)


@attention_fwd.register_fake
def _(q, k, v, key_lengths, scale, backend):
    B, N, H, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty((B, H, N), dtype=lse_dtype)


@torch.library.custom_op("dalle3_fast::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_lengths: Optional[Tensor], scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.get(backend).attention_bwd(grad_out, q, k, v, out, lse, key_lengths, scale)


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, key_lengths, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup(ctx, inputs, output):
    q, k, v, key_lengths, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths)
    ctx.scale, ctx.backend = scale, backend


def _attn_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out.contiguous(), q, k, v, out, lse, key_lengths, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)
