"""Does our CPU kernel beat plain PyTorch for this call? A choice made from the shapes.

The C++ kernels (csrc/cpu) win where each task has enough work to amortise their fixed
costs; at small tiles eager GroupNorm + SiLU and PyTorch's fused
scaled_dot_product_attention (what the "reference" backend runs) are faster. The rules
below were read off measurements at every op shape of the shipped tiny U-Net, SD1.5 and
SDXL (fp32 and bf16, 1 and 2 threads, AVX2 without AVX-512); the table is
cpu_policy_measurements.json next to this file, and tests/test_cpu_policy.py checks
that every clear-cut row of it is routed to its faster path.

- group_norm_silu: the kernel when it fuses something (SiLU or a modulation) and every
  channel has at least GN_MIN_POSITIONS positions (GN_MIN_POSITIONS_GRAD when autograd
  will run the backward, which loses at 16x16). Plain GroupNorm is one ATen kernel
  already, and below 16x16 the per-channel loops are too short.
- cross_attention (per-sample key lengths): the kernel; it skips the padded keys that
  SDPA computes and masks (1.2-1.9x at every measured shape forward, 1.07-1.6x backward).
- attention (dense self-attention): SDPA, except float32 inference at <= SELF_MAX_QUERIES
  queries (the tiny U-Net's 8x8 and 4x4 levels, SD1.5's 8x8), where the kernel measured
  1.0-1.4x; at larger shapes it measured 0.80-0.88x, in bf16 0.7-1.0x.
"""
from __future__ import annotations

import torch

GN_MIN_POSITIONS = 256
GN_MIN_POSITIONS_GRAD = 1024
SELF_MAX_QUERIES = 64


def prefers_kernel(op: str, *inputs) -> bool:
    """True when our CPU kernel is the faster path for ``op`` on these inputs.

    inputs: group_norm_silu: (x, num_groups, silu, add, scale, shift); attention and
    cross_attention: (q, k, key_lengths), layout (B, N, H, D). No inputs: True (the kernel).
    """
    if not inputs:
        return True
    if op == "group_norm_silu":
        x, _num_groups, silu, add, scale, shift = inputs
        modulation = [t for t in (add, scale, shift) if t is not None]
        return group_norm_prefers_kernel(tuple(x.shape), bool(silu), bool(modulation),
                                         _needs_grad(x, *modulation))
    if op in ("attention", "cross_attention"):
        q, k, key_lengths = inputs
        return attention_prefers_kernel(tuple(q.shape), tuple(k.shape), key_lengths is not None, q.dtype,
                                        _needs_grad(q, k))
    raise ValueError(f"cpu_policy: unknown op {op!r}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def group_norm_prefers_kernel(shape: tuple[int, ...], silu: bool, modulated: bool, grad: bool = False) -> bool:
    positions = 1
    for n in shape[2:]:
        positions *= n
    return (silu or modulated) and positions >= (GN_MIN_POSITIONS_GRAD if grad else GN_MIN_POSITIONS)


def attention_prefers_kernel(q_shape: tuple[int, ...], k_shape: tuple[int, ...], masked: bool,
                             dtype: torch.dtype = torch.float32, grad: bool = False) -> bool:
    if masked:
        return True
    return dtype == torch.float32 and not grad and q_shape[1] <= SELF_MAX_QUERIES
