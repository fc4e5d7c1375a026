"""The captioner's text side: a unimodal causal decoder (text embedding at EOS) and a
multimodal decoder that cross-attends to image tokens and predicts the next token."""
from __future__ import annotations

import torch
from torch import nn

from dalle3_fast.models.captioner.config import CoCaConfig
from dalle3_fast.models.captioner.layers import DecoderBlock, LayerCache
from dalle3_fast.nn.checkpointing import checkpointed


class UnimodalDecoder(nn.Module):
    def __init__(self, config: CoCaConfig):
        super().__init__()
        c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.text_width)
        self.pos_embed = nn.Parameter(torch.empty(c.max_text_len, c.text_width))
        self.blocks = nn.ModuleList(
            DecoderBlock(c.text_width, c.text_heads, c.text_mlp_ratio, c.layer_norm_eps)
            for _ in range(c.text_layers))
        self.ln_final = nn.LayerNorm(c.text_width, eps=c.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, ids: torch.Tensor, caches: list[LayerCache] | None = None) -> torch.Tensor:
        """ids (B, T) at positions [start, start + T), start = the caches' length (0 without caches)."""
        start = caches[0].length if caches else 0
        x = self.token_embed(ids) + self.pos_embed[start: start + ids.shape[1]]
        for i, block in enumerate(self.blocks):
            if caches:
                x = block(x, caches[i])
            else:
                x = checkpointed(block, self.gradient_checkpointing, x)
        return self.ln_final(x)


class MultimodalDecoder(nn.Module):
    def __init__(self, config: CoCaConfig):
        super().__init__()
        c = config
        self.blocks = nn.ModuleList(
            DecoderBlock(c.text_width, c.text_heads, c.text_mlp_ratio, c.layer_norm_eps, context_width=c.vision_width)
            for _ in range(c.multimodal_layers))
        self.ln_final = nn.LayerNorm(c.text_width, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(c.text_width, c.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def image_kv(self, image_tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention keys/values of the image tokens, computed once per image batch."""
        return [block.cross_attn.context_kv(image_tokens) for block in self.blocks]

    def hidden_states(self, text_hidden: torch.Tensor, image_kv, caches: list[LayerCache] | None = None) -> torch.Tensor:
        """Unimodal hidden states (B, T, C) -> the final normalized hidden states (B, T, C) the LM head reads."""
        x = text_hidden
        for i, block in enumerate(self.blocks):
            if caches:
                x = block(x, caches[i], image_kv[i])
            else:
                x = checkpointed(block, self.gradient_checkpointing, x, None, image_kv[i])
        return self.ln_final(x)

    def forward(self, text_hidden: torch.Tensor, image_kv, caches: list[LayerCache] | None = None) -> torch.Tensor:
        """Unimodal hidden states (B, T, C) -> next-token logits (B, T, vocab)."""
        return self.lm_head(self.hidden_states(text_hidden, image_kv, caches))
