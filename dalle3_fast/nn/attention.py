"""Multi-head attention on the fused ops, in diffusers' ``Attention`` layout.

Parameter names match diffusers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so SD
U-Net weights load. Self-attention runs ``dalle3_fast.ops.attention``; cross-attention
to text tokens runs ``dalle3_fast.ops.cross_attention`` with per-sample key lengths, so
padded tokens are ignored exactly (no additive -10000 bias, no NaN for empty prompts).

The text side of cross-attention travels as a ``TextContext``: the token embeddings and
their lengths, or the keys/values every cross-attention layer projected from them once
(``kv``), which a sampler computes once per call and reuses at every denoising step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dalle3_fast import ops


class TextContext(NamedTuple):
    """What cross-attention attends to.

    tokens:  (B, L, C) text token embeddings, or None when ``kv`` is given.
    lengths: (B,) int32; sample b attends to tokens [0, lengths[b]).
    kv:      None, or one (k, v) pair per cross-attention layer (indexed by the layer's
             ``kv_slot``), each (B, L, heads, head_dim), as ``Attention.project_kv`` makes them.
    """

    tokens: torch.Tensor | None
    lengths: torch.Tensor
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]  # no int(): a symbolic batch must stay symbolic under torch.export

    @staticmethod
    def from_tokens(tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> "TextContext":
        """Validate text tokens (B, L, C) and turn ``lengths`` (B,) or a keep-``mask`` (B, L) into lengths.

        A mask (bool, or 0/1 numbers: nonzero = keep, as diffusers' ``encoder_attention_mask``)
        need not be a prefix: kept tokens are moved to the front in their order, which leaves
        attention unchanged because it does not depend on key order.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"`encoder_hidden_states` must be a (B, L, C) tensor of text tokens, got {shape}")
        B, L, _ = tokens.shape
        if L == 0:
            raise ValueError("`encoder_hidden_states` has no tokens (L=0); pad prompts to at least one token")
        if lengths is not None and mask is not None:
            raise ValueError("pass either `encoder_lengths` or `encoder_attention_mask`, not both")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, L):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"`encoder_attention_mask` must be a (B, L) = ({B}, {L}) tensor "
                                 f"(True/1 = keep), got {shape}")
            keep = (mask != 0).to(tokens.device)
            lengths = keep.sum(dim=1, dtype=torch.int32)
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            tokens = torch.gather(tokens, 1, order[:, :, None].expand(B, L, tokens.shape[2]))
            return TextContext(tokens, lengths)
        if lengths is None:
            return TextContext(tokens, torch.full((B,), L, dtype=torch.int32, device=tokens.device))
        if (not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (B,)
                or lengths.dtype.is_floating_point or lengths.dtype == torch.bool):
            shape = (f"{tuple(lengths.shape)} {lengths.dtype}" if isinstance(lengths, torch.Tensor)
                     else type(lengths).__name__)
            raise ValueError(f"`encoder_lengths` must be an integer tensor of shape (B,) = ({B},), got {shape}")
        lengths = lengths.to(device=tokens.device, dtype=torch.int32)
        if lengths.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > L:
                raise ValueError(f"`encoder_lengths` must lie in [0, L={L}], got values in [{lo}, {hi}]")
        return TextContext(tokens, lengths)


class Attention(nn.Module):
    """Multi-head attention of ``query_dim``-wide tokens, ``heads`` x ``dim_head`` inner width.

    Self-attention when ``cross_attention_dim`` is None, else cross-attention to a
    ``TextContext`` whose tokens are ``cross_attention_dim`` wide. Softmax always runs in
    float32 inside the ops, so diffusers' ``upcast_attention`` holds whatever its value.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim_head not in ops.SUPPORTED_HEAD_DIMS:
            raise ValueError(f"Attention: head dim {dim_head} is not supported by the fused attention ops; "
                             f"choose channels / heads in {ops.SUPPORTED_HEAD_DIMS}")
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.is_cross_attention = cross_attention_dim is not None
        self.kv_slot: int | None = None  # position of this layer's (k, v) in TextContext.kv
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self._qkv_cache: tuple | None = None  # (key, weight, bias) of the stacked self-attention projections

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.dim_head))

    def _stacked_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """to_q, to_k, to_v as one (3 * inner, C) projection: one GEMM instead of three per self-attention.

        Outside autograd and tracing the stacked copy is kept and remade only when a weight changes
        (another tensor, or an in-place update: load_state_dict, optimizer steps)."""
        layers = (self.to_q, self.to_k, self.to_v)
        weights = [layer.weight for layer in layers]
        biases = [layer.bias for layer in layers]
        tensors = weights + [b for b in biases if b is not None]
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling() and all(
            type(t) is nn.Parameter or type(t) is torch.Tensor for t in tensors)
        key = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors) if cacheable else None
        if key is not None and self._qkv_cache is not None and self._qkv_cache[0] == key:
            return self._qkv_cache[1], self._qkv_cache[2]
        weight = torch.cat(weights)
        bias = None if biases[0] is None else torch.cat(biases)
        self._qkv_cache = (key, weight, bias) if key is not None else None
        return weight, bias

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, L, heads, dim_head) of ``tokens`` (B, L, C)."""
        return self._heads(self.to_k(tokens)), self._heads(self.to_v(tokens))

    def forward(self, hidden_states: torch.Tensor, context: TextContext | None = None) -> torch.Tensor:
        """hidden_states (B, N, query_dim) -> (B, N, query_dim)."""
        if hidden_states.dim() != 3:
            raise ValueError(f"Attention: `hidden_states` must be (B, N, C), got {tuple(hidden_states.shape)}")
        if not self.is_cross_attention:
            qkv = F.linear(hidden_states, *self._stacked_qkv())
            q, k, v = qkv.unflatten(-1, (3, self.heads, self.dim_head)).unbind(-3)
            out = ops.attention(q, k, v, scale=self.dim_head ** -0.5)
        else:
            q = self._heads(self.to_q(hidden_states))
            if context is None:
                raise ValueError("Attention: this is a cross-attention layer; pass a TextContext with the text tokens")
            if context.kv is not None:
                if self.kv_slot is None or self.kv_slot >= len(context.kv):
                    raise ValueError("Attention: the TextContext's precomputed K/V were not made for this model "
                                     "(no entry for this layer); make them with the same model's precompute_text_kv")
                k, v = context.kv[self.kv_slot]
            else:
                k, v = self.project_kv(context.tokens)
            if k.shape[0] != q.shape[0]:
                raise ValueError(f"Attention: the text context has batch {k.shape[0]} but the image tokens have "
                                 f"batch {q.shape[0]}; give one prompt per sample")
            out = ops.cross_attention(q, k.to(q.dtype), v.to(q.dtype), context.lengths, scale=self.dim_head ** -0.5)
        out = self.to_out[0](out.flatten(-2))
        dropout = self.to_out[1]
        return dropout(out) if dropout.training and dropout.p > 0 else out
