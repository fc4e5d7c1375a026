"""The prompt encoder: T5's encoder through transformers, from a local directory only.

    encoder = T5TextEncoder.from_pretrained("weights/t5-v1_1-xxl")      # nothing is downloaded
    emb, lengths = encoder.encode(["a red circle above a blue square"])  # (B, L, D), (B,) int32

Positions at and past ``lengths[b]`` of ``emb`` are zero. The tokenizer is the
transformers tokenizer saved beside the weights (``DIR`` or ``DIR/tokenizer``) or our
SentencePiece tokenizer (tiny pipelines train one on their own captions).

Directory layout written by ``save_pretrained``: transformers' ``config.json`` +
``model.safetensors``, ``tokenizer/`` and ``dalle3_text_encoder.json`` (max_tokens).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dalle3_fast.io import CheckpointError, atomic_write_bytes, read_config
from dalle3_fast.models.tokenizer import (
    HFTokenizer, SentencePieceTokenizer, TokenizedBatch, check_truncation, load_model_tokenizer,
)

DEFAULT_MAX_TOKENS = 256
SETTINGS_FILE = "dalle3_text_encoder.json"
TOKENIZER_DIR = "tokenizer"


def tiny_t5_config(vocab_size: int, d_model: int = 64, num_layers: int = 2, num_heads: int = 4, d_ff: int | None = None):
    """A T5 v1.1-style (gated GELU) encoder config small enough to train on a CPU."""
    from transformers import T5Config

    if d_model % num_heads:
        raise ValueError(f"tiny_t5_config: `d_model`={d_model} is not divisible by `num_heads`={num_heads}")
    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff or 2 * d_model,
        num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False,
    )


class T5TextEncoder(nn.Module):
    """transformers' T5EncoderModel + a tokenizer, returning (token embeddings, lengths)."""

    def __init__(self, model, tokenizer: SentencePieceTokenizer | HFTokenizer, max_tokens: int = DEFAULT_MAX_TOKENS):
        super().__init__()
        if not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"T5TextEncoder: `max_tokens` must be an int >= 2, got {max_tokens!r}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"T5TextEncoder: the tokenizer has {tokenizer.vocab_size} ids but the model's "
                             f"embedding has {model.config.vocab_size}; pair the model with its own tokenizer")
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ build / load / save

    @classmethod
    def tiny(cls, tokenizer: SentencePieceTokenizer, *, d_model: int = 64, num_layers: int = 2, num_heads: int = 4,
             d_ff: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int | None = None) -> "T5TextEncoder":
        """A randomly initialised small T5 encoder over ``tokenizer``'s vocabulary."""
        from transformers import T5EncoderModel

        config = tiny_t5_config(tokenizer.vocab_size, d_model, num_layers, num_heads, d_ff)
        config.eos_token_id = tokenizer.eos_id
        if seed is not None:
            torch.manual_seed(seed)
        return cls(T5EncoderModel(config).eval(), tokenizer, max_tokens)

    @classmethod
    def from_pretrained(cls, directory, *, tokenizer_directory=None, max_tokens: int | None = None,
                        dtype: torch.dtype | None = None, device=None) -> "T5TextEncoder":
        """Load from a local directory (never downloads), strictly: config.json + model.safetensors (or its
        sharded index) must give every tensor of the encoder with its shape, and nothing else (a whole
        T5ForConditionalGeneration checkpoint is fine); anything else is a ``CheckpointError``.
        ``tokenizer_directory`` defaults to ``DIR/tokenizer`` when it exists, else ``DIR`` itself (the
        layout of a transformers T5 checkpoint)."""
        from transformers import T5EncoderModel

        from dalle3_fast.models.t5_loading import load_t5

        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"text encoder directory {str(directory)!r} does not exist; pass a local "
                                  "directory holding a T5 checkpoint (config.json + weights); nothing is downloaded")
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{str(directory / 'config.json')!r} is missing; {str(directory)!r} is not a "
                                  "transformers T5 checkpoint")
        if tokenizer_directory is None:
            tokenizer_directory = directory / TOKENIZER_DIR if (directory / TOKENIZER_DIR).is_dir() else directory
        tokenizer = load_model_tokenizer(tokenizer_directory)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
            if (directory / SETTINGS_FILE).is_file():
                settings = read_config(directory, SETTINGS_FILE)
                max_tokens = settings.get("max_tokens")
                if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
                    raise CheckpointError(f"{str(directory / SETTINGS_FILE)!r}: max_tokens must be an int, got "
                                          f"{max_tokens!r}")
        model = load_t5(T5EncoderModel, directory, dtype=dtype)
        if device is not None:
            model.to(device)
        try:
            return cls(model, tokenizer, max_tokens)
        except ValueError as exc:
            raise CheckpointError(f"{str(directory)!r}: {exc}") from exc

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        atomic_write_bytes(directory / SETTINGS_FILE, (json.dumps({"max_tokens": self.max_tokens}) + "\n").encode())

    # ------------------------------------------------------------------ encode

    def tokenize(self, prompts: str | Sequence[str], *, truncate: bool = True, pad_to: int | None = None) -> TokenizedBatch:
        """Prompts -> ids (B, L) with EOS, right-padded to the longest (or ``pad_to``), at most ``max_tokens``.

        Longer prompts are cut with a warning when ``truncate``; otherwise a ValueError names the limit.
        """
        batch = self.tokenizer.encode(prompts, max_length=self.max_tokens, add_bos=False, add_eos=True,
                                      truncation=True, pad_to=pad_to)
        check_truncation(batch, self.max_tokens, truncate, "T5TextEncoder")
        return batch

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) and lengths (B,) -> (embeddings (B, L, D) zero past each length, lengths int32 (B,))."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"T5TextEncoder: `input_ids` must be a (B, L) tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        B, L = input_ids.shape
        if L > self.max_tokens:
            raise ValueError(f"T5TextEncoder: `input_ids` has {L} tokens; the limit is max_tokens={self.max_tokens}")
        lengths = torch.as_tensor(lengths, device=input_ids.device).to(torch.int32)
        if lengths.shape != (B,):
            raise ValueError(f"T5TextEncoder: `lengths` must have shape ({B},), got {tuple(lengths.shape)}")
        mask = torch.arange(L, device=input_ids.device)[None, :] < lengths[:, None]
        hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype), lengths

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], *, truncate: bool = True,
               pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (token embeddings (B, L, D), lengths int32 (B,)) on the model's device."""
        batch = self.tokenize(prompts, truncate=truncate, pad_to=pad_to).to(self.device)
        return self(batch.ids, batch.lengths)
