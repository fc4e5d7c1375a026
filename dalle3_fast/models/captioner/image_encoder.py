"""The captioner's image encoder: a ViT whose attentional pooler yields 1 contrastive + N captioning tokens."""
from __future__ import annotations

import torch
from torch import nn

from dalle3_fast.models.captioner.config import CoCaConfig
from dalle3_fast.models.captioner.layers import AttentionalPooler, EncoderBlock
from dalle3_fast.nn.checkpointing import checkpointed


class VisionTransformer(nn.Module):
    def __init__(self, config: CoCaConfig):
        super().__init__()
        c = config
        self.patch_embed = nn.Conv2d(3, c.vision_width, kernel_size=c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.empty(1, c.num_patches, c.vision_width))
        self.ln_pre = nn.LayerNorm(c.vision_width, eps=c.layer_norm_eps)
        self.blocks = nn.ModuleList(
            EncoderBlock(c.vision_width, c.vision_heads, c.vision_mlp_ratio, c.layer_norm_eps)
            for _ in range(c.vision_layers))
        self.pooler = AttentionalPooler(c.vision_width, c.pooler_heads, 1 + c.caption_queries, c.layer_norm_eps)
        self.ln_post = nn.LayerNorm(c.vision_width, eps=c.layer_norm_eps)
        self.proj = nn.Linear(c.vision_width, c.embed_dim, bias=False)
        self.gradient_checkpointing = False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) -> (embedding (B, embed_dim), unnormalized; image tokens (B, N, vision_width))."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.ln_pre(x)
        for block in self.blocks:
            x = checkpointed(block, self.gradient_checkpointing, x)
        pooled = self.ln_post(self.pooler(x))
        return self.proj(pooled[:, 0]), pooled[:, 1:]
