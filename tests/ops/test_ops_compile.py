"""torch.compile(fullgraph=True) sees each fused op as one node: a small block built from
them compiles without graph breaks and matches eager, forward and backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dalle3_fast.ops as ops


class TinyBlock(nn.Module):
    """GroupNorm+SiLU -> self-attention -> cross-attention to a padded context."""

    def __init__(self, channels=64, heads=2, context_dim=24, groups=8):
        super().__init__()
        self.heads, self.groups = heads, groups
        self.norm_weight = nn.Parameter(torch.randn(channels))
        self.norm_bias = nn.Parameter(torch.randn(channels))
        self.qkv = nn.Linear(channels, 3 * channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x, time_emb, context, key_lengths):
        B, C, H, W = x.shape
        h = ops.group_norm_silu(x, self.norm_weight, self.norm_bias, self.groups, add=time_emb)
        tokens = h.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).view(B, H * W, 3, self.heads, C // self.heads).unbind(2)
        tokens = tokens + self.out(ops.attention(q, k, v).reshape(B, H * W, C))
        q = self.q(tokens).view(B, H * W, self.heads, C // self.heads)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, C // self.heads).unbind(2)
        tokens = tokens + ops.cross_attention(q, k, v, key_lengths).reshape(B, H * W, C)
        return tokens.transpose(1, 2).reshape(B, C, H, W)


# Dynamo + AOTAutograd with the fake impls (what inductor consumes); inductor's own C++
# codegen would add ~2 minutes of compilation on a 2-core CPU and tests nothing of ours.
@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_compiled_block_matches_eager(compiler):
    if "cpu" not in ops.available_backends():
        pytest.skip("the CPU kernels are not built")
    torch._dynamo.reset()
    block = TinyBlock()
    x = torch.randn(2, 64, 5, 6, requires_grad=True)
    time_emb = torch.randn(2, 64)
    context = torch.randn(2, 7, 24)
    key_lengths = torch.tensor([7, 3], dtype=torch.int32)

    with ops.use_backend("cpu"):
        eager = block(x, time_emb, context, key_lengths)
        grads_eager = torch.autograd.grad(eager.square().sum(), [x, *block.parameters()])
        compiled = torch.compile(block, fullgraph=True, backend=compiler)
        out = compiled(x, time_emb, context, key_lengths)
        grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])

    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-3)
