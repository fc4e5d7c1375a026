"""Does our CPU kernel beat plain PyTorch for this call? A choice made from the shapes.

The C++ kernels (csrc/cpu) win where each task has enough work to amortise their fixed
costs; at small tiles eager GroupNorm + SiLU and PyTorch's fused
scaled_dot_product_attention (what the "reference" backend runs) are faster. The rules
below were read off measurements at every op shape of the shipped tiny U-Net, SD1.5 and
SDXL (fp32 and bf16, 1 and 2 threads, AVX2 without AVX-512); the table is
cpu_policy_measurements.json next to this file, and tests/test_cpu_policy.py checks
that every clear-cut row of it is routed to its faster path.

- group_norm_silu on channels_last maps (how the U-Nets run them), where eager GroupNorm
  is 1.5-3x slower than on NCHW: the kernel forward whenever it fuses SiLU or a
  modulation, and for plain GroupNorm from 8x8 (in bf16 with over 256 channels from 16x16); with the
  backward from 16x16, or from 8x8 when there are at most 256 channels.
- group_norm_silu on contiguous NCHW maps: the kernel only when it fuses something, from
  8x8 forward (4x4 with a modulation, whose eager add is one more pass), from 32x32 with
  the backward; plain GroupNorm is one ATen kernel already.
- cross_attention (per-sample key lengths): the kernel; it skips the padded keys that
  SDPA computes and masks (1.2-1.9x at every measured shape forward, 1.07-1.6x backward).
- attention (dense self-attention): SDPA, except float32 inference at <= SELF_MAX_QUERIES
  queries (the tiny U-Net's 8x8 and 4x4 levels, SD1.5's 8x8), where the kernel measured
  1.0-1.4x; at larger shapes it measured 0.80-0.88x, in bf16 0.7-1.0x.
"""
from __future__ import annotations

import torch

from dalle3_fast.ops.layout import memory_format, needs_grad

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
                                         needs_grad(x, *modulation),
                                         memory_format(x) == torch.channels_last, x.dtype)
    if op in ("attention", "cross_attention"):
        q, k, key_lengths = inputs
        return attention_prefers_kernel(tuple(q.shape), tuple(k.shape), key_lengths is not None, q.dtype,
                                        needs_grad(q, k))
    raise ValueError(f"cpu_policy: unknown op {op!r}")


def group_norm_prefers_kernel(shape: tuple[int, ...], silu: bool, modulated: bool, grad: bool = False,
                              channels_last: bool = False, dtype: torch.dtype = torch.float32) -> bool:
    channels, positions = shape[1], 1
    for n in shape[2:]:
        positions *= n
    if not channels_last:
        if grad:
            return (silu or modulated) and positions >= 1024
        return (silu or modulated) and positions >= 64 or modulated and positions >= 16
    if grad:  # from 8x8 only where a group's channels are few
        return positions >= 256 or positions >= 64 and channels <= 256
    if silu or modulated:
        return True
    return positions >= (64 if dtype == torch.float32 or channels <= 256 else 256)


def attention_prefers_kernel(q_shape: tuple[int, ...], k_shape: tuple[int, ...], masked: bool,
                             dtype: torch.dtype = torch.float32, grad: bool = False) -> bool:
    if masked:
        return True
    return dtype == torch.float32 and not grad and q_shape[1] <= SELF_MAX_QUERIES


def row_prefers_kernel(row: dict) -> bool:
    """The decision for one row of cpu_policy_measurements.json (its shape, flags, dtype and layout)."""
    grad = row["backward"]
    if row["op"] == "group_norm_silu":
        return group_norm_prefers_kernel(tuple(row["shape"]), row["silu"], row["add"], grad,
                                         row.get("layout", "nchw") == "channels_last", getattr(torch, row["dtype"]))
    B, N, H, D = row["shape"]
    return attention_prefers_kernel((B, N, H, D), (B, row["keys"], H, D), row["op"] == "cross_attention",
                                    getattr(torch, row["dtype"]), grad)
