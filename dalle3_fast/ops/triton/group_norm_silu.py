"""GroupNorm (+ add before the statistics, + scale/shift after) (+ SiLU), forward and backward.

    h = x + add[b, c];  xhat = (h - mean) * rstd
    y = silu((xhat * weight[c] + bias[c]) * (1 + scale[b, c]) + shift[b, c])

x is viewed as (B, C, S) through its strides, so channels-first (B, C, H, W) / (B, C, L)
and channels-last (B, H, W, C) memory run through the same kernels; y and dx keep x's
strides. A program owns one (sample, group) and a chunk of its spatial extent; it
covers all Cg channels of the group in one tile row block of BLOCK_C = next_pow2(Cg)
rows, so per-channel terms live in registers. Cg is a compile-time constant (a model
has a handful), which lets channels-last loads vectorise when Cg is a power of two.

Forward, small groups (enough (b, g) pairs to fill the GPU): one program per group
computes the statistics (Chan's parallel variance over tiles) and then writes y, the
second read of the group mostly hitting L2. Large groups: the spatial extent is split
over SPLITS programs; phase 1 writes per-chunk (count, mean, M2), phase 2 combines the
chunks of its group and writes y for its own chunk.

Backward: per-(b, c) sums S1 = sum g, S2 = sum g*xhat, S3 = sum xhat over the spatial
extent, where g = dy * silu'(pre-activation); then
    dx    = a*g - rstd * (A1 + A2*xhat) / n,  a = rstd*w*(1+scale), A1|A2 = sum_c w(1+scale) S1|S2
    dshift = S1, dscale = w*S2 + bias*S1, dadd = sum_s dx,
    dweight = sum_b (1+scale) S2, dbias = sum_b (1+scale) S1.
Same fused / split scheme as the forward. All statistics in fp32 (fp64 for fp64 x).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dalle3_fast.ops.layout import acc_dtype, dense, memory_format
from dalle3_fast.ops.triton._config import INTERPRET, acc_tl_dtype

# Elements per tile (BLOCK_C * BLOCK_S). The interpreter runs numpy per tile, so its
# tiles are small enough to exercise the masks and the tile loops on tiny test tensors.
_TILE_FWD = 256 if INTERPRET else 2048
_TILE_BWD = 256 if INTERPRET else 2048
_NUM_WARPS = 8  # with 2048-element tiles: 8 elements a thread, 16-byte loads for 16-bit x
# A split owns at least this many tiles, so the combine step stays negligible.
_MIN_TILES_PER_SPLIT = 4

_FUSED, _PARTIAL, _COMBINE = 0, 1, 2

# A split's chunk is a whole number of tiles (S_CHUNK is a multiple of BLOCK_S), so only
# the tile holding s = S is partial: masks test s < S, not s < chunk end, which keeps
# them aligned and the loads vectorised.


@triton.jit
def _channel_vector(Ptr, idx, mask, default, HAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    v = tl.full([BLOCK_C], default, ACC)
    if HAS:
        v = tl.load(Ptr + idx, mask=mask, other=default).to(ACC)
    return v


@triton.jit
def _chunk_stats(x_base, sxc, sxs, offs_c, c_valid, add, CG, s_lo, s_hi, S,
                 ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of x + add over channels of the group and s in [s_lo, s_hi)."""
    offs_s = tl.arange(0, BLOCK_S)
    count = tl.zeros([], ACC)
    mean = tl.zeros([], ACC)
    m2 = tl.zeros([], ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s_idx = s0 + offs_s
        mask = c_valid[:, None] & (s_idx < S)[None, :]
        x = tl.load(x_base + offs_c[:, None] * sxc + s_idx[None, :] * sxs, mask=mask, other=0.0).to(ACC)
        x = tl.where(mask, x + add[:, None], 0.0)
        n_t = (CG * tl.minimum(S - s0, BLOCK_S)).to(ACC)
        mean_t = tl.sum(tl.sum(x, 1), 0) / n_t
        d = tl.where(mask, x - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, 1), 0)
        n_new = count + n_t
        delta = mean_t - mean
        mean = mean + delta * (n_t / n_new)
        m2 = m2 + m2_t + delta * delta * (count * n_t / n_new)
        count = n_new
    return count, mean, m2


@triton.jit
def _gn_fwd_kernel(
    X, Y, W, Bias, Add, Scale, Shift, Mean, Rstd, Partial,
    sxb, sxc, sxs, C, S, CG: tl.constexpr, G, S_CHUNK, eps,
    HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    SPLITS, PHASE: tl.constexpr, SPLITS_P2: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // G
    grp = bg % G
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < CG
    c_idx = grp * CG + offs_c
    bc_idx = b.to(tl.int64) * C + c_idx
    base = b.to(tl.int64) * sxb + (grp * CG).to(tl.int64) * sxc
    x_base = X + base
    s_lo = split * S_CHUNK
    s_hi = tl.minimum(s_lo + S_CHUNK, S)
    add = _channel_vector(Add, bc_idx, c_valid, 0.0, HAS_ADD, ACC, BLOCK_C)

    if PHASE == 1:  # _PARTIAL
        count, mean_c, m2_c = _chunk_stats(x_base, sxc, sxs, offs_c, c_valid, add, CG, s_lo, s_hi, S, ACC, BLOCK_S)
        p = Partial + (bg * SPLITS + split) * 3
        tl.store(p, count)
        tl.store(p + 1, mean_c)
        tl.store(p + 2, m2_c)
    else:
        if PHASE == 0:  # _FUSED: this program owns the whole group
            count, mean, m2 = _chunk_stats(x_base, sxc, sxs, offs_c, c_valid, add, CG, 0, S, S, ACC, BLOCK_S)
        else:  # _COMBINE the per-chunk statistics of this group (Chan et al.)
            offs_p = tl.arange(0, SPLITS_P2)
            p = Partial + (bg * SPLITS + offs_p) * 3
            p_valid = offs_p < SPLITS
            counts = tl.load(p, mask=p_valid, other=0.0)
            means = tl.load(p + 1, mask=p_valid, other=0.0)
            m2s = tl.load(p + 2, mask=p_valid, other=0.0)
            count = tl.sum(counts, 0)
            mean = tl.sum(counts * means, 0) / count
            d = means - mean
            m2 = tl.sum(m2s + counts * d * d, 0)
        rstd = 1.0 / tl.sqrt(tl.maximum(m2 / count, 0.0) + eps)
        if split == 0:
            tl.store(Mean + bg, mean)
            tl.store(Rstd + bg, rstd)

        w = tl.load(W + c_idx, mask=c_valid, other=0.0).to(ACC)
        bias = tl.load(Bias + c_idx, mask=c_valid, other=0.0).to(ACC)
        one_plus_scale = 1.0 + _channel_vector(Scale, bc_idx, c_valid, 0.0, HAS_SCALE, ACC, BLOCK_C)
        shift = _channel_vector(Shift, bc_idx, c_valid, 0.0, HAS_SHIFT, ACC, BLOCK_C)
        # y_pre = (x - center) * a + d
        center = (mean - add)[:, None]
        a = (rstd * w * one_plus_scale)[:, None]
        d = (bias * one_plus_scale + shift)[:, None]
        if PHASE == 0:
            s_lo = 0
            s_hi = S
        offs_s = tl.arange(0, BLOCK_S)
        y_base = Y + base
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s_idx = s0 + offs_s
            mask = c_valid[:, None] & (s_idx < S)[None, :]
            offs = offs_c[:, None] * sxc + s_idx[None, :] * sxs
            x = tl.load(x_base + offs, mask=mask, other=0.0).to(ACC)
            y = (x - center) * a + d
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(y_base + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_grad_sums(x_base, gy_base, sxc, sxs, offs_c, c_valid, center, rstd, a, d, s_lo, s_hi, S,
                     SILU: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per-channel S1 = sum g, S2 = sum g*xhat, S3 = sum xhat over s in [s_lo, s_hi)."""
    offs_s = tl.arange(0, BLOCK_S)
    s1 = tl.zeros([BLOCK_C], ACC)
    s2 = tl.zeros([BLOCK_C], ACC)
    s3 = tl.zeros([BLOCK_C], ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s_idx = s0 + offs_s
        mask = c_valid[:, None] & (s_idx < S)[None, :]
        offs = offs_c[:, None] * sxc + s_idx[None, :] * sxs
        x = tl.load(x_base + offs, mask=mask, other=0.0).to(ACC)
        gy = tl.load(gy_base + offs, mask=mask, other=0.0).to(ACC)
        xc = x - center
        g = _pre_activation_grad(gy, xc * a + d, SILU)
        xhat = tl.where(mask, xc * rstd, 0.0)
        s1 += tl.sum(g, 1)
        s2 += tl.sum(g * xhat, 1)
        s3 += tl.sum(xhat, 1)
    return s1, s2, s3


@triton.jit
def _pre_activation_grad(gy, y_pre, SILU: tl.constexpr):
    g = gy
    if SILU:
        sig = 1.0 / (1.0 + tl.exp(-y_pre))
        g = gy * sig * (1.0 + y_pre * (1.0 - sig))
    return g


@triton.jit
def _gn_bwd_kernel(
    GY, X, DX, W, Bias, Add, Scale, Shift, Mean, Rstd, Partial,
    DAdd, DScale, DShift, DWeightB, DBiasB,
    sxb, sxc, sxs, C, S, CG: tl.constexpr, G, S_CHUNK,
    HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    SPLITS, PHASE: tl.constexpr, SPLITS_P2: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // G
    grp = bg % G
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < CG
    c_idx = grp * CG + offs_c
    bc_idx = b.to(tl.int64) * C + c_idx
    base = b.to(tl.int64) * sxb + (grp * CG).to(tl.int64) * sxc
    x_base = X + base
    gy_base = GY + base
    s_lo = split * S_CHUNK
    s_hi = tl.minimum(s_lo + S_CHUNK, S)

    mean = tl.load(Mean + bg).to(ACC)
    rstd = tl.load(Rstd + bg).to(ACC)
    add = _channel_vector(Add, bc_idx, c_valid, 0.0, HAS_ADD, ACC, BLOCK_C)
    w = tl.load(W + c_idx, mask=c_valid, other=0.0).to(ACC)
    bias = tl.load(Bias + c_idx, mask=c_valid, other=0.0).to(ACC)
    one_plus_scale = 1.0 + _channel_vector(Scale, bc_idx, c_valid, 0.0, HAS_SCALE, ACC, BLOCK_C)
    shift = _channel_vector(Shift, bc_idx, c_valid, 0.0, HAS_SHIFT, ACC, BLOCK_C)
    center_c = mean - add
    a_c = rstd * w * one_plus_scale
    center = center_c[:, None]
    a = a_c[:, None]
    d = (bias * one_plus_scale + shift)[:, None]

    if PHASE == 1:  # _PARTIAL
        s1, s2, s3 = _chunk_grad_sums(x_base, gy_base, sxc, sxs, offs_c, c_valid, center, rstd, a, d,
                                      s_lo, s_hi, S, SILU, ACC, BLOCK_C, BLOCK_S)
        p = Partial + ((bg * SPLITS + split) * 3) * BLOCK_C + offs_c
        tl.store(p, s1)
        tl.store(p + BLOCK_C, s2)
        tl.store(p + 2 * BLOCK_C, s3)
    else:
        if PHASE == 0:  # _FUSED
            s1, s2, s3 = _chunk_grad_sums(x_base, gy_base, sxc, sxs, offs_c, c_valid, center, rstd, a, d,
                                          0, S, S, SILU, ACC, BLOCK_C, BLOCK_S)
            s_lo = 0
            s_hi = S
        else:  # _COMBINE
            offs_p = tl.arange(0, SPLITS_P2)
            p = Partial + ((bg * SPLITS + offs_p) * 3)[:, None] * BLOCK_C + offs_c[None, :]
            p_valid = (offs_p < SPLITS)[:, None]
            s1 = tl.sum(tl.load(p, mask=p_valid, other=0.0), 0)
            s2 = tl.sum(tl.load(p + BLOCK_C, mask=p_valid, other=0.0), 0)
            s3 = tl.sum(tl.load(p + 2 * BLOCK_C, mask=p_valid, other=0.0), 0)
        n = (CG * S).to(ACC)
        wk = w * one_plus_scale
        a1 = tl.sum(wk * s1, 0)
        a2 = tl.sum(wk * s2, 0)
        if split == 0:
            dadd = tl.zeros([BLOCK_C], ACC)
            dscale = tl.zeros([BLOCK_C], ACC)
            dshift = tl.zeros([BLOCK_C], ACC)
            if HAS_ADD:
                dadd = a_c * s1 - rstd * (S * a1 + a2 * s3) / n
            if HAS_SCALE:
                dscale = w * s2 + bias * s1
            if HAS_SHIFT:
                dshift = s1
            tl.store(DAdd + bc_idx, dadd.to(DAdd.dtype.element_ty), mask=c_valid)
            tl.store(DScale + bc_idx, dscale.to(DScale.dtype.element_ty), mask=c_valid)
            tl.store(DShift + bc_idx, dshift.to(DShift.dtype.element_ty), mask=c_valid)
            tl.store(DWeightB + bc_idx, one_plus_scale * s2, mask=c_valid)
            tl.store(DBiasB + bc_idx, one_plus_scale * s1, mask=c_valid)

        k1 = rstd * a1 / n
        k2 = rstd * a2 / n
        offs_s = tl.arange(0, BLOCK_S)
        dx_base = DX + base
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s_idx = s0 + offs_s
            mask = c_valid[:, None] & (s_idx < S)[None, :]
            offs = offs_c[:, None] * sxc + s_idx[None, :] * sxs
            x = tl.load(x_base + offs, mask=mask, other=0.0).to(ACC)
            gy = tl.load(gy_base + offs, mask=mask, other=0.0).to(ACC)
            xc = x - center
            g = _pre_activation_grad(gy, xc * a + d, SILU)
            dx = a * g - k1 - k2 * (xc * rstd)
            tl.store(dx_base + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- host side


def _bcs_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """Strides of x viewed as (B, C, S); x is (B, C, L), or (B, C, H, W) contiguous or channels_last."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1), x.stride(2)
    if x.stride(2) != x.shape[3] * x.stride(3) and x.shape[2] > 1:
        raise ValueError("group_norm_silu (triton): `x` must be contiguous or channels_last; call .contiguous() first")
    return x.stride(0), x.stride(1), x.stride(3)


def _blocks(cg: int, s: int, tile: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(cg)
    block_s = min(triton.next_power_of_2(s), max(tile // block_c, 1))
    return block_c, block_s


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: one group per program unless a test forces splits


def _plan_splits(groups: int, s: int, block_s: int, device: torch.device) -> int:
    """How many programs share one group's spatial extent: 1 while the groups fill the GPU."""
    target = 4 * _num_sms(device)
    if groups >= target // 2:
        return 1
    max_splits = max(triton.cdiv(s, block_s * _MIN_TILES_PER_SPLIT), 1)
    return max(1, min(triton.cdiv(target, groups), max_splits))


def _chunk(s: int, splits: int, block_s: int) -> int:
    """Spatial extent per split, rounded up to a multiple of block_s."""
    return triton.cdiv(triton.cdiv(s, splits), block_s) * block_s


def _optional(t, like):
    return (t.contiguous(), True) if t is not None else (like, False)


def group_norm_silu_fwd(x, weight, bias, add, scale, shift, num_groups, eps, silu, *, splits=None):
    """y (x's dtype and memory format), mean and rstd (B, G) fp32 (fp64 for fp64 x).

    ``splits`` forces the number of programs per group (tests); None picks it from the shape.
    """
    x = dense(x)
    B, C = x.shape[:2]
    S = x.numel() // (B * C)
    G = num_groups
    CG = C // G
    block_c, block_s = _blocks(CG, S, _TILE_FWD)
    if splits is None:
        splits = _plan_splits(B * G, S, block_s, x.device)
    elif splits < 1:
        raise ValueError(f"group_norm_silu (triton): `splits` must be None or >= 1, got {splits}")
    s_chunk = _chunk(S, splits, block_s)
    splits = triton.cdiv(S, s_chunk)

    y = torch.empty_like(x)
    stats_dtype = acc_dtype(x.dtype)
    mean = torch.empty((B, G), device=x.device, dtype=stats_dtype)
    rstd = torch.empty_like(mean)
    partial = torch.empty((B * G, splits, 3), device=x.device, dtype=stats_dtype) if splits > 1 else mean
    add_arg, has_add = _optional(add, x)
    scale_arg, has_scale = _optional(scale, x)
    shift_arg, has_shift = _optional(shift, x)
    args = (x, y, weight.contiguous(), bias.contiguous(), add_arg, scale_arg, shift_arg, mean, rstd, partial,
            *_bcs_strides(x), C, S, CG, G, s_chunk, float(eps))
    meta = dict(HAS_ADD=has_add, HAS_SCALE=has_scale, HAS_SHIFT=has_shift, SILU=bool(silu),
                SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), ACC=acc_tl_dtype(x.dtype),
                BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_NUM_WARPS)
    if splits == 1:
        _gn_fwd_kernel[(B * G, 1)](*args, PHASE=_FUSED, **meta)
    else:
        _gn_fwd_kernel[(B * G, splits)](*args, PHASE=_PARTIAL, **meta)
        _gn_fwd_kernel[(B * G, splits)](*args, PHASE=_COMBINE, **meta)
    return y, mean, rstd


def group_norm_silu_bwd(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu, *, splits=None):
    """dx (x's dtype and memory format), dweight, dbias (C,), dadd, dscale, dshift (B, C).

    The (B, C) gradients of absent add/scale/shift are zeros.
    """
    x = dense(x)
    grad_y = grad_y.contiguous(memory_format=memory_format(x))
    if grad_y.stride() != x.stride():  # the kernel addresses both through x's strides
        grad_y = torch.empty_like(x).copy_(grad_y)
    B, C = x.shape[:2]
    S = x.numel() // (B * C)
    G = num_groups
    CG = C // G
    block_c, block_s = _blocks(CG, S, _TILE_BWD)
    if splits is None:
        splits = _plan_splits(B * G, S, block_s, x.device)
    elif splits < 1:
        raise ValueError(f"group_norm_silu (triton): `splits` must be None or >= 1, got {splits}")
    s_chunk = _chunk(S, splits, block_s)
    splits = triton.cdiv(S, s_chunk)

    stats_dtype = acc_dtype(x.dtype)
    dx = torch.empty_like(x)
    dadd = torch.empty((B, C), device=x.device, dtype=x.dtype)
    dscale = torch.empty_like(dadd)
    dshift = torch.empty_like(dadd)
    dweight_b = torch.empty((B, C), device=x.device, dtype=stats_dtype)
    dbias_b = torch.empty_like(dweight_b)
    partial = (torch.empty((B * G, splits, 3, block_c), device=x.device, dtype=stats_dtype)
               if splits > 1 else dweight_b)
    add_arg, has_add = _optional(add, x)
    scale_arg, has_scale = _optional(scale, x)
    shift_arg, has_shift = _optional(shift, x)
    args = (grad_y, x, dx, weight.contiguous(), bias.contiguous(), add_arg, scale_arg, shift_arg,
            mean.contiguous(), rstd.contiguous(), partial, dadd, dscale, dshift, dweight_b, dbias_b,
            *_bcs_strides(x), C, S, CG, G, s_chunk)
    meta = dict(HAS_ADD=has_add, HAS_SCALE=has_scale, HAS_SHIFT=has_shift, SILU=bool(silu),
                SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), ACC=acc_tl_dtype(x.dtype),
                BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_NUM_WARPS)
    if splits == 1:
        _gn_bwd_kernel[(B * G, 1)](*args, PHASE=_FUSED, **meta)
    else:
        _gn_bwd_kernel[(B * G, splits)](*args, PHASE=_PARTIAL, **meta)
        _gn_bwd_kernel[(B * G, splits)](*args, PHASE=_COMBINE, **meta)
    dweight = dweight_b.sum(0).to(weight.dtype)
    dbias = dbias_b.sum(0).to(bias.dtype)
    return dx, dweight, dbias, dadd, dscale, dshift
