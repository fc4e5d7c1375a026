"""Triton backend of the fused ops (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

Same entry points and contracts as every kernel module (see dalle3_fast.ops.library):
group_norm_silu_fwd/bwd and attention_fwd/bwd.
"""
from dalle3_fast.ops.triton.flash_attention import attention_bwd, attention_fwd
from dalle3_fast.ops.triton.group_norm_silu import group_norm_silu_bwd, group_norm_silu_fwd

__all__ = ["group_norm_silu_fwd", "group_norm_silu_bwd", "attention_fwd", "attention_bwd"]
