"""Kernel modules by backend name. Each exposes group_norm_silu_fwd/bwd and attention_fwd/bwd."""
from __future__ import annotations


def get(backend: str):
    if backend in ("cpu", "cuda"):
        from dalle3_fast.ops import native

        return native
    if backend == "triton":
        from dalle3_fast.ops import triton as triton_kernels

        return triton_kernels
    raise ValueError(f"no kernel module for backend {backend!r}")
