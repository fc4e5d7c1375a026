"""Validation of the public ops' inputs, shared by every backend: one clear ValueError naming
the argument. (The C++ operators validate again, in csrc/op_checks.cpp, for direct calls.)"""
from __future__ import annotations

import torch

from dalle3_fast import _native

SUPPORTED_HEAD_DIMS: tuple[int, ...] = tuple(_native.limit("SUPPORTED_HEAD_DIMS"))  # head dims of the attention ops
MAX_KEY_TOKENS: int = int(_native.limit("MAX_KEY_TOKENS"))  # most keys cross_attention takes
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _check_tensor(op, name, t, *, device, dtype=None, shape=None):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        _fail(op, f"`{name}` is on {t.device} but `x`/`q` is on {device}; move all inputs to one device")
    if dtype is not None and t.dtype not in dtype:
        _fail(op, f"`{name}` has dtype {t.dtype}; expected one of {', '.join(str(d) for d in dtype)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(op, f"`{name}` has shape {tuple(t.shape)}; expected {tuple(shape)}")


def check_group_norm_silu(x, weight, bias, num_groups, eps, add, scale, shift):
    op = "group_norm_silu"
    if not isinstance(x, torch.Tensor):
        _fail(op, f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        _fail(op, f"`x` must be (B, C, H, W) or (B, C, L), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        _fail(op, f"`x` has dtype {x.dtype}; expected a floating dtype (float16, bfloat16, float32, float64)")
    B, C = x.shape[:2]
    if not isinstance(num_groups, int) or num_groups <= 0:
        _fail(op, f"`num_groups` must be a positive int, got {num_groups!r}")
    if C % num_groups != 0:
        _fail(op, f"channels ({C}) are not divisible by `num_groups` ({num_groups}); pick a divisor of {C}")
    if not eps > 0:
        _fail(op, f"`eps` must be > 0, got {eps}")
    if x.numel() == 0:
        _fail(op, f"`x` is empty (shape {tuple(x.shape)})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(op, name, t, device=x.device, dtype=FLOAT_DTYPES, shape=(C,))
    for name, t in (("add", add), ("scale", scale), ("shift", shift)):
        if t is not None:
            _check_tensor(op, name, t, device=x.device, dtype=FLOAT_DTYPES, shape=(B, C))


def check_attention(op, q, k, v, key_lengths=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(op, f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            _fail(op, f"`{name}` must be (B, N, H, D), got shape {tuple(t.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        _fail(op, f"`q` has dtype {q.dtype}; expected float16, bfloat16, float32 or float64")
    for name, t in (("k", k), ("v", v)):
        _check_tensor(op, name, t, device=q.device, dtype=(q.dtype,))
    B, N, H, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        _fail(op, f"head dim D={D} of `q` is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        _fail(op, f"`k` has shape {tuple(k.shape)}; expected (B={B}, L, H={H}, D={D}) to match `q` {tuple(q.shape)}")
    if v.shape != k.shape:
        _fail(op, f"`v` has shape {tuple(v.shape)}; expected the shape of `k` {tuple(k.shape)}")
    if N == 0 or k.shape[1] == 0:
        _fail(op, f"empty sequence: `q` {tuple(q.shape)}, `k` {tuple(k.shape)}")
    if key_lengths is None:
        if op == "attention" and k.shape[1] != N:
            _fail(op, f"self-attention needs as many keys as queries: `q` has N={N}, `k` has {k.shape[1]}; "
                      "use cross_attention for a different key count")
        return
    L = k.shape[1]
    if L > MAX_KEY_TOKENS:
        _fail(op, f"`k` has L={L} tokens; cross_attention supports at most {MAX_KEY_TOKENS} (T5 tokens)")
    _check_tensor(op, "key_lengths", key_lengths, device=q.device, dtype=(torch.int32,), shape=(B,))
    # Checking values on a GPU would sync every call; the GPU kernels clamp lengths to [0, L] instead.
    if key_lengths.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(key_lengths.min()), int(key_lengths.max())
        if lo < 0 or hi > L:
            _fail(op, f"`key_lengths` must lie in [0, L={L}], got values in [{lo}, {hi}]")
