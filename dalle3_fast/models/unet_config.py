"""U-Net configuration: the supported subset of diffusers' UNet2DConditionModel config, and named configs.

A config is a ``UNetConfig``: one field per argument of diffusers' UNet2DConditionModel, with
its name, meaning and default, so ``UNetConfig.from_dict`` reads the ``config.json`` of a
diffusers ``unet`` directory and ``to_dict`` writes one diffusers reads. Building one checks
it against the subset this package implements; anything outside the subset is refused with
an error that names the field. Named configs: ``unet_config("sd15", **overrides)``, as
``vae_config`` and ``latent_decoder_config``.

Supported, with diffusers' semantics:
- blocks: down CrossAttnDownBlock2D / DownBlock2D, mid UNetMidBlock2DCrossAttn or None,
  up UpBlock2D / CrossAttnUpBlock2D;
- block_out_channels, layers_per_block (int or per level), transformer_layers_per_block
  (int or per level), cross_attention_dim (int or per level), attention_head_dim (int or
  per level: as in diffusers, it is the NUMBER OF HEADS of each level, head width =
  channels / heads; num_attention_heads must stay unset, as diffusers requires),
  use_linear_projection, upcast_attention (softmax is always float32 here), norm_num_groups,
  norm_eps, dropout, downsample_padding, mid_block_scale_factor, conv_in_kernel,
  conv_out_kernel, center_input_sample, flip_sin_to_cos, freq_shift, time_embedding_dim,
  time_cond_proj_dim (an extra embedding added to the timestep features, e.g. LCM's
  guidance scale), resnet_time_scale_shift ("default" or "scale_shift": the modulated
  GroupNorm), encoder_hid_dim with encoder_hid_dim_type "text_proj" (a linear projection
  of the text tokens to cross_attention_dim);
- size micro-conditioning as SDXL's addition_embed_type "text_time": forward takes
  added_cond_kwargs {"text_embeds": (B, E) pooled text, "time_ids": (B, n) numbers such as
  (orig_h, orig_w, crop_top, crop_left, target_h, target_w)}; each time id gets
  addition_time_embed_dim sinusoidal features, [text_embeds, features] (width
  projection_class_embeddings_input_dim) goes through an MLP added to the time embedding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dalle3_fast.ops import SUPPORTED_HEAD_DIMS  # the head widths the fused attention ops take

DIFFUSERS_CLASS = "UNet2DConditionModel"

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# Fields whose only supported values are these (diffusers' other options are not implemented).
_FIXED = {
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "resnet_skip_time_act": (False,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim_type": (None, "text_proj"),
    "addition_embed_type": (None, "text_time"),
    "mid_block_type": MID_BLOCKS,
}

# Fields diffusers accepts but that have no effect on the supported blocks (kept, unused).
IGNORED_FIELDS = ("sample_size", "resnet_out_scale_factor", "addition_embed_type_num_heads", "upcast_attention")


@dataclass
class UNetConfig:
    """diffusers' UNet2DConditionModel config: every field of its ``__init__``, in its order, with its default.

    Sequences are held as tuples (config.json's lists on ``to_dict``). Per-level fields take one value
    or one per level; ``heads``, ``layers``, ``depths`` and ``cross_dims`` give them per level.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    # As in diffusers, the NUMBER OF HEADS of each level (head width = channels / heads).
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        self._validate()

    # ----------------------------------------------------------------- config.json

    @classmethod
    def from_dict(cls, config: dict) -> "UNetConfig":
        """Read diffusers config fields (a ``config.json`` dict); a field left out takes diffusers' default.

        Bookkeeping keys (``_class_name`` ...) are dropped; a field diffusers' UNet2DConditionModel
        does not have is refused.
        """
        if not isinstance(config, dict):
            raise ValueError(f"U-Net config must be a dict, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"U-Net config: unknown field(s) {', '.join(map(repr, unknown))}; the config is a "
                             f"subset of diffusers' {DIFFUSERS_CLASS} config")
        return cls(**{k: v for k, v in config.items() if not k.startswith("_")})

    def to_dict(self) -> dict:
        """``config.json`` contents: ``_class_name`` and every diffusers field, sequences as lists."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"_class_name": DIFFUSERS_CLASS, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}

    # ----------------------------------------------------------------- per level and derived

    @property
    def levels(self) -> int:
        return len(self.down_block_types)

    @property
    def heads(self) -> tuple[int, ...]:
        return _per_level(self, "attention_head_dim")

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_level(self, "layers_per_block")

    @property
    def depths(self) -> tuple[int, ...]:
        """Transformer layers per level."""
        return _per_level(self, "transformer_layers_per_block")

    @property
    def cross_dims(self) -> tuple[int, ...]:
        return _per_level(self, "cross_attention_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def text_dim(self) -> int:
        """Width of the text tokens forward takes (encoder_hid_dim, else cross_attention_dim)."""
        return self.encoder_hid_dim if self.encoder_hid_dim is not None else self.cross_dims[0]

    @property
    def downsample_factor(self) -> int:
        """Latent pixels per bottleneck pixel along each side: latent sizes are multiples of it."""
        return 2 ** (self.levels - 1)

    # ----------------------------------------------------------------- validation

    def _validate(self) -> None:
        c = self
        for field, allowed in _FIXED.items():
            if getattr(c, field) not in allowed:
                _refuse(field, getattr(c, field), f"supported values are {', '.join(map(repr, allowed))}")
        if c.only_cross_attention not in (False, None) and (
                not isinstance(c.only_cross_attention, tuple) or any(c.only_cross_attention)):
            _refuse("only_cross_attention", c.only_cross_attention, "only False (self- and cross-attention)")

        downs, ups = c.down_block_types, c.up_block_types
        if not isinstance(downs, tuple) or not downs:
            _refuse("down_block_types", downs, "give a non-empty list")
        for field, types, allowed in (("down_block_types", downs, DOWN_BLOCKS), ("up_block_types", ups, UP_BLOCKS)):
            if not isinstance(types, tuple):
                _refuse(field, types, "give a list of block type names")
            for t in types:
                if t not in allowed:
                    _refuse(field, types, f"block type {t!r} is not implemented; use {', '.join(allowed)}")
        n = len(downs)
        if len(ups) != n:
            _refuse("up_block_types", ups, f"give as many up blocks as down blocks ({n})")
        if not isinstance(c.block_out_channels, tuple) or len(c.block_out_channels) != n:
            _refuse("block_out_channels", c.block_out_channels, f"give one width per level ({n})")
        channels = _per_level(c, "block_out_channels")
        for field in ("layers_per_block", "transformer_layers_per_block"):
            _per_level(c, field)
        if c.attention_head_dim is None:
            _refuse("attention_head_dim", None, "diffusers reads it as the number of heads per level; give an int or list")
        heads = c.heads
        cross_dims = c.cross_dims

        groups = c.norm_num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            _refuse("norm_num_groups", groups, "give a positive int (GroupNorm everywhere)")
        for ch in channels:
            if ch % groups:
                _refuse("norm_num_groups", groups, f"it must divide every block_out_channels value ({list(channels)})")
        for i, (ch, h) in enumerate(zip(channels, heads)):
            uses_attention = downs[i] == "CrossAttnDownBlock2D" or ups[n - 1 - i] == "CrossAttnUpBlock2D" or (
                i == n - 1 and c.mid_block_type is not None)
            if uses_attention and (ch % h or ch // h not in SUPPORTED_HEAD_DIMS):
                _refuse("attention_head_dim", c.attention_head_dim,
                        f"level {i} has {ch} channels and {h} heads (diffusers reads attention_head_dim as the head "
                        f"count): channels / heads must be a head width in {SUPPORTED_HEAD_DIMS}")
        if len(set(cross_dims)) != 1:
            _refuse("cross_attention_dim", c.cross_attention_dim,
                    "the text tokens have one width; give a single cross_attention_dim")
        for field in ("conv_in_kernel", "conv_out_kernel"):
            k = getattr(c, field)
            if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or k % 2 == 0:
                _refuse(field, k, "give an odd positive kernel size")
        if c.downsample_padding not in (0, 1):
            _refuse("downsample_padding", c.downsample_padding, "use 1 (or 0: bottom/right padding)")
        if not (isinstance(c.norm_eps, (int, float)) and c.norm_eps > 0):
            _refuse("norm_eps", c.norm_eps, "give a positive number")
        if not (isinstance(c.dropout, (int, float)) and 0 <= c.dropout < 1):
            _refuse("dropout", c.dropout, "give a probability in [0, 1)")

        hid_dim = c.encoder_hid_dim
        if c.encoder_hid_dim_type == "text_proj" and hid_dim is None:
            _refuse("encoder_hid_dim", None, "encoder_hid_dim_type 'text_proj' needs the text token width")
        if hid_dim is not None:
            if isinstance(hid_dim, bool) or not isinstance(hid_dim, int) or hid_dim <= 0:
                _refuse("encoder_hid_dim", hid_dim, "give the text token width as a positive int")
            c.encoder_hid_dim_type = "text_proj"  # what diffusers infers from encoder_hid_dim alone

        if c.addition_embed_type == "text_time":
            for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                v = getattr(c, field)
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    _refuse(field, v, "addition_embed_type 'text_time' needs it as a positive int")


def _refuse(field: str, value, why: str):
    shown = list(value) if isinstance(value, tuple) else value  # as config.json writes it
    raise ValueError(f"U-Net config: field {field!r} = {shown!r} is not supported: {why}")


def _per_level(config: UNetConfig, field: str) -> tuple[int, ...]:
    value, n = getattr(config, field), len(config.down_block_types)
    if isinstance(value, tuple):
        if len(value) != n:
            _refuse(field, value, f"give one value per level ({n} levels, like down_block_types) or a single value")
        values = value
    else:
        values = (value,) * n
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            _refuse(field, value, "every value must be a positive int")
    return values


_SD_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)

NAMED_CONFIGS: dict[str, dict] = {
    # CPU tests and the bundled tiny pipeline: 64x64 images -> 8x8x4 latents, tiny T5 (d_model 64).
    "tiny": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=[1, 2], transformer_layers_per_block=1, cross_attention_dim=64,
        norm_num_groups=8, use_linear_projection=True,
    ),
    # Stable Diffusion 1.5's U-Net (860M parameters): 8 heads (widths 40/80/160), CLIP-L context 768.
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
        layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, **_SD_BLOCKS,
    ),
    # SDXL's U-Net (2.6B parameters), for benchmarks against the published SDXL figures.
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, upcast_attention=None,
    ),
    # The DALL-E 3 style generator: SD-sized, cross-attention to T5-XXL tokens (4096 wide), head
    # width 64, timestep conditioning by modulated GroupNorm (scale_shift), SDXL-style size
    # micro-conditioning with text_embeds = mean of the prompt's T5 tokens (pooled_text_embeds)
    # and time_ids = size_time_ids(...); 1024x1024 images -> 128x128 latents.
    "dalle3-t5": dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
        layers_per_block=2, attention_head_dim=[5, 10, 20, 20], transformer_layers_per_block=1,
        cross_attention_dim=4096, norm_num_groups=32, use_linear_projection=True,
        resnet_time_scale_shift="scale_shift", addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=4096 + 6 * 256, **_SD_BLOCKS,
    ),
}


def unet_config(name: str, **overrides) -> UNetConfig:
    """A named config (see NAMED_CONFIGS), optionally with diffusers fields overridden."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown U-Net config name {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    return UNetConfig.from_dict({**NAMED_CONFIGS[name], **overrides})
