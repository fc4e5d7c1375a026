"""The fused ops as torch operators: every schema in one table, fake and autograd on each op.

Two families of operators share the four schemas of ``SCHEMAS``:

- ``dalle3_fast::<name>``: the C++ kernels. ``dalle3_fast._C`` registers their CPU
  (csrc/cpu) and CUDA (csrc/cuda/binding.cpp) implementations; the dispatcher picks by device.
- ``dalle3_fast::<name>_triton``: the Triton kernels (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``), implemented here.

Each forward op also returns what its backward needs (GroupNorm mean/rstd, attention
log-sum-exp), so torch.compile and torch.export see one node per call; the backward of a
forward op is the backward op of its own family. ``ops.group_norm_silu`` and friends pick
the family (``kernels``) that ``dispatch.resolve`` names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dalle3_fast.ops.layout import acc_dtype, memory_format

NAMESPACE = "dalle3_fast"

# ``splits`` chooses how a GroupNorm group is reduced, for tests: None plans it from the
# shape; 1 has one program own a whole group (single pass); n > 1 splits the group's spatial
# extent over n programs (Triton) or takes the multi-pass path (CUDA). The CPU kernels have one path.
SCHEMAS = {
    "group_norm_silu_fwd": (
        "(Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor? scale, Tensor? shift, int num_groups, "
        "float eps, bool silu, *, int? splits=None) -> (Tensor y, Tensor mean, Tensor rstd)"),
    "group_norm_silu_bwd": (
        "(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor? scale, Tensor? shift, "
        "Tensor mean, Tensor rstd, int num_groups, bool silu, *, int? splits=None) "
        "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dadd, Tensor dscale, Tensor dshift)"),
    # Self-attention is the case key_lengths=None: every key is valid. lse is (B, H, N) in the
    # accumulation dtype, natural log, -inf for rows that see no key.
    "attention_fwd": "(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, float scale) -> (Tensor out, Tensor lse)",
    "attention_bwd": (
        "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_lengths, "
        "float scale) -> (Tensor dq, Tensor dk, Tensor dv)"),
}

# Operator name suffix of each family.
FAMILIES = {"native": "", "triton": "_triton"}
_FAMILY_OF_BACKEND = {"cpu": "native", "cuda": "native", "triton": "triton"}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _suffix in FAMILIES.values():
    for _name, _schema in SCHEMAS.items():
        _lib.define(_name + _suffix + _schema)


@dataclass(frozen=True)
class Kernels:
    """The four operators of one family."""

    group_norm_silu_fwd: torch._ops.OpOverload
    group_norm_silu_bwd: torch._ops.OpOverload
    attention_fwd: torch._ops.OpOverload
    attention_bwd: torch._ops.OpOverload


def _family(suffix: str) -> Kernels:
    ns = getattr(torch.ops, NAMESPACE)
    return Kernels(*(getattr(ns, name + suffix).default for name in SCHEMAS))


_KERNELS = {family: _family(suffix) for family, suffix in FAMILIES.items()}


def kernels(backend: str) -> Kernels:
    """The operators that run ``backend`` ("cpu", "cuda" or "triton")."""
    return _KERNELS[_FAMILY_OF_BACKEND[backend]]


# ---------------------------------------------------------------- fake implementations


def _gn_fwd_fake(x, weight, bias, add, scale, shift, num_groups, eps, silu, *, splits=None):
    stats = x.new_empty((x.shape[0], num_groups), dtype=acc_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _gn_bwd_fake(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu, *, splits=None):
    per_sample = x.new_empty(x.shape[:2])
    return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias),
            torch.empty_like(per_sample), torch.empty_like(per_sample), torch.empty_like(per_sample))


def _attn_fwd_fake(q, k, v, key_lengths, scale):
    B, N, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, N), dtype=acc_dtype(q.dtype))


def _attn_bwd_fake(grad_out, q, k, v, out, lse, key_lengths, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_FAKES = {"group_norm_silu_fwd": _gn_fwd_fake, "group_norm_silu_bwd": _gn_bwd_fake,
          "attention_fwd": _attn_fwd_fake, "attention_bwd": _attn_bwd_fake}

# ---------------------------------------------------------------- autograd


def _gn_setup(ctx, inputs, keyword_only_inputs, output):
    x, weight, bias, add, scale, shift, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.splits = num_groups, silu, keyword_only_inputs.get("splits")


def _gn_backward(bwd_op, ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dadd, dscale, dshift = bwd_op(
        grad_y.contiguous(memory_format=memory_format(x)), x, weight, bias, add, scale, shift, mean, rstd,
        ctx.num_groups, ctx.silu, splits=ctx.splits)
    return (dx, dw, db,
            dadd if add is not None else None,
            dscale if scale is not None else None,
            dshift if shift is not None else None,
            None, None, None)


def _attn_setup(ctx, inputs, output):
    q, k, v, key_lengths, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths)
    ctx.scale = scale


def _attn_backward(bwd_op, ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    dq, dk, dv = bwd_op(grad_out.contiguous(), q, k, v, out, lse, key_lengths, ctx.scale)
    return dq, dk, dv, None, None


def _register(suffix: str, ops: Kernels) -> None:
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{NAMESPACE}::{name}{suffix}", fake, lib=_lib)
    torch.library.register_autograd(
        f"{NAMESPACE}::group_norm_silu_fwd{suffix}",
        lambda ctx, *grads: _gn_backward(ops.group_norm_silu_bwd, ctx, *grads), setup_context=_gn_setup, lib=_lib)
    torch.library.register_autograd(
        f"{NAMESPACE}::attention_fwd{suffix}",
        lambda ctx, *grads: _attn_backward(ops.attention_bwd, ctx, *grads), setup_context=_attn_setup, lib=_lib)


for _family_name, _suffix in FAMILIES.items():
    _register(_suffix, _KERNELS[_family_name])

# ---------------------------------------------------------------- Triton implementations
# Imported on first call: importing Triton costs seconds, and most processes never need it.


def _triton():
    from dalle3_fast.ops import triton as triton_kernels

    return triton_kernels


def _triton_gn_fwd(x, weight, bias, add, scale, shift, num_groups, eps, silu, *, splits=None):
    return _triton().group_norm_silu_fwd(x, weight, bias, add, scale, shift, num_groups, eps, silu, splits=splits)


def _triton_gn_bwd(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu, *, splits=None):
    return _triton().group_norm_silu_bwd(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu,
                                         splits=splits)


def _triton_attn_fwd(q, k, v, key_lengths, scale):
    return _triton().attention_fwd(q, k, v, key_lengths, scale)


def _triton_attn_bwd(grad_out, q, k, v, out, lse, key_lengths, scale):
    return _triton().attention_bwd(grad_out, q, k, v, out, lse, key_lengths, scale)


for _name, _impl in (("group_norm_silu_fwd", _triton_gn_fwd), ("group_norm_silu_bwd", _triton_gn_bwd),
                     ("attention_fwd", _triton_attn_fwd), ("attention_bwd", _triton_attn_bwd)):
    for _key in ("CPU", "CUDA"):  # CPU tensors run under TRITON_INTERPRET=1
        _lib.impl(_name + FAMILIES["triton"], _impl, _key)
