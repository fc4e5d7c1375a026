"""Transformer layers of the CoCa captioner.

Non-causal attention (ViT self-attention, the attentional pooler, cross-attention to
image tokens) runs on ``dalle3_fast.ops``; causal self-attention uses PyTorch's
``scaled_dot_product_attention`` and can write its keys/values into a ``LayerCache``
so decoding feeds one token per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dalle3_fast import ops


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Non-causal multi-head self-attention over (B, N, C) on the fused attention op."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)
        return self.proj(ops.attention(q, k, v).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Queries from x (B, N, C) attend to a context (B, L, C_ctx) on the fused cross-attention op.

    ``context_kv`` projects the context once; ``forward`` then takes those (k, v) so a
    decoder reuses them at every step.
    """

    def __init__(self, width: int, context_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width, 2 * width)
        self.proj = nn.Linear(width, width)

    def context_kv(self, context):
        B, L, _ = context.shape
        width = self.q.out_features
        k, v = self.kv(context).view(B, L, 2, self.heads, width // self.heads).unbind(2)
        return k, v

    def forward(self, x, kv):
        k, v = kv
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, C // self.heads)
        lengths = torch.full((B,), k.shape[1], dtype=torch.int32, device=x.device)
        return self.proj(ops.cross_attention(q, k, v, lengths).reshape(B, N, C))


class LayerCache:
    """Keys/values (B, H, T_max, D) of one causal self-attention layer, filled up to ``length``."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k, v):
        T = k.shape[2]
        end = self.length + T
        if end > self.k.shape[2]:
            raise ValueError(f"LayerCache: {end} positions exceed the cache size {self.k.shape[2]}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search moves caches along with their beams)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, cache: LayerCache | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # several new tokens after a prefix: query i sees keys <= past + i
            allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class EncoderBlock(nn.Module):
    """Pre-LN ViT block: non-causal self-attention + MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: causal self-attention [+ cross-attention to image tokens] + MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, context_width: int | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = CausalSelfAttention(width, heads)
        if context_width is not None:
            self.ln_cross = nn.LayerNorm(width, eps=eps)
            self.cross_attn = CrossAttention(width, context_width, heads)
        else:
            self.cross_attn = None
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x, cache: LayerCache | None = None, context_kv=None):
        x = x + self.attn(self.ln_1(x), cache)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.ln_cross(x), context_kv)
        return x + self.mlp(self.ln_2(x))


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to a token sequence (open_clip's AttentionalPooler)."""

    def __init__(self, width: int, heads: int, num_queries: int, eps: float):
        super().__init__()
        self.query = nn.Parameter(torch.empty(num_queries, width))
        self.ln_q = nn.LayerNorm(width, eps=eps)
        self.ln_k = nn.LayerNorm(width, eps=eps)
        self.attn = CrossAttention(width, width, heads)

    def forward(self, x):
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, self.attn.context_kv(self.ln_k(x)))
