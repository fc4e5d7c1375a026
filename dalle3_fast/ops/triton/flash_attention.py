"""Flash attention (FA2 schedule), non-causal, with optional per-sample key lengths.

Layout (B, N, H, D) like flash-attn; every tensor is addressed through its own strides,
so views need no copy. The head dim is padded to a power of two inside the kernel
(masked loads): 40 -> 64, 80/96 -> 128, 160 -> 256.

Forward: one program per (query block, batch*head); it streams the valid keys
[0, length) with an online softmax in exp2 and writes out and the log-sum-exp (natural
log, fp32; -inf for a row with no keys, whose output is zeros).

Backward: delta = rowsum(dO * O); one kernel per key block accumulates dK, dV over all
query blocks, one per query block accumulates dQ over the valid key blocks; fp32
accumulators, no atomics. Keys at or past a sample's length get zero gradient.

Float32 inputs use IEEE fp32 dots (no TF32), so fp32 results match a float64 reference
to ~1e-6; fp16/bf16 use tensor cores with fp32 accumulation; float64 runs in float64.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dalle3_fast.ops.triton._config import INTERPRET, autotune

_LOG2E = math.log2(math.e)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    # IEEE fp32 products for fp32 inputs (TF32 would cost ~1e-3 relative error);
    # 16-bit inputs run on tensor cores whatever this says.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


# Interpreter: one small config so CPU tests stay fast. GPU: FA2-shaped configs, pruned
# per call (_prune); on sm_90 the 16-bit configs kept for D <= 128 compile without
# spills, the small ones serve fp32 (FMA dots) and D=160 (padded to 256).
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 2),
                         (32, 32, 8, 1)]
]
_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2), (32, 32, 4, 1),
                         (32, 32, 8, 1)]
]
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _prune(configs, args, max_m_wide_head, max_n_wide_head):
    """Drop tiles wider than the keys, and tiles that cannot fit for fp32 (FMA dots) or D padded to 256."""
    def fits(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bn > max(32, triton.next_power_of_2(args["N_K"])):
            return False
        if args["Q"].dtype in (torch.float32, torch.float64) and (bm > 64 or bn > 32):
            return False
        return not (args["BLOCK_D"] >= 256 and (bm > max_m_wide_head or bn > max_n_wide_head))

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _prune_fwd(configs, named_args, **kwargs):
    return _prune(configs, {**named_args, **kwargs}, 64, 64)


def _prune_bwd(configs, named_args, **kwargs):
    return _prune(configs, {**named_args, **kwargs}, 32, 64)


@triton.jit
def _key_length(Lengths, b, n_keys, HAS_LENGTHS: tl.constexpr):
    """Valid keys of sample b: key_lengths[b] clamped to [0, n_keys], or all of them."""
    length = n_keys
    if HAS_LENGTHS:
        length = tl.minimum(tl.maximum(tl.load(Lengths + b), 0), n_keys)
    return length


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Lengths,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sob, son, soh, sod,
    H, N_Q, N_K, HEAD_DIM, qk_scale_log2,
    HAS_LENGTHS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    length = _key_length(Lengths, b, N_K, HAS_LENGTHS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N_Q
    d_valid = offs_d < HEAD_DIM

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + b * skb + h * skh + offs_d[:, None] * skd
    v_base = V + b * svb + h * svh + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    # Every visited key block holds at least one valid key, so m_i is finite after the first.
    for start_n in range(0, length, BLOCK_N):
        n_idx = start_n + offs_n
        n_valid = n_idx < length
        k = tl.load(k_base + n_idx[None, :] * skn, mask=d_valid[:, None] & n_valid[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION, out_dtype=ACC) * qk_scale_log2
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n_idx[:, None] * svn, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    # lse in natural-log units of the scaled scores: (m + log2 l) * ln 2.
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + pid_bh.to(tl.int64) * N_Q + offs_m, lse.to(Lse.dtype.element_ty), mask=m_valid)


@triton.jit
def _attn_bwd_delta_kernel(
    Out, dOut, Delta,
    sob, son, soh, sod,
    sgb, sgn, sgh, sgd,
    H, N_Q, HEAD_DIM,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(dOut + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd, mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, Lengths,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sgb, sgn, sgh, sgd,
    sdkb, sdkn, sdkh, sdkd,
    sdvb, sdvn, sdvh, sdvd,
    H, N_Q, N_K, HEAD_DIM, scale, qk_scale_log2,
    HAS_LENGTHS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    length = _key_length(Lengths, b, N_K, HAS_LENGTHS)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    n_valid = offs_n < length  # keys past the length (or past N_K) take no part

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    if pid_n * BLOCK_N < length:
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        # Transposed query-side tiles: (BLOCK_D, BLOCK_M).
        qT_base = Q + b * sqb + h * sqh + offs_d[:, None] * sqd
        doT_base = dOut + b * sgb + h * sgh + offs_d[:, None] * sgd
        row_base = pid_bh.to(tl.int64) * N_Q
        for start_m in range(0, N_Q, BLOCK_M):
            m_idx = start_m + offs_m
            m_valid = m_idx < N_Q
            qd_mask = d_valid[:, None] & m_valid[None, :]
            qT = tl.load(qT_base + m_idx[None, :] * sqn, mask=qd_mask, other=0.0)
            doT = tl.load(doT_base + m_idx[None, :] * sgn, mask=qd_mask, other=0.0)
            lse = tl.load(Lse + row_base + m_idx, mask=m_valid, other=0.0).to(ACC)
            delta = tl.load(Delta + row_base + m_idx, mask=m_valid, other=0.0)
            sT = tl.dot(k, qT, input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_N, BLOCK_M)
            pT = tl.exp2(sT * qk_scale_log2 - lse[None, :] * 1.4426950408889634)
            pT = tl.where(n_valid[:, None] & m_valid[None, :], pT, 0.0)
            dv = tl.dot(pT.to(doT.dtype), tl.trans(doT), dv, input_precision=PRECISION, out_dtype=ACC)
            dpT = tl.dot(v, doT, input_precision=PRECISION, out_dtype=ACC)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION, out_dtype=ACC)
        dk = dk * scale

    out_mask = (offs_n < N_K)[:, None] & d_valid[None, :]
    tl.store(dK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(dK.dtype.element_ty), mask=out_mask)
    tl.store(dV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(dV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, Lengths,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sgb, sgn, sgh, sgd,
    sdqb, sdqn, sdqh, sdqd,
    H, N_Q, N_K, HEAD_DIM, scale, qk_scale_log2,
    HAS_LENGTHS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    length = _key_length(Lengths, b, N_K, HAS_LENGTHS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N_Q
    d_valid = offs_d < HEAD_DIM
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(dOut + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd, mask=q_mask, other=0.0)
    row_base = pid_bh.to(tl.int64) * N_Q
    lse = tl.load(Lse + row_base + offs_m, mask=m_valid, other=0.0).to(ACC) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=m_valid, other=0.0)

    kT_base = K + b * skb + h * skh + offs_d[:, None] * skd
    vT_base = V + b * svb + h * svh + offs_d[:, None] * svd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, length, BLOCK_N):
        n_idx = start_n + offs_n
        n_valid = n_idx < length
        kv_mask = d_valid[:, None] & n_valid[None, :]
        kT = tl.load(kT_base + n_idx[None, :] * skn, mask=kv_mask, other=0.0)
        vT = tl.load(vT_base + n_idx[None, :] * svn, mask=kv_mask, other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION, out_dtype=ACC)
        p = tl.exp2(s * qk_scale_log2 - lse[:, None])
        p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION, out_dtype=ACC)
    dq = dq * scale
    tl.store(dQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
             dq.to(dQ.dtype.element_ty), mask=q_mask)


_KEY = ["N_Q", "N_K", "BLOCK_D", "HAS_LENGTHS"]
_fwd = autotune(_attn_fwd_kernel, _FWD_CONFIGS, _KEY, _prune_fwd)
_dkdv = autotune(_attn_bwd_dkdv_kernel, _BWD_CONFIGS, _KEY, _prune_bwd)
_dq = autotune(_attn_bwd_dq_kernel, _BWD_CONFIGS, _KEY, _prune_bwd)


def _blocks() -> dict:
    return dict(_INTERPRET_BLOCKS) if INTERPRET else {}


def _delta_block(block_d: int) -> int:
    """Rows per program of the delta = rowsum(dO * O) kernel (4 warps; 32 rows keep D=256 spill-free)."""
    if INTERPRET:
        return 16
    return 64 if block_d <= 128 else 32


def _lengths_arg(q: torch.Tensor, key_lengths):
    if key_lengths is None:
        return q, False  # any pointer; never read
    return key_lengths.to(device=q.device, dtype=torch.int32).contiguous(), True


def attention_fwd(q, k, v, key_lengths, scale):
    """out (B, N, H, D) in q's dtype and lse (B, H, N) fp32 (fp64 for fp64 inputs)."""
    B, N, H, D = q.shape
    L = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    lengths, has_lengths = _lengths_arg(q, key_lengths)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    _fwd[grid](
        q, k, v, out, lse, lengths,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, L, D, float(scale) * _LOG2E,
        HAS_LENGTHS=has_lengths, BLOCK_D=triton.next_power_of_2(D), ACC=_acc_dtype(q.dtype),
        PRECISION=_dot_precision(q.dtype), **_blocks(),
    )
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, key_lengths, scale):
    """dq, dk, dv for attention_fwd; keys past a sample's length get zero gradient."""
    B, N, H, D = q.shape
    L = k.shape[1]
    BLOCK_D = triton.next_power_of_2(D)
    acc = _acc_dtype(q.dtype)
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    delta_block = _delta_block(BLOCK_D)
    _attn_bwd_delta_kernel[(triton.cdiv(N, delta_block), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, N, D,
        BLOCK_D=BLOCK_D, ACC=acc, BLOCK_M=delta_block,
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    lengths, has_lengths = _lengths_arg(q, key_lengths)
    common = dict(HAS_LENGTHS=has_lengths, BLOCK_D=BLOCK_D, ACC=acc, PRECISION=_dot_precision(q.dtype), **_blocks())
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())

    _dkdv[lambda meta: (triton.cdiv(L, meta["BLOCK_N"]), B * H)](
        q, k, v, grad_out, lse, delta, dk, dv, lengths,
        *strides, *dk.stride(), *dv.stride(),
        H, N, L, D, float(scale), float(scale) * _LOG2E, **common,
    )
    _dq[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, grad_out, lse, delta, dq, lengths,
        *strides, *dq.stride(),
        H, N, L, D, float(scale), float(scale) * _LOG2E, **common,
    )
    return dq, dk, dv
