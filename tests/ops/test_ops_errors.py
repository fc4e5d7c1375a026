"""Bad input gives one clear ValueError naming the argument, whichever backend is forced;
the native ops called directly reject it with a RuntimeError instead of crashing."""
from __future__ import annotations

import pytest
import torch

import dalle3_fast.ops as ops
from dalle3_fast.ops import library


@pytest.fixture(params=ops.BACKENDS)
def any_backend(request):
    name = request.param
    if name not in ops.available_backends():
        pytest.skip(f"backend {name!r} is not live")
    return name


def gn_args(**override):
    args = dict(x=torch.randn(2, 64, 4, 4), weight=torch.randn(64), bias=torch.randn(64), num_groups=8, eps=1e-5,
                add=None, scale=None, shift=None)
    args.update(override)
    return args


GN_BAD = [
    ("x of wrong rank", gn_args(x=torch.randn(2, 64)), r"`x` must be \(B, C, H, W\)"),
    ("integer x", gn_args(x=torch.ones(2, 64, 4, 4, dtype=torch.int32)), r"`x` has dtype torch.int32"),
    ("channels not divisible", gn_args(num_groups=7), r"not divisible by `num_groups` \(7\)"),
    ("zero groups", gn_args(num_groups=0), r"`num_groups` must be a positive int"),
    ("eps <= 0", gn_args(eps=0.0), r"`eps` must be > 0"),
    ("weight shape", gn_args(weight=torch.randn(32)), r"`weight` has shape \(32,\); expected \(64,\)"),
    ("bias dtype", gn_args(bias=torch.ones(64, dtype=torch.int64)), r"`bias` has dtype torch.int64"),
    ("add shape", gn_args(add=torch.randn(2, 32)), r"`add` has shape \(2, 32\); expected \(2, 64\)"),
    ("scale shape", gn_args(scale=torch.randn(64)), r"`scale` has shape"),
    ("shift on another device", gn_args(shift=torch.randn(2, 64, device="meta")), r"`shift` is on meta"),
    ("empty x", gn_args(x=torch.randn(0, 64, 4, 4)), r"`x` is empty"),
]


@pytest.mark.parametrize("what,args,message", GN_BAD, ids=[c[0] for c in GN_BAD])
def test_group_norm_silu_rejects(any_backend, what, args, message):
    args = dict(args)
    x, weight, bias, groups, eps = (args.pop(k) for k in ("x", "weight", "bias", "num_groups", "eps"))
    with ops.use_backend(any_backend), pytest.raises(ValueError, match=message) as err:
        ops.group_norm_silu(x, weight, bias, groups, eps, **args)
    assert str(err.value).startswith("group_norm_silu: ")


def qkv(B=2, N=8, L=8, H=2, D=32, dtype=torch.float32):
    return torch.randn(B, N, H, D, dtype=dtype), torch.randn(B, L, H, D, dtype=dtype), torch.randn(B, L, H, D,
                                                                                                  dtype=dtype)


def lengths(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


ATTN_BAD = [
    ("unsupported head dim", lambda: ops.attention(*qkv(D=48)), r"head dim D=48 of `q` is not supported"),
    ("q of wrong rank", lambda: ops.attention(torch.randn(2, 8, 32), *qkv()[1:]), r"`q` must be \(B, N, H, D\)"),
    ("k heads mismatch", lambda: ops.attention(qkv()[0], *qkv(H=3)[1:]), r"`k` has shape \(2, 8, 3, 32\)"),
    ("v shape mismatch", lambda: ops.attention(*qkv()[:2], torch.randn(2, 8, 2, 40)), r"`v` has shape"),
    ("k dtype mismatch", lambda: ops.attention(qkv()[0], *qkv(dtype=torch.float64)[1:]), r"`k` has dtype"),
    ("integer q", lambda: ops.attention(*(t.to(torch.int32) for t in qkv())), r"`q` has dtype torch.int32"),
    ("k on another device", lambda: ops.attention(qkv()[0], torch.randn(2, 8, 2, 32, device="meta"), qkv()[2]),
     r"`k` is on meta"),
    ("self-attention with other key count", lambda: ops.attention(*qkv(L=5)), r"use cross_attention"),
    ("key_lengths int64", lambda: ops.cross_attention(*qkv(L=5), lengths(5, 3, dtype=torch.int64)),
     r"`key_lengths` has dtype torch.int64"),
    ("key_lengths shape", lambda: ops.cross_attention(*qkv(L=5), lengths(5, 3, 1)),
     r"`key_lengths` has shape \(3,\); expected \(2,\)"),
    ("key_lengths too large", lambda: ops.cross_attention(*qkv(L=5), lengths(6, 3)),
     r"`key_lengths` must lie in \[0, L=5\]"),
    ("key_lengths negative", lambda: ops.cross_attention(*qkv(L=5), lengths(-1, 3)),
     r"`key_lengths` must lie in \[0, L=5\]"),
    ("key_lengths missing", lambda: ops.cross_attention(*qkv(L=5), None), r"`key_lengths` must be an int32 tensor"),
    ("too many keys", lambda: ops.cross_attention(*qkv(L=513), lengths(5, 3)), r"at most 512"),
]


@pytest.mark.parametrize("what,call,message", ATTN_BAD, ids=[c[0] for c in ATTN_BAD])
def test_attention_rejects(any_backend, what, call, message):
    with ops.use_backend(any_backend), pytest.raises(ValueError, match=message) as err:
        call()
    assert str(err.value).split(": ")[0] in ("attention", "cross_attention")


# ------------------------------------------------------------------ the native ops, called directly


@pytest.fixture
def native_ops():
    if "cpu" not in ops.available_backends():
        pytest.skip("the CPU kernels are not built")
    return library.kernels("cpu")


def test_native_group_norm_rejects_bad_input(native_ops):
    x, w, b = torch.randn(2, 64, 4, 4), torch.randn(64), torch.randn(64)
    bad_calls = [
        lambda: native_ops.group_norm_silu_fwd(x, w, b, None, None, None, 7, 1e-5, True),
        lambda: native_ops.group_norm_silu_fwd(x, w[:32], b, None, None, None, 8, 1e-5, True),
        lambda: native_ops.group_norm_silu_fwd(x, w, b, torch.randn(2, 32), None, None, 8, 1e-5, True),
        lambda: native_ops.group_norm_silu_fwd(torch.randn(2, 64), w, b, None, None, None, 8, 1e-5, True),
        lambda: native_ops.group_norm_silu_fwd(torch.randn(0, 64, 4, 4), w, b, None, None, None, 8, 1e-5, True),
        lambda: native_ops.group_norm_silu_fwd(x, w, b, None, None, None, 8, -1.0, True),
        lambda: native_ops.group_norm_silu_fwd(x, w, b, None, None, None, 8, 1e-5, True, splits=0),
        lambda: native_ops.group_norm_silu_fwd(x.to(torch.int32), w, b, None, None, None, 8, 1e-5, True),
        lambda: native_ops.group_norm_silu_bwd(torch.randn(2, 64, 4, 3), x, w, b, None, None, None,
                                               torch.zeros(2, 8), torch.ones(2, 8), 8, True),
        lambda: native_ops.group_norm_silu_bwd(x, x, w, b, None, None, None, torch.zeros(2, 4), torch.ones(2, 4), 8,
                                               True),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()


def test_native_attention_rejects_bad_input(native_ops):
    q, k, v = qkv(L=5)
    good_lengths = lengths(5, 3)
    bad_calls = [
        lambda: native_ops.attention_fwd(q, k[:, :, :1], v, None, 0.1),
        lambda: native_ops.attention_fwd(q, k, v[:, :4], None, 0.1),
        lambda: native_ops.attention_fwd(q, k.double(), v, None, 0.1),
        lambda: native_ops.attention_fwd(q[0], k, v, None, 0.1),
        lambda: native_ops.attention_fwd(q, k, v, lengths(5, 3, dtype=torch.int64), 0.1),
        lambda: native_ops.attention_fwd(q, k, v, lengths(6, 3), 0.1),
        lambda: native_ops.attention_fwd(q, k, v, lengths(-2, 3), 0.1),
        lambda: native_ops.attention_fwd(q, k, v, lengths(5), 0.1),
        lambda: native_ops.attention_fwd(q[:, :0], k, v, None, 0.1),
        lambda: native_ops.attention_fwd(*qkv(D=48), None, 0.1),
        lambda: native_ops.attention_fwd(q, *qkv(L=513)[1:], lengths(5, 3), 0.1),
        lambda: native_ops.attention_bwd(q, q, k, v, q, torch.zeros(2, 2, 7), good_lengths, 0.1),
        lambda: native_ops.attention_bwd(q[:, :4], q, k, v, q, torch.zeros(2, 2, 8), good_lengths, 0.1),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()
