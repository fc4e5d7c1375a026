"""CoCa: the DALL-E 3 captioner (open_clip's CoCa layout).

    tokenizer = SentencePieceTokenizer.train(captions, vocab_size=512)
    model = CoCa.from_tokenizer(tokenizer, CoCaConfig.tiny())
    out = model(images, batch.ids, batch.lengths)     # dict(loss, contrastive, caption, logit_scale)
    captions = model.generate(images, method="beam", num_beams=4)
    scores = model.clip_score(images, captions)       # 100 * cosine, CLIP-score style

Images are float (B, 3, H, W) with values in [-1, 1]. Any other size is resized (shorter
side to ``image_size``, bilinear with antialiasing) and center-cropped square.
Token batches are right-padded: BOS, tokens, EOS, pad... (``model.tokenize`` builds them).

``forward`` is the training loss, so DistributedDataParallel wraps the model as is and
every parameter takes part in every step.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dalle3_fast import io as model_io
from dalle3_fast.models.captioner import decoding
from dalle3_fast.models.captioner.config import CoCaConfig
from dalle3_fast.models.captioner.image_encoder import VisionTransformer
from dalle3_fast.models.captioner.loss import caption_loss, contrastive_loss
from dalle3_fast.models.captioner.text_decoder import MultimodalDecoder, UnimodalDecoder
from dalle3_fast.models.tokenizer import SentencePieceTokenizer, TokenizedBatch, check_truncation, load_model_tokenizer

WEIGHTS = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
MODEL_TYPE = "dalle3_fast.coca"
# A float image outside this range is not in [-1, 1] (resampling overshoot stays well inside it).
_IMAGE_RANGE_SLACK = 1.5


class CoCa(nn.Module):
    def __init__(self, config: CoCaConfig, tokenizer: SentencePieceTokenizer | None = None):
        super().__init__()
        if not isinstance(config, CoCaConfig):
            raise ValueError(f"CoCa: `config` must be a CoCaConfig, got {type(config).__name__}")
        if tokenizer is not None:
            _check_tokenizer_fits(config, tokenizer)
        self.config = config
        self.tokenizer = tokenizer
        self.visual = VisionTransformer(config)
        self.text = UnimodalDecoder(config)
        self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
        self.multimodal = MultimodalDecoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.reset_parameters()

    @classmethod
    def from_tokenizer(cls, tokenizer: SentencePieceTokenizer, config: CoCaConfig | None = None) -> "CoCa":
        """A new model whose vocabulary and special ids are the tokenizer's."""
        config = (config or CoCaConfig.tiny()).replace(
            vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
        return cls(config, tokenizer)

    def reset_parameters(self) -> None:
        """CLIP-style init: N(0, 0.02) weights, residual projections scaled down by depth."""
        c = self.config
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for stack, depth in ((self.visual.blocks, c.vision_layers), (self.text.blocks, c.text_layers),
                             (self.multimodal.blocks, c.multimodal_layers)):
            for block in stack:
                for proj in (block.attn.proj, block.mlp.fc2):
                    nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * depth))
        nn.init.normal_(self.visual.pos_embed, std=0.01)
        nn.init.normal_(self.visual.pooler.query, std=c.vision_width ** -0.5)
        nn.init.normal_(self.text.pos_embed, std=0.01)
        with torch.no_grad():
            self.logit_scale.fill_(c.init_logit_scale)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer block in the backward pass instead of keeping its activations."""
        for tower in (self.visual, self.text, self.multimodal):
            tower.gradient_checkpointing = enabled

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    # ------------------------------------------------------------------ inputs

    def tokenize(self, texts: str | Sequence[str], *, truncate: bool = True) -> TokenizedBatch:
        """Texts -> BOS ... EOS ids right-padded, at most ``max_text_len`` tokens (longer ones are cut with a
        warning, or refused with ``truncate=False``)."""
        if self.tokenizer is None:
            raise ValueError("CoCa: this model has no tokenizer; build it with CoCa.from_tokenizer or load it "
                             "with from_pretrained")
        batch = self.tokenizer.encode(texts, max_length=self.config.max_text_len, add_bos=True, add_eos=True)
        check_truncation(batch, self.config.max_text_len, truncate, "CoCa")
        return batch

    def prepare_images(self, images: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """Validate float (B, 3, H, W) images in [-1, 1]; resize/crop to the configured square size."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"CoCa: `images` must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CoCa: `images` must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}; "
                             "add a batch dimension or convert to 3 channels")
        if not images.is_floating_point():
            raise ValueError(f"CoCa: `images` has dtype {images.dtype}; pass floats in [-1, 1] "
                             "(e.g. uint8 / 127.5 - 1)")
        if images.shape[0] == 0:
            raise ValueError("CoCa: `images` is an empty batch")
        if check_range:
            lo, hi = float(images.min()), float(images.max())
            if lo < -_IMAGE_RANGE_SLACK or hi > _IMAGE_RANGE_SLACK:
                raise ValueError(f"CoCa: `images` values lie in [{lo:.3g}, {hi:.3g}]; expected [-1, 1] "
                                 "(scale uint8 pixels with x / 127.5 - 1)")
        S = self.config.image_size
        H, W = images.shape[-2:]
        if (H, W) != (S, S):
            scale = S / min(H, W)
            size = (max(S, round(H * scale)), max(S, round(W * scale)))
            images = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            top, left = (size[0] - S) // 2, (size[1] - S) // 2
            images = images[:, :, top: top + S, left: left + S]
        return images.to(device=self.device, dtype=self.dtype)

    def _lengths(self, token_ids, lengths, pad_mask) -> torch.Tensor:
        if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
            raise ValueError("CoCa: `token_ids` must be a (B, T) tensor of BOS ... EOS ids (see CoCa.tokenize)")
        B, T = token_ids.shape
        if T > self.config.max_text_len:
            raise ValueError(f"CoCa: `token_ids` has {T} positions; max_text_len is {self.config.max_text_len}")
        if T < 2:
            raise ValueError("CoCa: `token_ids` needs at least 2 positions (BOS and EOS)")
        if (lengths is None) == (pad_mask is None):
            raise ValueError("CoCa: pass exactly one of `lengths` (B,) or `pad_mask` (B, T), True at pad positions")
        if pad_mask is not None:
            if tuple(pad_mask.shape) != (B, T):
                raise ValueError(f"CoCa: `pad_mask` must have shape {(B, T)}, got {tuple(pad_mask.shape)}")
            lengths = (~pad_mask.bool()).sum(1)
        lengths = torch.as_tensor(lengths, device=token_ids.device)
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"CoCa: `lengths` must have shape ({B},), got {tuple(lengths.shape)}")
        return lengths.long()

    # ------------------------------------------------------------------ towers

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding (B, E) before normalization, captioning tokens (B, N, vision_width)) of prepared images."""
        return self.visual(images)

    def text_features(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding (B, E) before normalization, taken at each text's EOS; unimodal hidden states (B, T, C))."""
        hidden = self.text(token_ids)
        eos_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), (lengths - 1).clamp(min=0)]
        return self.text_projection(eos_hidden), hidden

    def token_logits(self, token_ids: torch.Tensor, image_kv, caches=None) -> torch.Tensor:
        """Next-token logits (B, T, V) of ``token_ids`` given the images' cross-attention keys/values
        (``multimodal.image_kv``); with ``caches`` the ids continue the cached prefix."""
        uni_caches, mm_caches = caches if caches is not None else (None, None)
        return self.multimodal(self.text(token_ids, uni_caches), image_kv, mm_caches)

    def new_caches(self, batch: int, max_len: int, dtype, device):
        c = self.config
        head_dim = c.text_width // c.text_heads
        return (decoding.new_layer_caches(c.text_layers, batch, c.text_heads, max_len, head_dim, dtype, device),
                decoding.new_layer_caches(c.multimodal_layers, batch, c.text_heads, max_len, head_dim, dtype, device))

    # ------------------------------------------------------------------ training

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor | None = None, *,
                pad_mask: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
                return_decoder_hidden: bool = False) -> dict[str, torch.Tensor]:
        """The CoCa loss. images (B, 3, S, S) in [-1, 1]; token_ids (B, T) BOS ... EOS right-padded, with
        ``lengths`` (B,) or ``pad_mask`` (B, T, True at pads); ``token_weights`` (vocab_size,) weighs each
        target token in the captioning loss (default: all 1).

        Returns dict(loss, contrastive, caption, logit_scale); loss = contrastive_weight * contrastive +
        caption_weight * caption. ``return_decoder_hidden`` adds ``decoder_hidden`` (B, T - 1, text_width): the
        multimodal decoder's final hidden state at each input position (position t has read tokens <= t), for
        auxiliary heads.
        """
        lengths = self._lengths(token_ids, lengths, pad_mask)
        images = self.prepare_images(images, check_range=False)
        if images.shape[0] != token_ids.shape[0]:
            raise ValueError(f"CoCa: {images.shape[0]} images but {token_ids.shape[0]} token rows")
        image_emb, image_tokens = self.image_features(images)
        text_emb, hidden = self.text_features(token_ids, lengths)
        decoder_hidden = self.multimodal.hidden_states(hidden[:, :-1], self.multimodal.image_kv(image_tokens))
        logits = self.multimodal.lm_head(decoder_hidden)
        scale = self.logit_scale.clamp(max=self.config.max_logit_scale).exp()
        contrastive = contrastive_loss(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), scale)
        if token_weights is not None and token_weights.shape != (self.config.vocab_size,):
            raise ValueError(f"CoCa: `token_weights` must be ({self.config.vocab_size},), one per vocabulary entry; "
                             f"got {tuple(token_weights.shape)}")
        caption = caption_loss(logits, token_ids, lengths, token_weights)
        loss = self.config.contrastive_weight * contrastive + self.config.caption_weight * caption
        out = {"loss": loss, "contrastive": contrastive.detach(), "caption": caption.detach(),
               "logit_scale": scale.detach()}
        if return_decoder_hidden:
            out["decoder_hidden"] = decoder_hidden
        return out

    def loss(self, images, token_ids, lengths=None, *, pad_mask=None, token_weights=None) -> dict[str, torch.Tensor]:
        """Same as calling the model (use the call, not this, under DistributedDataParallel)."""
        return self(images, token_ids, lengths, pad_mask=pad_mask, token_weights=token_weights)

    # ------------------------------------------------------------------ embeddings and scoring

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (B, embed_dim)."""
        return F.normalize(self.image_features(self.prepare_images(images))[0], dim=-1)

    def encode_text(self, texts: str | Sequence[str] | None = None, *, token_ids=None, lengths=None,
                    truncate: bool = True) -> torch.Tensor:
        """L2-normalized text embeddings (B, embed_dim) from strings or from (token_ids, lengths)."""
        if texts is not None:
            if token_ids is not None:
                raise ValueError("CoCa.encode_text: pass `texts` or `token_ids`, not both")
            batch = self.tokenize(texts, truncate=truncate).to(self.device)
            token_ids, lengths = batch.ids, batch.lengths
        elif token_ids is None:
            raise ValueError("CoCa.encode_text: pass `texts` (strings) or `token_ids` with `lengths`")
        lengths = self._lengths(token_ids, lengths, None)
        return F.normalize(self.text_features(token_ids, lengths)[0], dim=-1)

    @torch.no_grad()
    def clip_score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """100 * cosine(image i, text i) for each pair, (B,) float32: the CLIP score of DALL-E 3's evaluation."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) != images.shape[0]:
            raise ValueError(f"CoCa.clip_score: {images.shape[0]} images but {len(texts)} texts; pass one text per image")
        return 100.0 * (self.encode_image(images) * self.encode_text(texts)).sum(-1).float()

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def generate_ids(self, images: torch.Tensor, *, max_new_tokens: int | None = None, method: str = "greedy",
                     num_beams: int = 4, length_penalty: float = 1.0, top_p: float = 0.9, temperature: float = 1.0,
                     generator: torch.Generator | None = None, use_cache: bool = True) -> decoding.GenerationOutput:
        """Decode token ids for each image; see ``generate``. ``use_cache=False`` recomputes every prefix."""
        c = self.config
        if method not in decoding.METHODS:
            raise ValueError(f"CoCa.generate: unknown method {method!r}; choose one of {', '.join(decoding.METHODS)}")
        if max_new_tokens is None:
            max_new_tokens = c.max_text_len - 1
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= c.max_text_len - 1:
            raise ValueError(f"CoCa.generate: `max_new_tokens` must be an int in [1, {c.max_text_len - 1}] "
                             f"(max_text_len - 1), got {max_new_tokens!r}")
        images = self.prepare_images(images)
        B = images.shape[0]
        _, image_tokens = self.image_features(images)
        max_len = 1 + max_new_tokens
        special = dict(bos=c.bos_id, eos=c.eos_id, pad=c.pad_id, max_new_tokens=max_new_tokens, device=images.device)
        if method == "beam":
            if not isinstance(num_beams, int) or num_beams < 1:
                raise ValueError(f"CoCa.generate: `num_beams` must be a positive int, got {num_beams!r}")
            image_tokens = image_tokens.repeat_interleave(num_beams, dim=0)
            scorer = decoding.NextTokenScorer(self, image_tokens, max_len, use_cache)
            return decoding.beam_search(scorer, B, num_beams=num_beams, length_penalty=float(length_penalty), **special)
        scorer = decoding.NextTokenScorer(self, image_tokens, max_len, use_cache)
        if method == "greedy":
            return decoding.greedy(scorer, B, **special)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"CoCa.generate: `top_p` must lie in (0, 1], got {top_p}")
        if not temperature > 0:
            raise ValueError(f"CoCa.generate: `temperature` must be > 0, got {temperature}; use method='greedy' "
                             "for argmax decoding")
        return decoding.nucleus(scorer, B, top_p=float(top_p), temperature=float(temperature),
                                generator=generator, **special)

    def generate(self, images: torch.Tensor, *, max_new_tokens: int | None = None, method: str = "greedy",
                 num_beams: int = 4, length_penalty: float = 1.0, top_p: float = 0.9, temperature: float = 1.0,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> list[str]:
        """Captions for images (B, 3, H, W) float in [-1, 1].

        method: "greedy"; "beam" (``num_beams``, ``length_penalty``: score / length ** length_penalty);
        "nucleus" (``top_p``, ``temperature``, ``generator`` for reproducible sampling).
        ``max_new_tokens`` defaults to max_text_len - 1.
        """
        if self.tokenizer is None:
            raise ValueError("CoCa.generate: this model has no tokenizer to turn ids into text; use generate_ids")
        out = self.generate_ids(images, max_new_tokens=max_new_tokens, method=method, num_beams=num_beams,
                                length_penalty=length_penalty, top_p=top_p, temperature=temperature,
                                generator=generator, use_cache=use_cache)
        return self.tokenizer.decode(out.sequences.cpu())

    # ------------------------------------------------------------------ files

    def save_pretrained(self, directory) -> None:
        """DIR/config.json + DIR/model.safetensors (+ DIR/tokenizer/), each written atomically."""
        directory = Path(directory)
        model_io.save_pretrained(self, {"model_type": MODEL_TYPE, **self.config.to_dict()}, directory, WEIGHTS)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)

    @classmethod
    def from_pretrained(cls, directory, *, device=None, dtype: torch.dtype | None = None) -> "CoCa":
        directory = Path(directory)
        data = model_io.read_config(directory)
        if data.get("model_type") != MODEL_TYPE:
            raise model_io.CheckpointError(f"{str(directory)!r} holds a {data.get('model_type')!r} model, "
                                           f"not a CoCa captioner ({MODEL_TYPE!r})")
        tokenizer = load_model_tokenizer(directory / TOKENIZER_DIR) if (directory / TOKENIZER_DIR).is_dir() else None
        try:
            model = cls(CoCaConfig.from_dict(data), tokenizer)
        except (ValueError, TypeError) as exc:
            raise model_io.CheckpointError(f"{str(directory / model_io.CONFIG)!r} does not describe a loadable "
                                           f"captioner: {exc}") from exc
        model_io.load_weights_into(model, directory, WEIGHTS)
        model.eval()
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model


def _check_tokenizer_fits(config: CoCaConfig, tokenizer) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"CoCa: the tokenizer has {tokenizer.vocab_size} ids but config.vocab_size is "
                         f"{config.vocab_size}; build the model with CoCa.from_tokenizer")
    for name in ("pad_id", "bos_id", "eos_id"):
        if getattr(tokenizer, name) != getattr(config, name):
            raise ValueError(f"CoCa: tokenizer {name}={getattr(tokenizer, name)} differs from config "
                             f"{name}={getattr(config, name)}; build the model with CoCa.from_tokenizer")
