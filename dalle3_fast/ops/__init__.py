"""The fused ops: the only door from models to kernels.

    group_norm_silu(x, weight, bias, num_groups, eps=1e-5, *, add=None, scale=None, shift=None, silu=True)
    attention(q, k, v, *, scale=None)                      # (B, N, H, D), non-causal
    cross_attention(q, k, v, key_lengths, *, scale=None)   # keys (B, L, H, D), L <= 512

Every call is validated once here, then runs on the backend that ``dispatch.resolve``
picks (or the one forced by ``use_backend``). The "reference" backend is plain
PyTorch; the others are the torch operators of ``library`` (C++/CUDA or Triton kernels),
each with its own backward.
"""
from __future__ import annotations

import torch

from dalle3_fast.ops import checks, library, reference
from dalle3_fast.ops.checks import MAX_KEY_TOKENS, SUPPORTED_HEAD_DIMS
from dalle3_fast.ops.dispatch import BACKENDS, available_backends, forced_backend, resolve, use_backend
from dalle3_fast.ops.layout import dense, memory_format

__all__ = [
    "group_norm_silu", "attention", "cross_attention",
    "use_backend", "available_backends", "forced_backend", "BACKENDS", "reference",
    "SUPPORTED_HEAD_DIMS", "MAX_KEY_TOKENS", "memory_format",
]


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, *, add=None, scale=None, shift=None, silu=True):
    """GroupNorm (statistics in fp32) [+ modulation] [+ SiLU] in one pass.

    y = silu(GN(x + add) * (1 + scale) + shift), with GN's affine ``weight``/``bias``.
    ``x`` is (B, C, H, W) contiguous or channels_last, or (B, C, L); ``add``, ``scale``,
    ``shift`` are (B, C). The output keeps the memory format of ``x``.
    """
    checks.check_group_norm_silu(x, weight, bias, num_groups, eps, add, scale, shift)
    C = x.shape[1]
    if weight is None:
        weight = x.new_ones(C)
    if bias is None:
        bias = x.new_zeros(C)
    backend = resolve("group_norm_silu", x.device, (x, num_groups, silu, add, scale, shift))
    if backend == "reference":
        return reference.group_norm_silu(x, weight, bias, num_groups, eps, add=add, scale=scale, shift=shift, silu=silu)
    y, _, _ = library.kernels(backend).group_norm_silu_fwd(
        dense(x), weight.contiguous(), bias.contiguous(),
        None if add is None else add.contiguous(),
        None if scale is None else scale.contiguous(),
        None if shift is None else shift.contiguous(),
        num_groups, float(eps), bool(silu))
    return y


def _attention(op, q, k, v, key_lengths, scale):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve(op, q.device, (q, k, key_lengths))
    if backend == "reference":
        return reference.cross_attention(q, k, v, key_lengths, scale=scale)
    out, _ = library.kernels(backend).attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), key_lengths, scale)
    return out


def attention(q, k, v, *, scale=None):
    """Non-causal multi-head self-attention, flash-attn layout (B, N, H, D); scale defaults to D**-0.5."""
    checks.check_attention("attention", q, k, v)
    return _attention("attention", q, k, v, None, scale)


def cross_attention(q, k, v, key_lengths, *, scale=None):
    """Attention from q (B, N, H, D) to keys/values (B, L, H, D), L <= 512.

    Keys at index >= key_lengths[b] (int32, (B,)) are ignored; a sample with length 0
    gets zeros.
    """
    checks.check_attention("cross_attention", q, k, v, key_lengths)
    if not isinstance(key_lengths, torch.Tensor):
        raise ValueError("cross_attention: `key_lengths` must be an int32 tensor of shape (B,)")
    return _attention("cross_attention", q, k, v, key_lengths.contiguous(), scale)
