"""CoCa captioner configuration: sizes, loss weights, and presets from tiny (CPU) to ViT-L/14."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dalle3_fast.ops import SUPPORTED_HEAD_DIMS

IMAGE_STEMS = ("patch", "conv")
CONV_STEM_GROUPS = 8


@dataclass
class CoCaConfig:
    # Image encoder (stem -> transformer) and its attentional pooler.
    image_size: int = 64
    patch_size: int = 8             # the stem's stride: image_size / patch_size tokens per side
    # "patch": one patch_size x patch_size linear projection (ViT, open_clip's layout);
    # "conv": log2(patch_size) 3x3 stride-2 convolutions (GroupNorm + SiLU), then a 1x1 projection
    # (Xiao et al. 2021, "Early convolutions help transformers see better"): sees shapes on small data.
    # A config.json without this key was written before it existed: a "patch" ViT.
    image_stem: str = "patch"
    conv_stem_depth: int = 1        # "conv" stem: 3x3 convolutions per stage, the first of stride 2 (2: a deeper stem)
    vision_width: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp_ratio: float = 4.0
    caption_queries: int = 32       # image tokens the multimodal decoder cross-attends to
    # True: the multimodal decoder cross-attends to every grid token as well as to the pooler's caption queries,
    # so where each object sits (counts, left/right/above/below) reaches the text without a bottleneck.
    caption_grid: bool = False
    pooler_heads: int = 4
    # Text: unimodal causal decoder then multimodal decoder (causal self-attn + cross-attn to image tokens).
    vocab_size: int = 512
    max_text_len: int = 128         # BOS + tokens + EOS (scene-world DSCs reach ~110 with a 512 BPE vocab)
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 2            # unimodal
    multimodal_layers: int = 2
    text_mlp_ratio: float = 4.0
    # Shared image/text embedding for the contrastive loss and CLIP-style scoring.
    embed_dim: int = 128
    init_logit_scale: float = 2.6592600369262695  # log(1 / 0.07), as CLIP
    max_logit_scale: float = 4.605170185988092   # log(100)
    # loss = contrastive_weight * InfoNCE + caption_weight * next-token CE (open_clip's CoCa defaults)
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        self.validate()

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def validate(self) -> None:
        def fail(msg):
            raise ValueError(f"CoCaConfig: {msg}")

        positive = ("image_size", "patch_size", "conv_stem_depth", "vision_width", "vision_layers", "vision_heads", "caption_queries",
                    "pooler_heads", "vocab_size", "max_text_len", "text_width", "text_heads", "text_layers",
                    "multimodal_layers", "embed_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                fail(f"`{name}` must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            fail(f"`image_size`={self.image_size} is not a multiple of `patch_size`={self.patch_size}")
        if self.image_stem not in IMAGE_STEMS:
            fail(f"`image_stem`={self.image_stem!r}; choose one of {', '.join(IMAGE_STEMS)}")
        if self.image_stem == "conv":
            p = self.patch_size
            if p < 2 or p & (p - 1):
                fail(f"`patch_size`={p}: the conv stem halves the image per layer, so the stride must be a "
                     "power of two >= 2")
            if self.vision_width % (p // 2) or (self.vision_width // (p // 2)) % CONV_STEM_GROUPS:
                fail(f"`vision_width`={self.vision_width}: the conv stem's first layer has vision_width / "
                     f"{p // 2} channels, which must be a multiple of {CONV_STEM_GROUPS} (its GroupNorm groups)")
        # Non-causal attention (ViT, pooler, cross-attention) runs on dalle3_fast.ops: its head dims apply.
        for width, heads, what in ((self.vision_width, self.vision_heads, "vision"),
                                   (self.vision_width, self.pooler_heads, "pooler"),
                                   (self.text_width, self.text_heads, "text")):
            if width % heads:
                fail(f"{what} width {width} is not divisible by its {heads} heads")
            if width // heads not in SUPPORTED_HEAD_DIMS:
                fail(f"{what} head dim {width}/{heads}={width // heads} is not one the fused attention supports "
                     f"{SUPPORTED_HEAD_DIMS}; change the width or the head count")
        if self.caption_queries > 512:
            fail(f"`caption_queries`={self.caption_queries} exceeds the 512 keys cross_attention takes")
        if not isinstance(self.caption_grid, bool):
            fail(f"`caption_grid` must be true or false, got {self.caption_grid!r}")
        if self.caption_grid and self.caption_queries + self.num_patches > 512:
            fail(f"`caption_grid`: {self.caption_queries} caption queries + {self.num_patches} grid tokens exceed the "
                 "512 keys cross_attention takes; use fewer queries or a larger patch size")
        if self.num_patches > 512:
            fail(f"{self.num_patches} patches exceed the 512 keys the attentional pooler's cross_attention takes; "
                 "use a larger patch size")
        if self.max_text_len < 3:
            fail(f"`max_text_len`={self.max_text_len} leaves no room between BOS and EOS")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                fail(f"`{name}`={getattr(self, name)} is outside the vocabulary (size {self.vocab_size})")
        if self.contrastive_weight < 0 or self.caption_weight < 0 or self.contrastive_weight + self.caption_weight == 0:
            fail("loss weights must be >= 0 and not both 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CoCaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ValueError(f"CoCaConfig: unknown field(s) {', '.join(unknown)}; this config was written by "
                             "another model or a newer version")
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes) -> "CoCaConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- presets

    @classmethod
    def tiny(cls, **overrides) -> "CoCaConfig":
        """64x64 images, conv stem to an 8x8 grid, width 128, 2+2+2 layers: trains on a CPU in minutes."""
        return cls(**{"image_stem": "conv", **overrides})

    @classmethod
    def small(cls, **overrides) -> "CoCaConfig":
        """64x64 images, conv stem to an 8x8 grid, width 192 (head dim 64), 4+4+4 layers, 64 captioning queries."""
        base = dict(image_size=64, patch_size=8, image_stem="conv", vision_width=192, vision_layers=4, vision_heads=3,
                    pooler_heads=3, caption_queries=64, text_width=192, text_heads=3, text_layers=4,
                    multimodal_layers=4, embed_dim=192)
        return cls(**{**base, **overrides})

    @classmethod
    def base(cls, **overrides) -> "CoCaConfig":
        """open_clip coca_ViT-B-32 layout (224 px, 12+12+12 layers, 256 captioning queries)."""
        base = dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                    pooler_heads=8, caption_queries=256, vocab_size=49408, max_text_len=77, text_width=512,
                    text_heads=8, text_layers=12, multimodal_layers=12, embed_dim=512)
        return cls(**{**base, **overrides})

    @classmethod
    def large(cls, **overrides) -> "CoCaConfig":
        """open_clip coca_ViT-L-14 layout (224 px, patch 14, 24-layer ViT, 768-wide text)."""
        base = dict(image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                    pooler_heads=8, caption_queries=256, vocab_size=49408, max_text_len=77, text_width=768,
                    text_heads=12, text_layers=12, multimodal_layers=12, embed_dim=768)
        return cls(**{**base, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "CoCaConfig":
        presets = {"tiny": cls.tiny, "small": cls.small, "base": cls.base, "large": cls.large}
        if name not in presets:
            raise ValueError(f"CoCaConfig.preset: unknown preset {name!r}; choose one of {', '.join(presets)}")
        return presets[name](**overrides)
