"""The captioner's image encoder: a stem (patch projection or small CNN) to a token grid, a transformer over
the tokens, and an attentional pooler that yields 1 contrastive + N captioning tokens."""
from __future__ import annotations

import torch
from torch import nn

from dalle3_fast import ops
from dalle3_fast.models.captioner.config import CONV_STEM_GROUPS, CoCaConfig
from dalle3_fast.models.captioner.layers import AttentionalPooler, EncoderBlock
from dalle3_fast.nn.checkpointing import checkpointed


class ConvStemLayer(nn.Module):
    """3x3 convolution (stride 2 by default), then GroupNorm + SiLU (one fused op)."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm = nn.GroupNorm(CONV_STEM_GROUPS, out_channels, eps=eps)

    def forward(self, x):
        return ops.group_norm_silu(self.conv(x), self.norm.weight, self.norm.bias, self.norm.num_groups, self.norm.eps)


class ConvStem(nn.Module):
    """log2(patch_size) stages doubling the channels up to vision_width, each a stride-2 ConvStemLayer and
    conv_stem_depth - 1 stride-1 ones, then a 1x1 projection:
    (B, 3, S, S) -> (B, vision_width, S / patch_size, S / patch_size)."""

    def __init__(self, config: CoCaConfig):
        super().__init__()
        depth = config.patch_size.bit_length() - 1
        widths = [3] + [config.vision_width >> (depth - 1 - i) for i in range(depth)]
        eps, extra = config.layer_norm_eps, config.conv_stem_depth - 1
        layers = []
        for a, b in zip(widths, widths[1:]):
            layers += [ConvStemLayer(a, b, eps)] + [ConvStemLayer(b, b, eps, stride=1) for _ in range(extra)]
        self.layers = nn.Sequential(*layers)
        self.proj = nn.Conv2d(config.vision_width, config.vision_width, kernel_size=1)

    def forward(self, images):
        return self.proj(self.layers(images))


def image_stem(config: CoCaConfig) -> nn.Module:
    if config.image_stem == "conv":
        return ConvStem(config)
    return nn.Conv2d(3, config.vision_width, kernel_size=config.patch_size, stride=config.patch_size)


class VisionTransformer(nn.Module):
    def __init__(self, config: CoCaConfig):
        super().__init__()
        c = config
        self.patch_embed = image_stem(c)  # the name the "patch" stem's weights were saved under
        self.pos_embed = nn.Parameter(torch.empty(1, c.num_patches, c.vision_width))
        self.ln_pre = nn.LayerNorm(c.vision_width, eps=c.layer_norm_eps)
        self.blocks = nn.ModuleList(
            EncoderBlock(c.vision_width, c.vision_heads, c.vision_mlp_ratio, c.layer_norm_eps)
            for _ in range(c.vision_layers))
        self.pooler = AttentionalPooler(c.vision_width, c.pooler_heads, 1 + c.caption_queries, c.layer_norm_eps)
        self.ln_post = nn.LayerNorm(c.vision_width, eps=c.layer_norm_eps)
        self.proj = nn.Linear(c.vision_width, c.embed_dim, bias=False)
        self.caption_grid = c.caption_grid
        self.gradient_checkpointing = False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) -> (embedding (B, embed_dim), unnormalized; image tokens (B, N, vision_width))."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.ln_pre(x)
        for block in self.blocks:
            x = checkpointed(block, self.gradient_checkpointing, x)
        pooled = self.pooler(x)
        if self.caption_grid:
            pooled = torch.cat([pooled, x], dim=1)  # caption queries, then every grid token
        pooled = self.ln_post(pooled)
        return self.proj(pooled[:, 0]), pooled[:, 1:]
