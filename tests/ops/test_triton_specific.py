"""Triton-only concerns: split reductions, strided views, key-length clamping, every head dim,
and the compiled (sm_90) kernels. Backend-vs-reference coverage of the public API is in
test_ops.py.

The kernels run on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported);
without it and without CUDA these tests skip. The sm_90 compile test needs no GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dalle3_fast.ops as ops
from dalle3_fast.ops import reference

_LIVE = "triton" in ops.available_backends()
needs_triton = pytest.mark.skipif(not _LIVE, reason="Triton needs CUDA, or TRITON_INTERPRET=1 for CPU tensors")
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float64 runs in float64, but the softmax scale reaches a compiled kernel as an fp32 scalar.
_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.float64: 1e-12 if _DEVICE == "cpu" else 1e-6}


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _kernels():
    from dalle3_fast.ops import triton as triton_kernels

    return triton_kernels


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=_DEVICE, dtype=dtype)


def _attention_reference(q, k, v, lengths, scale, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference.cross_attention(*leaves, lengths, scale=scale)
    out.backward(grad_out.double())
    return out, [t.grad for t in leaves]


# ---------------------------------------------------------------- attention


@needs_triton
@pytest.mark.parametrize("head_dim", ops.SUPPORTED_HEAD_DIMS)
def test_attention_every_head_dim_fwd_bwd_fp32(head_dim):
    kernels = _kernels()
    q, k, v = (_randn(1, 19, 1, head_dim) for _ in range(3))  # 19: not a multiple of any block
    grad_out = _randn(1, 19, 1, head_dim)
    scale = head_dim ** -0.5
    out, lse = kernels.attention_fwd(q, k, v, None, scale)
    grads = kernels.attention_bwd(grad_out, q, k, v, out, lse, None, scale)
    ref, ref_grads = _attention_reference(q, k, v, None, scale, grad_out)
    assert _rel(out, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 1e-5
    ref_lse = torch.logsumexp(torch.einsum("bnhd,blhd->bhnl", q.double(), k.double()) * scale, -1)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)


@needs_triton
def test_attention_reads_strided_views_without_copies():
    kernels = _kernels()
    qkv = _randn(2, 33, 3, 2, 64)  # packed projections: q, k, v are non-contiguous views
    q, k, v = qkv.unbind(2)
    grad_out = _randn(2, 33, 2, 64).transpose(1, 2).contiguous().transpose(1, 2)  # (B,N,H,D), H-major memory
    assert not q.is_contiguous() and not grad_out.is_contiguous()
    out, lse = kernels.attention_fwd(q, k, v, None, 0.125)
    dq, dk, dv = kernels.attention_bwd(grad_out, q, k, v, out, lse, None, 0.125)
    ref, (rdq, rdk, rdv) = _attention_reference(q, k, v, None, 0.125, grad_out)
    assert _rel(out, ref) < 1e-5
    assert max(_rel(dq, rdq), _rel(dk, rdk), _rel(dv, rdv)) < 1e-5


@needs_triton
def test_attention_clamps_lengths_and_zeroes_rows_without_keys():
    kernels = _kernels()
    B, N, L, H, D = 3, 21, 17, 2, 32
    q, grad_out = _randn(B, N, H, D), _randn(B, N, H, D)
    k, v = _randn(B, L, H, D), _randn(B, L, H, D)
    raw = torch.tensor([-3, L + 4, 6], dtype=torch.int32, device=_DEVICE)  # the GPU kernels clamp to [0, L]
    clamped = torch.tensor([0, L, 6], dtype=torch.int32, device=_DEVICE)
    out, lse = kernels.attention_fwd(q, k, v, raw, D ** -0.5)
    grads = kernels.attention_bwd(grad_out, q, k, v, out, lse, raw, D ** -0.5)
    for t in (out, lse[1:], *grads):
        assert torch.isfinite(t).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all()
    for g in grads:
        assert torch.equal(g[0], torch.zeros_like(g[0]))
    dq, dk, dv = grads
    assert torch.equal(dk[2, 6:], torch.zeros_like(dk[2, 6:])) and torch.equal(dv[2, 6:], torch.zeros_like(dv[2, 6:]))
    ref, ref_grads = _attention_reference(q, k, v, clamped, D ** -0.5, grad_out)
    assert _rel(out, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_attention_public_api_cross_attention_dtypes(dtype):
    B, N, L, H, D = 2, 37, 77, 2, 80
    q, k, v = (_randn(B, n, H, D, dtype=dtype).requires_grad_() for n in (N, L, L))
    lengths = torch.tensor([0, 5], dtype=torch.int32, device=_DEVICE)
    grad_out = _randn(B, N, H, D, dtype=dtype)
    with ops.use_backend("triton"):
        out = ops.cross_attention(q, k, v, lengths)
    out.backward(grad_out)
    ref, ref_grads = _attention_reference(q, k, v, lengths, None, grad_out)
    assert out.dtype == dtype and _rel(out, ref) < _TOL[dtype]
    for got, want in zip((q.grad, k.grad, v.grad), ref_grads):
        assert torch.isfinite(got).all() and _rel(got, want) < _TOL[dtype]


# ---------------------------------------------------------------- GroupNorm + SiLU


def _group_norm_case(shape, groups, dtype, channels_last):
    B, C = shape[:2]
    x = _randn(*shape, dtype=dtype) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = dict(weight=_randn(C, dtype=dtype), bias=_randn(C, dtype=dtype), add=_randn(B, C, dtype=dtype),
                  scale=0.5 * _randn(B, C, dtype=dtype), shift=_randn(B, C, dtype=dtype))
    return x, params


def _group_norm_reference(x, p, groups, silu, grad_y):
    names = ("x", "weight", "bias", "add", "scale", "shift")
    leaves = {n: t.detach().double().requires_grad_() for n, t in zip(names, (x, *p.values()))}
    y = reference.group_norm_silu(leaves["x"], leaves["weight"], leaves["bias"], groups, 1e-5, add=leaves["add"],
                                  scale=leaves["scale"], shift=leaves["shift"], silu=silu)
    y.backward(grad_y.double())
    return y, [leaves[n].grad for n in names]


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("splits", [1, 3])
def test_group_norm_split_reduction_matches_reference(splits, channels_last):
    kernels = _kernels().group_norm_silu
    groups, silu = 3, splits == 1
    x, p = _group_norm_case((1, 24, 9, 11), groups, torch.float32, channels_last)
    y, mean, rstd = kernels.group_norm_silu_fwd(x, *p.values(), groups, 1e-5, silu, splits=splits)
    grad_y = torch.randn_like(y)
    grads = kernels.group_norm_silu_bwd(grad_y, x, *p.values(), mean, rstd, groups, silu, splits=splits)
    ref, ref_grads = _group_norm_reference(x, p, groups, silu, grad_y)
    assert y.stride() == x.stride() and grads[0].stride() == x.stride()
    assert _rel(y, ref) < 1e-5
    h = (x.double() + p["add"].double()[:, :, None, None]).reshape(1, groups, -1)
    torch.testing.assert_close(mean.double(), h.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (h.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    # kernel order: dx, dweight, dbias, dadd, dscale, dshift; reference order: x, weight, bias, add, scale, shift
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 1e-5


@needs_triton
def test_group_norm_absent_modulation_gives_zero_grads_and_3d_input():
    kernels = _kernels().group_norm_silu
    x = _randn(2, 64, 37)
    w, b = _randn(64), _randn(64)
    y, mean, rstd = kernels.group_norm_silu_fwd(x, w, b, None, None, None, 8, 1e-5, True)
    grad_y = torch.randn_like(y)
    dx, dw, db, dadd, dscale, dshift = kernels.group_norm_silu_bwd(
        grad_y, x, w, b, None, None, None, mean, rstd, 8, True)
    for g in (dadd, dscale, dshift):
        assert g.shape == (2, 64) and torch.equal(g, torch.zeros_like(g))
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = reference.group_norm_silu(*leaves, 8, 1e-5)
    ref.backward(grad_y.double())
    assert _rel(y, ref) < 1e-5
    for got, leaf in zip((dx, dw, db), leaves):
        assert _rel(got, leaf.grad) < 1e-5


@needs_triton
def test_group_norm_statistics_survive_a_large_mean():
    # Chan's combination of per-tile (mean, M2): a one-pass sum/sum-of-squares in fp32
    # would lose ~1e-3 of the variance at this offset.
    kernels = _kernels().group_norm_silu
    x = 300.0 + _randn(1, 8, 40, 40)
    w, b = torch.ones(8, device=_DEVICE), torch.zeros(8, device=_DEVICE)
    y, mean, rstd = kernels.group_norm_silu_fwd(x, w, b, None, None, None, 2, 1e-5, False, splits=3)
    ref = reference.group_norm_silu(x.double(), w.double(), b.double(), 2, 1e-5, silu=False)
    assert _rel(y, ref) < 1e-4


@needs_triton
def test_group_norm_public_api_fp16_channels_last_320_channels():
    x, p = _group_norm_case((1, 320, 3, 5), 32, torch.float16, channels_last=True)
    x.requires_grad_()
    leaves = {n: t.requires_grad_() for n, t in p.items()}
    with ops.use_backend("triton"):
        y = ops.group_norm_silu(x, leaves["weight"], leaves["bias"], 32, add=leaves["add"], scale=leaves["scale"],
                                shift=leaves["shift"])
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref, ref_grads = _group_norm_reference(x, p, 32, True, grad_y)
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, ref) < 2e-3
    for got, want in zip((x.grad, *(leaves[n].grad for n in p)), ref_grads):
        assert _rel(got, want) < 2e-3


# ---------------------------------------------------------------- compiled kernels


def _can_compile_for_sm90() -> bool:
    """triton's NVIDIA backend and the cuobjdump it ships (to read register use) are present."""
    try:
        import triton
        from triton.backends import backends
    except Exception:
        return False
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return "nvidia" in backends and os.path.exists(tool)


@pytest.mark.skipif(not _can_compile_for_sm90(), reason="triton's NVIDIA backend (with cuobjdump) is not installed")
def test_kernels_compile_for_sm90_without_spills():
    """The interpreter skips type checks the compiler enforces; compile the hot configs for sm_90a."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "dalle3_fast.ops.triton.sm90_report", "--check"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
