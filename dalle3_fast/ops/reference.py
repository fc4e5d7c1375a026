"""Plain PyTorch references for the fused ops: the ground truth, autograd for free.

Statistics and softmax are computed in float32 (float64 when the input is
float64) and the result is cast back to the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dalle3_fast.ops.layout import acc_dtype, memory_format, needs_grad


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, *, add=None, scale=None, shift=None, silu=True):
    B, C = x.shape[:2]
    cdt = acc_dtype(x.dtype)
    per_channel = (B, C) + (1,) * (x.dim() - 2)
    h = _as(x, cdt)
    if add is not None:
        h = h + _as(add, cdt).view(per_channel)
    y = F.group_norm(h, num_groups, _as(weight, cdt), _as(bias, cdt), eps)
    # Outside autograd the epilogue reuses group_norm's fresh output: one buffer instead of up to four
    # (each a pass over memory, and a large fresh one page-faults). Same values either way.
    inplace = not needs_grad(x, weight, bias, add, scale, shift)
    if scale is not None:
        s = _as(scale, cdt).view(per_channel)
        y = y.mul_(1 + s) if inplace else y * (1 + s)
    if shift is not None:
        t = _as(shift, cdt).view(per_channel)
        y = y.add_(t) if inplace else y + t
    if silu:
        y = F.silu(y, inplace=inplace)
    return _as(y.contiguous(memory_format=memory_format(x)), x.dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without its Python-side cost (~5 us a call) when it has that dtype already."""
    return t if t.dtype == dtype else t.to(dtype)


def cross_attention(q, k, v, key_lengths=None, *, scale=None):
    """softmax(q k^T * scale) v over keys [0, key_lengths[b]); layout (B, N, H, D).

    float64 runs the formula as written (the ground truth of the tests); other dtypes run
    PyTorch's fused scaled_dot_product_attention in float32, 2-3x faster on CPU than the
    formula, so the CPU dispatcher can fall back to it where our kernel loses.
    """
    cdt = acc_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if key_lengths is not None:
        L = k.shape[1]
        valid = torch.arange(L, device=q.device) < key_lengths.to(q.device).long()[:, None]  # (B, L)
        # Padding may hold anything (NaN, inf): replace it before any product reads it, so it
        # reaches neither the output nor the gradients (which are zero there).
        k, v = (t.masked_fill(~valid[:, :, None, None], 0) for t in (k, v))
    qh, kh, vh = (_as(t, cdt).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    if cdt != torch.float64:
        return _as(_sdpa(qh, kh, vh, key_lengths, scale).transpose(1, 2), q.dtype)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if key_lengths is None:
        p = torch.softmax(s, dim=-1)
    else:
        mask = valid.view(-1, 1, 1, L)
        s = s.masked_fill(~mask, float("-inf"))
        # A sample with no keys: give its rows finite scores, then zero them with the mask.
        s = s.masked_fill((key_lengths == 0).to(q.device).view(-1, 1, 1, 1), 0.0)
        p = torch.softmax(s, dim=-1) * mask
    out = torch.matmul(p, vh)
    return _as(out.transpose(1, 2), q.dtype)


def _sdpa(qh, kh, vh, key_lengths, scale):
    if key_lengths is None:
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    lengths = key_lengths.to(qh.device).long()
    L = kh.shape[2]
    # A sample with no keys attends to all of them, then gets zeros (not a softmax over nothing).
    mask = (torch.arange(L, device=qh.device) < torch.where(lengths > 0, lengths, L)[:, None]).view(-1, 1, 1, L)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out * (lengths > 0).to(out.dtype).view(-1, 1, 1, 1)


def attention(q, k, v, *, scale=None):
    return cross_attention(q, k, v, None, scale=scale)
