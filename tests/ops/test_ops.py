"""Every live kernel backend against the float64 reference: forward and all gradients.

Inputs are drawn fresh on every run (no fixed seed). Bounds on ||out - ref|| / ||ref||:
fp32 1e-5, fp16 2e-3, bf16 1e-2; outputs are poisoned with NaN before each call
(poison_allocator). Triton runs under TRITON_INTERPRET=1 without a GPU,
which is slow, so its cases are smaller there; bf16 runs on GPUs only (the
interpreter's bf16 dot is unreliable).
"""
from __future__ import annotations

import pytest
import torch

import dalle3_fast.ops as ops
from dalle3_fast.ops import library, reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
INTERPRETED = not torch.cuda.is_available()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, with ||ref|| floored at an RMS of 0.1: inputs are O(1), and some
    exact gradients are zero (dq with a single key), where only rounding noise remains."""
    out, ref = out.double(), ref.double()
    floor = 0.1 * max(ref.numel(), 1) ** 0.5
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()


def dtypes_for(backend: str):
    if backend == "cpu":
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    if INTERPRETED:
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def small(backend: str) -> bool:
    return backend == "triton" and INTERPRETED


def poison_allocator(*likes: torch.Tensor):
    """Hand NaN-filled blocks back to the allocator just before a call, so its outputs
    (which reuse them: the CUDA caching allocator always, glibc malloc often) start
    as NaN and any element a kernel forgets to write fails the finiteness check."""
    junk = [torch.full_like(t, float("nan")) for t in likes]
    del junk


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{name}: relative error {err:.3e} >= {TOL[dtype]:.0e} ({dtype})"


# ------------------------------------------------------------------ GroupNorm + SiLU

# (shape, groups, layout, modulation, silu, eps, offset). offset shifts x's mean far from 0,
# which breaks a naive E[x^2] - E[x]^2 variance.
GN_CASES = [
    ((2, 320, 5, 7), 32, "nchw", ("add", "scale", "shift"), True, 1e-5, 0.0),
    ((2, 320, 6, 5), 32, "channels_last", ("add", "scale", "shift"), True, 1e-5, 0.0),
    ((1, 1280, 3, 3), 32, "channels_last", ("scale", "shift"), True, 1e-6, 0.0),
    ((1, 1280, 2, 5), 32, "nchw", ("add",), True, 1e-5, 0.0),
    ((2, 64, 37), 8, "ncl", (), False, 1e-3, 0.0),
    ((3, 96, 129), 32, "ncl", ("add",), True, 1e-5, 0.0),
    ((2, 40, 9, 11), 5, "channels_last", ("add",), False, 1e-5, 30.0),
    ((2, 40, 9, 11), 5, "nchw", ("shift",), True, 1e-5, 30.0),
]
GN_CASES_SMALL = [
    ((2, 64, 4, 5), 32, "nchw", ("add", "scale", "shift"), True, 1e-5, 0.0),
    ((2, 64, 3, 5), 8, "channels_last", ("add", "scale", "shift"), True, 1e-5, 0.0),
    ((2, 32, 37), 4, "ncl", ("scale",), False, 1e-3, 0.0),
]


def make_gn_inputs(shape, layout, modulation, offset, dtype, device):
    B, C = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + offset
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(C, device=device, dtype=dtype)
    bias = torch.randn(C, device=device, dtype=dtype)
    mods = {name: torch.randn(B, C, device=device, dtype=dtype) * 0.5 for name in modulation}
    return x, weight, bias, mods


def run_group_norm(fn, x, weight, bias, mods, groups, eps, silu, grad_y):
    leaves = {"x": x, "weight": weight, "bias": bias, **mods}
    leaves = {k: v.detach().clone(memory_format=torch.preserve_format).requires_grad_() for k, v in leaves.items()}
    extra = {k: leaves[k] for k in mods}
    poison_allocator(x)
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], groups, eps, silu=silu, **extra)
    poison_allocator(*leaves.values())
    y.backward(grad_y.to(y.dtype))
    return y, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("case", range(len(GN_CASES)))
def test_group_norm_silu_matches_float64_reference(backend, device, case):
    cases = GN_CASES_SMALL if small(backend) else GN_CASES
    if case >= len(cases):
        pytest.skip("fewer cases under the Triton interpreter")
    shape, groups, layout, modulation, silu, eps, offset = cases[case]
    for dtype in dtypes_for(backend):
        x, weight, bias, mods = make_gn_inputs(shape, layout, modulation, offset, dtype, device)
        grad_y = torch.randn(shape, device=device, dtype=torch.float64)
        with ops.use_backend(backend):
            y, grads = run_group_norm(ops.group_norm_silu, x, weight, bias, mods, groups, eps, silu, grad_y)
        ref_mods = {k: v.double() for k, v in mods.items()}
        y_ref, grads_ref = run_group_norm(
            reference.group_norm_silu, x.double(), weight.double(), bias.double(), ref_mods, groups, eps, silu, grad_y)
        assert y.dtype == dtype
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
            assert grads["x"].is_contiguous(memory_format=torch.channels_last), "dx lost channels_last"
        assert_close(f"{backend} y {dtype}", y, y_ref, dtype)
        for name, g in grads.items():
            assert g.dtype == dtype, f"grad of {name} has dtype {g.dtype}"
            assert_close(f"{backend} d{name} {dtype}", g, grads_ref[name], dtype)


def test_group_norm_silu_stats_outputs(backend, device):
    """mean/rstd of the forward op are (B, G) float32 and match the statistics of x + add."""
    x = torch.randn(2, 64, 5, 3, device=device)
    add = torch.randn(2, 64, device=device)
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    y, mean, rstd = library.kernels(backend).group_norm_silu_fwd(x, w, b, add, None, None, 8, 1e-5, True)
    v = (x.double() + add.double()[:, :, None, None]).view(2, 8, -1)
    assert mean.shape == (2, 8) and mean.dtype == torch.float32 and rstd.dtype == torch.float32
    assert_close("mean", mean, v.mean(-1), torch.float32)
    assert_close("rstd", rstd, (v.var(-1, unbiased=False) + 1e-5).rsqrt(), torch.float32)


# ------------------------------------------------------------------ attention

# (B, N, L, H, D, key_lengths or None for self-attention)
ATTN_CASES = [
    (2, 37, 37, 2, 40, None),
    (1, 129, 129, 2, 80, None),
    (1, 67, 67, 2, 160, None),
    (2, 64, 64, 3, 32, None),
    (1, 100, 100, 1, 96, None),
    (1, 130, 130, 1, 128, None),
    (1, 600, 600, 1, 64, None),  # several query blocks and key tiles
    (2, 37, 1, 2, 64, [1, 0]),
    (3, 37, 512, 2, 64, [512, 300, 0]),
    (2, 129, 77, 2, 40, [77, 5]),
    (2, 65, 129, 1, 160, [128, 129]),
]
ATTN_CASES_SMALL = [
    (2, 37, 37, 2, 40, None),
    (1, 80, 80, 1, 64, None),
    (2, 19, 1, 1, 32, [1, 0]),
    (3, 33, 77, 1, 64, [77, 20, 0]),
]


def run_attention(fn, q, k, v, key_lengths, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    poison_allocator(q)
    out = fn(*leaves) if key_lengths is None else fn(*leaves, key_lengths)
    poison_allocator(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("case", range(len(ATTN_CASES)))
def test_attention_matches_float64_reference(backend, device, case):
    cases = ATTN_CASES_SMALL if small(backend) else ATTN_CASES
    if case >= len(cases):
        pytest.skip("fewer cases under the Triton interpreter")
    B, N, L, H, D, lengths = cases[case]
    key_lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=device)
    fn = ops.attention if lengths is None else ops.cross_attention
    ref_fn = reference.attention if lengths is None else reference.cross_attention
    for dtype in dtypes_for(backend):
        q = torch.randn(B, N, H, D, device=device, dtype=dtype)
        k = torch.randn(B, L, H, D, device=device, dtype=dtype)
        v = torch.randn(B, L, H, D, device=device, dtype=dtype)
        grad_out = torch.randn(B, N, H, D, device=device, dtype=torch.float64)
        with ops.use_backend(backend):
            out, grads = run_attention(fn, q, k, v, key_lengths, grad_out)
        out_ref, grads_ref = run_attention(ref_fn, q.double(), k.double(), v.double(), key_lengths, grad_out)
        assert out.dtype == dtype
        assert_close(f"{backend} out {dtype}", out, out_ref, dtype)
        for name, g, g_ref in zip("qkv", grads, grads_ref):
            assert g.dtype == dtype
            assert_close(f"{backend} d{name} {dtype}", g, g_ref, dtype)
        if lengths is not None:
            empty = [b for b, n in enumerate(lengths) if n == 0]
            for b in empty:  # no keys: zeros and zero gradients, never NaN
                assert (out[b] == 0).all() and (grads[0][b] == 0).all()
                assert (grads[1][b] == 0).all() and (grads[2][b] == 0).all()


def test_attention_lse_output(backend, device):
    """lse is (B, H, N) float32, the log-sum-exp of the scaled scores, -inf for samples with no keys."""
    B, N, L, H, D = 2, 19, 33, 2, 32
    q, k, v = (torch.randn(B, n, H, D, device=device) for n in (N, L, L))
    lengths = torch.tensor([L - 4, 0], dtype=torch.int32, device=device)
    out, lse = library.kernels(backend).attention_fwd(q, k, v, lengths, 0.3)
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    scores = torch.einsum("bnhd,blhd->bhnl", q.double(), k.double())[0, :, :, : L - 4] * 0.3
    assert_close("lse", lse[0], torch.logsumexp(scores, -1), torch.float32)
    assert torch.isneginf(lse[1]).all()
    assert (out[1] == 0).all()


def test_default_scale_is_inverse_sqrt_head_dim(backend, device):
    q, k, v = (torch.randn(1, 21, 2, 64, device=device) for _ in range(3))
    with ops.use_backend(backend):
        out = ops.attention(q, k, v)
        out_scaled = ops.attention(q, k, v, scale=0.5)
    assert_close("default scale", out, reference.attention(q.double(), k.double(), v.double()), torch.float32)
    assert_close("scale=0.5", out_scaled, reference.attention(q.double(), k.double(), v.double(), scale=0.5),
                 torch.float32)


# ------------------------------------------------------------------ float64 gradcheck (CPU kernels)


@pytest.fixture
def cpu_backend():
    if "cpu" not in ops.available_backends():
        pytest.skip("the CPU kernels are not built")
    return "cpu"


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_gradcheck(cpu_backend, channels_last):
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = [torch.randn(8, dtype=torch.float64) for _ in range(2)] + [
        torch.randn(2, 8, dtype=torch.float64) for _ in range(3)]
    inputs = [t.requires_grad_() for t in (x, *params)]

    def fn(x, weight, bias, add, scale, shift):
        with ops.use_backend(cpu_backend):
            return ops.group_norm_silu(x, weight, bias, 2, add=add, scale=scale, shift=shift)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("lengths", [None, [5, 0]])
def test_attention_gradcheck(cpu_backend, lengths):
    q = torch.randn(2, 4, 1, 32, dtype=torch.float64, requires_grad=True)
    L = 4 if lengths is None else 5
    k = torch.randn(2, L, 1, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, L, 1, 32, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        with ops.use_backend(cpu_backend):
            if lengths is None:
                return ops.attention(q, k, v)
            return ops.cross_attention(q, k, v, torch.tensor(lengths, dtype=torch.int32))

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# ------------------------------------------------------------------ opcheck


def test_opcheck_group_norm_silu(backend, device):
    kernels = library.kernels(backend)
    B, C, G = 2, 16, 4
    x = torch.randn(B, C, 3, 5, device=device, requires_grad=True)
    w, b = (torch.randn(C, device=device, requires_grad=True) for _ in range(2))
    add, scale, shift = (torch.randn(B, C, device=device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(kernels.group_norm_silu_fwd, (x, w, b, add, scale, shift, G, 1e-5, True))
    torch.library.opcheck(kernels.group_norm_silu_fwd,
                          (x.contiguous(memory_format=torch.channels_last), w, b, None, None, None, G, 1e-5, False))
    with torch.no_grad():
        _, mean, rstd = kernels.group_norm_silu_fwd(x, w, b, add, scale, shift, G, 1e-5, True)
    grad_y = torch.randn_like(x)
    torch.library.opcheck(kernels.group_norm_silu_bwd,
                          (grad_y, x.detach(), w.detach(), b.detach(), add.detach(), None, shift.detach(), mean, rstd,
                           G, True))


@pytest.mark.parametrize("cross", [False, True])
def test_opcheck_attention(backend, device, cross):
    kernels = library.kernels(backend)
    B, N, L, H, D = 2, 17, (9 if cross else 17), 2, 32
    q = torch.randn(B, N, H, D, device=device, requires_grad=True)
    k, v = (torch.randn(B, L, H, D, device=device, requires_grad=True) for _ in range(2))
    lengths = torch.tensor([L, 3], dtype=torch.int32, device=device) if cross else None
    torch.library.opcheck(kernels.attention_fwd, (q, k, v, lengths, D**-0.5))
    out, lse = kernels.attention_fwd(q, k, v, lengths, D**-0.5)
    torch.library.opcheck(kernels.attention_bwd,
                          (torch.randn_like(q), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                           lengths, D**-0.5))


# ------------------------------------------------------------------ GroupNorm reduction paths
# ``splits`` reaches every kernel: Triton splits each group over that many programs; CUDA takes
# its single-pass path for 1 (where the group fits in shared memory) and its multi-pass path for
# more; the CPU kernels have one path and accept it.


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_group_norm_silu_every_reduction_path(backend, device, layout, splits):
    kernels = library.kernels(backend)
    shape, groups = ((2, 32, 9, 13), 4) if small(backend) else ((2, 64, 33, 17), 8)
    x, weight, bias, mods = make_gn_inputs(shape, layout, ("add", "scale", "shift"), 3.0, torch.float32, device)
    leaves = {"x": x, "weight": weight, "bias": bias, **mods}
    grad_y = torch.randn(shape, device=device)
    poison_allocator(x)
    y, mean, rstd = kernels.group_norm_silu_fwd(x, weight, bias, mods["add"], mods["scale"], mods["shift"], groups,
                                                1e-5, True, splits=splits)
    poison_allocator(x)
    grads = kernels.group_norm_silu_bwd(grad_y, x, weight, bias, mods["add"], mods["scale"], mods["shift"], mean, rstd,
                                        groups, True, splits=splits)
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    y_ref = reference.group_norm_silu(ref_leaves["x"], ref_leaves["weight"], ref_leaves["bias"], groups, 1e-5,
                                      add=ref_leaves["add"], scale=ref_leaves["scale"], shift=ref_leaves["shift"])
    y_ref.backward(grad_y.double())
    assert_close(f"{backend} y splits={splits}", y, y_ref, torch.float32)
    for name, g in zip(("x", "weight", "bias", "add", "scale", "shift"), grads):
        assert_close(f"{backend} d{name} splits={splits}", g, ref_leaves[name].grad, torch.float32)


def test_group_norm_silu_rejects_zero_splits(backend, device):
    x = torch.randn(2, 8, 3, 3, device=device)
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    with pytest.raises((RuntimeError, ValueError), match="splits"):
        library.kernels(backend).group_norm_silu_fwd(x, w, b, None, None, None, 2, 1e-5, True, splits=0)
