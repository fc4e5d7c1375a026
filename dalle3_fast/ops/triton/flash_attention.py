"""Flash attention (FA2 schedule), non-causal, with optional per-sample key lengths.

Layout (B, N, H, D) like flash-attn; every tensor is addressed through its own strides,
so views need no copy. A head dim that is not a power of two runs as two power-of-two
column blocks with masked loads (40 = 32 + 16 of which 8 masked, 80 = 64 + 16,
96 = 64 + 32, 160 = 128 + 32), so little tensor-core work is spent on padding.

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

from dalle3_fast.ops.layout import acc_dtype
from dalle3_fast.ops.triton._config import INTERPRET, acc_tl_dtype, autotune

_LOG2E = math.log2(math.e)


def _dot_precision(dtype: torch.dtype) -> str:
    # IEEE fp32 products for fp32 inputs (TF32 would cost ~1e-3 relative error);
    # 16-bit inputs run on tensor cores whatever this says.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


# Interpreter: one small config so CPU tests stay fast. GPU: FA2-shaped configs, pruned
# per call (_prune_*). A program owns a large block and loops over small ones: dK/dV
# programs own BLOCK_N keys and loop over BLOCK_M queries, dQ programs the reverse. On
# sm_90 the configs kept for 16-bit inputs compile without register spills
# (python -m dalle3_fast.ops.triton.sm90_report); the small ones serve fp32 (FMA dots).
def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 2)])
_DKDV_CONFIGS = _configs([(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2)])
_DQ_CONFIGS = _configs([(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)])
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _prune(configs, args, limits):
    """Keep the configs within limits[(kind)] = (max BLOCK_M, max BLOCK_N); never tiles wider than the keys."""
    if args["Q"].dtype in (torch.float32, torch.float64):
        kind = "fp32"  # IEEE dots run on FMA units: small tiles
    elif args["HEAD_DIM"] > 128:
        kind = "wide"
    else:
        kind = "default"
    max_m, max_n = limits[kind]
    max_n = min(max_n, max(32, triton.next_power_of_2(args["N_K"])))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _prune_fwd(configs, named_args, **kwargs):
    return _prune(configs, {**named_args, **kwargs}, {"default": (128, 128), "wide": (64, 64), "fp32": (64, 32)})


def _prune_dkdv(configs, named_args, **kwargs):
    return _prune(configs, {**named_args, **kwargs}, {"default": (64, 128), "wide": (32, 64), "fp32": (32, 64)})


def _prune_dq(configs, named_args, **kwargs):
    return _prune(configs, {**named_args, **kwargs}, {"default": (128, 64), "wide": (64, 32), "fp32": (64, 32)})


@triton.jit
def _key_length(Lengths, b, n_keys, HAS_LENGTHS: tl.constexpr):
    """Valid keys of sample b: key_lengths[b] clamped to [0, n_keys], or all of them."""
    length = n_keys
    if HAS_LENGTHS:
        length = tl.minimum(tl.maximum(tl.load(Lengths + b), 0), n_keys)
    return length


# Head dims are split into a power-of-two part [0, D0) and a power-of-two tail [D0, D0 + D1)
# (D1 = 0 when the head dim is a power of two): cols0/cols1 below, masked at HEAD_DIM.
# Loads are written out in each kernel rather than behind helpers: the interpreter
# re-patches triton.language on every device-function call, which triples test time.


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Lengths,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sob, son, soh, sod,
    H, N_Q, N_K, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    length = _key_length(Lengths, b, N_K, HAS_LENGTHS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_valid = offs_m < N_Q
    cols0 = tl.arange(0, D0)
    c0 = cols0 < HEAD_DIM
    q_rows = Q + b * sqb + h * sqh + offs_m[:, None] * sqn
    kT_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    q0 = tl.load(q_rows + cols0[None, :] * sqd, mask=m_valid[:, None] & c0[None, :], other=0.0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=ACC)
    if D1 > 0:
        cols1 = D0 + tl.arange(0, D1)
        c1 = cols1 < HEAD_DIM
        q1 = tl.load(q_rows + cols1[None, :] * sqd, mask=m_valid[:, None] & c1[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    # Every visited key block holds at least one valid key, so m_i is finite after the first.
    for start_n in range(0, length, BLOCK_N):
        n_idx = start_n + offs_n
        n_valid = n_idx < length
        kT_cols = kT_base + n_idx[None, :] * skn
        v_rows = v_base + n_idx[:, None] * svn
        kT0 = tl.load(kT_cols + cols0[:, None] * skd, mask=c0[:, None] & n_valid[None, :], other=0.0)
        s = tl.dot(q0, kT0, input_precision=PRECISION, out_dtype=ACC)
        if D1 > 0:
            kT1 = tl.load(kT_cols + cols1[:, None] * skd, mask=c1[:, None] & n_valid[None, :], other=0.0)
            s = tl.dot(q1, kT1, s, input_precision=PRECISION, out_dtype=ACC)
        s = tl.where(n_valid[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(Q.dtype.element_ty)
        v0 = tl.load(v_rows + cols0[None, :] * svd, mask=n_valid[:, None] & c0[None, :], other=0.0)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        if D1 > 0:
            v1 = tl.load(v_rows + cols1[None, :] * svd, mask=n_valid[:, None] & c1[None, :], other=0.0)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new

    has_keys = l_i > 0
    inv_l = (1.0 / tl.where(has_keys, l_i, 1.0))[:, None]
    o_rows = Out + b * sob + h * soh + offs_m[:, None] * son
    out_ty = Out.dtype.element_ty
    tl.store(o_rows + cols0[None, :] * sod, (acc0 * inv_l).to(out_ty), mask=m_valid[:, None] & c0[None, :])
    if D1 > 0:
        tl.store(o_rows + cols1[None, :] * sod, (acc1 * inv_l).to(out_ty), mask=m_valid[:, None] & c1[None, :])
    # lse in natural-log units of the scaled scores: (m + log2 l) * ln 2.
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + pid_bh.to(tl.int64) * N_Q + offs_m, lse.to(Lse.dtype.element_ty), mask=m_valid)


@triton.jit
def _attn_bwd_delta_kernel(
    Out, dOut, Delta,
    sob, son, soh, sod,
    sgb, sgn, sgh, sgd,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax-backward correction (memory-bound: one padded tile)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N_Q
    mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(dOut + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd, mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N_Q + offs_m, delta, mask=m_valid)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, Lengths,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sgb, sgn, sgh, sgd,
    sdkb, sdkn, sdkh, sdkd,
    sdvb, sdvn, sdvh, sdvd,
    H, N_Q, N_K, scale, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block, accumulated over every query block."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    length = _key_length(Lengths, b, N_K, HAS_LENGTHS)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_valid = offs_n < length  # keys past the length (or past N_K) take no part
    cols0 = tl.arange(0, D0)
    c0 = cols0 < HEAD_DIM
    dk0 = tl.zeros([BLOCK_N, D0], dtype=ACC)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=ACC)
    if D1 > 0:
        cols1 = D0 + tl.arange(0, D1)
        c1 = cols1 < HEAD_DIM
        dk1 = tl.zeros([BLOCK_N, D1], dtype=ACC)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=ACC)
    if pid_n * BLOCK_N < length:
        k_rows = K + b * skb + h * skh + offs_n[:, None] * skn
        v_rows = V + b * svb + h * svh + offs_n[:, None] * svn
        k0 = tl.load(k_rows + cols0[None, :] * skd, mask=n_valid[:, None] & c0[None, :], other=0.0)
        v0 = tl.load(v_rows + cols0[None, :] * svd, mask=n_valid[:, None] & c0[None, :], other=0.0)
        if D1 > 0:
            k1 = tl.load(k_rows + cols1[None, :] * skd, mask=n_valid[:, None] & c1[None, :], other=0.0)
            v1 = tl.load(v_rows + cols1[None, :] * svd, mask=n_valid[:, None] & c1[None, :], other=0.0)
        qT_base = Q + b * sqb + h * sqh
        doT_base = dOut + b * sgb + h * sgh
        row_base = pid_bh.to(tl.int64) * N_Q
        for start_m in range(0, N_Q, BLOCK_M):
            m_idx = start_m + offs_m
            m_valid = m_idx < N_Q
            # Query-side tiles transposed: (head dim, BLOCK_M).
            qT_cols = qT_base + m_idx[None, :] * sqn
            doT_cols = doT_base + m_idx[None, :] * sgn
            qT0 = tl.load(qT_cols + cols0[:, None] * sqd, mask=c0[:, None] & m_valid[None, :], other=0.0)
            doT0 = tl.load(doT_cols + cols0[:, None] * sgd, mask=c0[:, None] & m_valid[None, :], other=0.0)
            sT = tl.dot(k0, qT0, input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_N, BLOCK_M)
            dpT = tl.dot(v0, doT0, input_precision=PRECISION, out_dtype=ACC)
            if D1 > 0:
                qT1 = tl.load(qT_cols + cols1[:, None] * sqd, mask=c1[:, None] & m_valid[None, :], other=0.0)
                doT1 = tl.load(doT_cols + cols1[:, None] * sgd, mask=c1[:, None] & m_valid[None, :], other=0.0)
                sT = tl.dot(k1, qT1, sT, input_precision=PRECISION, out_dtype=ACC)
                dpT = tl.dot(v1, doT1, dpT, input_precision=PRECISION, out_dtype=ACC)
            lse = tl.load(Lse + row_base + m_idx, mask=m_valid, other=0.0).to(ACC)
            delta = tl.load(Delta + row_base + m_idx, mask=m_valid, other=0.0)
            pT = tl.exp2(sT * qk_scale_log2 - lse[None, :] * 1.4426950408889634)
            pT = tl.where(n_valid[:, None] & m_valid[None, :], pT, 0.0)
            dsT = (pT * (dpT - delta[None, :])).to(Q.dtype.element_ty)
            pT = pT.to(Q.dtype.element_ty)
            dv0 = tl.dot(pT, tl.trans(doT0), dv0, input_precision=PRECISION, out_dtype=ACC)
            dk0 = tl.dot(dsT, tl.trans(qT0), dk0, input_precision=PRECISION, out_dtype=ACC)
            if D1 > 0:
                dv1 = tl.dot(pT, tl.trans(doT1), dv1, input_precision=PRECISION, out_dtype=ACC)
                dk1 = tl.dot(dsT, tl.trans(qT1), dk1, input_precision=PRECISION, out_dtype=ACC)

    out_valid = (offs_n < N_K)[:, None]
    dk_rows = dK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn
    dv_rows = dV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn
    dk_ty = dK.dtype.element_ty
    dv_ty = dV.dtype.element_ty
    tl.store(dk_rows + cols0[None, :] * sdkd, (dk0 * scale).to(dk_ty), mask=out_valid & c0[None, :])
    tl.store(dv_rows + cols0[None, :] * sdvd, dv0.to(dv_ty), mask=out_valid & c0[None, :])
    if D1 > 0:
        tl.store(dk_rows + cols1[None, :] * sdkd, (dk1 * scale).to(dk_ty), mask=out_valid & c1[None, :])
        tl.store(dv_rows + cols1[None, :] * sdvd, dv1.to(dv_ty), mask=out_valid & c1[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, Lengths,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sgb, sgn, sgh, sgd,
    sdqb, sdqn, sdqh, sdqd,
    H, N_Q, N_K, scale, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block, accumulated over the valid key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    length = _key_length(Lengths, b, N_K, HAS_LENGTHS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_valid = offs_m < N_Q
    cols0 = tl.arange(0, D0)
    c0 = cols0 < HEAD_DIM
    q_rows = Q + b * sqb + h * sqh + offs_m[:, None] * sqn
    do_rows = dOut + b * sgb + h * sgh + offs_m[:, None] * sgn
    q0 = tl.load(q_rows + cols0[None, :] * sqd, mask=m_valid[:, None] & c0[None, :], other=0.0)
    do0 = tl.load(do_rows + cols0[None, :] * sgd, mask=m_valid[:, None] & c0[None, :], other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=ACC)
    if D1 > 0:
        cols1 = D0 + tl.arange(0, D1)
        c1 = cols1 < HEAD_DIM
        q1 = tl.load(q_rows + cols1[None, :] * sqd, mask=m_valid[:, None] & c1[None, :], other=0.0)
        do1 = tl.load(do_rows + cols1[None, :] * sgd, mask=m_valid[:, None] & c1[None, :], other=0.0)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=ACC)
    row_base = pid_bh.to(tl.int64) * N_Q
    lse = tl.load(Lse + row_base + offs_m, mask=m_valid, other=0.0).to(ACC) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=m_valid, other=0.0)

    kT_base = K + b * skb + h * skh
    vT_base = V + b * svb + h * svh
    for start_n in range(0, length, BLOCK_N):
        n_idx = start_n + offs_n
        n_valid = n_idx < length
        kT_cols = kT_base + n_idx[None, :] * skn
        vT_cols = vT_base + n_idx[None, :] * svn
        kT0 = tl.load(kT_cols + cols0[:, None] * skd, mask=c0[:, None] & n_valid[None, :], other=0.0)
        vT0 = tl.load(vT_cols + cols0[:, None] * svd, mask=c0[:, None] & n_valid[None, :], other=0.0)
        s = tl.dot(q0, kT0, input_precision=PRECISION, out_dtype=ACC)
        dp = tl.dot(do0, vT0, input_precision=PRECISION, out_dtype=ACC)
        if D1 > 0:
            kT1 = tl.load(kT_cols + cols1[:, None] * skd, mask=c1[:, None] & n_valid[None, :], other=0.0)
            vT1 = tl.load(vT_cols + cols1[:, None] * svd, mask=c1[:, None] & n_valid[None, :], other=0.0)
            s = tl.dot(q1, kT1, s, input_precision=PRECISION, out_dtype=ACC)
            dp = tl.dot(do1, vT1, dp, input_precision=PRECISION, out_dtype=ACC)
        p = tl.exp2(s * qk_scale_log2 - lse[:, None])
        p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
        dq0 = tl.dot(ds, tl.trans(kT0), dq0, input_precision=PRECISION, out_dtype=ACC)
        if D1 > 0:
            dq1 = tl.dot(ds, tl.trans(kT1), dq1, input_precision=PRECISION, out_dtype=ACC)

    dq_rows = dQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn
    dq_ty = dQ.dtype.element_ty
    tl.store(dq_rows + cols0[None, :] * sdqd, (dq0 * scale).to(dq_ty), mask=m_valid[:, None] & c0[None, :])
    if D1 > 0:
        tl.store(dq_rows + cols1[None, :] * sdqd, (dq1 * scale).to(dq_ty), mask=m_valid[:, None] & c1[None, :])


_KEY = ["N_Q", "N_K", "HEAD_DIM", "HAS_LENGTHS"]
_fwd = autotune(_attn_fwd_kernel, _FWD_CONFIGS, _KEY, _prune_fwd)
_dkdv = autotune(_attn_bwd_dkdv_kernel, _DKDV_CONFIGS, _KEY, _prune_dkdv)
_dq = autotune(_attn_bwd_dq_kernel, _DQ_CONFIGS, _KEY, _prune_dq)


def _blocks() -> dict:
    return dict(_INTERPRET_BLOCKS) if INTERPRET else {}


def _head_dim_split(head_dim: int) -> dict:
    """HEAD_DIM = D0 + (up to) D1, both powers of two (tl.dot needs >= 16): 40 -> 32+16, 160 -> 128+32."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    d1 = 0 if rest == 0 else max(16, triton.next_power_of_2(rest))
    return {"HEAD_DIM": head_dim, "D0": d0, "D1": d1}


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
    lse = torch.empty((B, H, N), device=q.device, dtype=acc_dtype(q.dtype))
    lengths, has_lengths = _lengths_arg(q, key_lengths)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    _fwd[grid](
        q, k, v, out, lse, lengths,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, L, float(scale) * _LOG2E,
        **_head_dim_split(D), HAS_LENGTHS=has_lengths, ACC=acc_tl_dtype(q.dtype),
        PRECISION=_dot_precision(q.dtype), **_blocks(),
    )
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, key_lengths, scale):
    """dq, dk, dv for attention_fwd; keys past a sample's length get zero gradient."""
    B, N, H, D = q.shape
    L = k.shape[1]
    acc = acc_tl_dtype(q.dtype)
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    block_d = triton.next_power_of_2(D)
    delta_block = _delta_block(block_d)
    _attn_bwd_delta_kernel[(triton.cdiv(N, delta_block), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, N,
        HEAD_DIM=D, BLOCK_D=block_d, ACC=acc, BLOCK_M=delta_block,
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    lengths, has_lengths = _lengths_arg(q, key_lengths)
    common = dict(**_head_dim_split(D), HAS_LENGTHS=has_lengths, ACC=acc, PRECISION=_dot_precision(q.dtype),
                  **_blocks())
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())

    _dkdv[lambda meta: (triton.cdiv(L, meta["BLOCK_N"]), B * H)](
        q, k, v, grad_out, lse, delta, dk, dv, lengths,
        *strides, *dk.stride(), *dv.stride(),
        H, N, L, float(scale), float(scale) * _LOG2E, **common,
    )
    _dq[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, grad_out, lse, delta, dq, lengths,
        *strides, *dq.stride(),
        H, N, L, float(scale), float(scale) * _LOG2E, **common,
    )
    return dq, dk, dv
