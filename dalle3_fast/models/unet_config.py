"""U-Net configuration: the supported subset of diffusers' UNet2DConditionModel config, and named configs.

A config is a plain dict with diffusers' field names and meanings (what ``config.json``
of a diffusers ``unet`` directory holds); a field left out takes diffusers' default.
``resolve`` checks it against the subset this package implements and expands per-level
values; anything outside the subset is refused with an error that names the field.

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

import copy

from dalle3_fast.ops import SUPPORTED_HEAD_DIMS  # the head widths the fused attention ops take

DIFFUSERS_CLASS = "UNet2DConditionModel"

# Every field of diffusers' UNet2DConditionModel.__init__ with its default.
DIFFUSERS_DEFAULTS: dict = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

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


def _refuse(field: str, value, why: str):
    raise ValueError(f"U-Net config: field {field!r} = {value!r} is not supported: {why}")


def _per_level(config: dict, field: str, n: int, kind=int) -> list:
    value = config[field]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            _refuse(field, value, f"give one value per level ({n} levels, like down_block_types) or a single value")
        values = list(value)
    else:
        values = [value] * n
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind) or v <= 0:
            _refuse(field, value, f"every value must be a positive {kind.__name__}")
    return values


def full_config(config: dict) -> dict:
    """``config`` with diffusers' defaults filled in and bookkeeping keys (``_class_name`` ...) dropped.

    Raises on fields diffusers' UNet2DConditionModel does not have.
    """
    if not isinstance(config, dict):
        raise ValueError(f"U-Net config must be a dict, got {type(config).__name__}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"U-Net config: unknown field(s) {', '.join(map(repr, unknown))}; the config is a subset "
                         f"of diffusers' {DIFFUSERS_CLASS} config")
    out = copy.deepcopy(DIFFUSERS_DEFAULTS)
    out.update({k: copy.deepcopy(v) for k, v in config.items() if not k.startswith("_")})
    for k, v in out.items():
        if isinstance(v, tuple):
            out[k] = list(v)
    return out


def resolve(config: dict) -> dict:
    """Check ``config`` against the supported subset; return it complete with per-level lists added.

    Added keys (not diffusers fields): ``heads``, ``layers``, ``depths``, ``cross_dims`` (per
    level), ``time_embed_dim``, ``text_dim`` (width of the tokens forward takes).
    """
    c = full_config(config)
    for field, allowed in _FIXED.items():
        if c[field] not in allowed:
            _refuse(field, c[field], f"supported values are {', '.join(map(repr, allowed))}")
    if c["only_cross_attention"] not in (False, None) and (
            not isinstance(c["only_cross_attention"], list) or any(c["only_cross_attention"])):
        _refuse("only_cross_attention", c["only_cross_attention"], "only False (self- and cross-attention)")

    downs, ups = c["down_block_types"], c["up_block_types"]
    if not isinstance(downs, list) or not downs:
        _refuse("down_block_types", downs, "give a non-empty list")
    for field, types, allowed in (("down_block_types", downs, DOWN_BLOCKS), ("up_block_types", ups, UP_BLOCKS)):
        if not isinstance(types, list):
            _refuse(field, types, "give a list of block type names")
        for t in types:
            if t not in allowed:
                _refuse(field, types, f"block type {t!r} is not implemented; use {', '.join(allowed)}")
    n = len(downs)
    if len(ups) != n:
        _refuse("up_block_types", ups, f"give as many up blocks as down blocks ({n})")
    if not isinstance(c["block_out_channels"], list) or len(c["block_out_channels"]) != n:
        _refuse("block_out_channels", c["block_out_channels"], f"give one width per level ({n})")
    channels = _per_level(c, "block_out_channels", n)
    layers = _per_level(c, "layers_per_block", n)
    depths = _per_level(c, "transformer_layers_per_block", n)
    if c["attention_head_dim"] is None:
        _refuse("attention_head_dim", None, "diffusers reads it as the number of heads per level; give an int or list")
    heads = _per_level(c, "attention_head_dim", n)
    cross_dims = _per_level(c, "cross_attention_dim", n)

    groups = c["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        _refuse("norm_num_groups", groups, "give a positive int (GroupNorm everywhere)")
    for ch in channels:
        if ch % groups:
            _refuse("norm_num_groups", groups, f"it must divide every block_out_channels value ({channels})")
    for i, (ch, h) in enumerate(zip(channels, heads)):
        uses_attention = downs[i] == "CrossAttnDownBlock2D" or ups[n - 1 - i] == "CrossAttnUpBlock2D" or (
            i == n - 1 and c["mid_block_type"] is not None)
        if uses_attention and (ch % h or ch // h not in SUPPORTED_HEAD_DIMS):
            _refuse("attention_head_dim", c["attention_head_dim"],
                    f"level {i} has {ch} channels and {h} heads (diffusers reads attention_head_dim as the head "
                    f"count): channels / heads must be a head width in {SUPPORTED_HEAD_DIMS}")
    if len(set(cross_dims)) != 1:
        _refuse("cross_attention_dim", c["cross_attention_dim"],
                "the text tokens have one width; give a single cross_attention_dim")
    for field in ("conv_in_kernel", "conv_out_kernel"):
        k = c[field]
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or k % 2 == 0:
            _refuse(field, k, "give an odd positive kernel size")
    if c["downsample_padding"] not in (0, 1):
        _refuse("downsample_padding", c["downsample_padding"], "use 1 (or 0: bottom/right padding)")
    if not (isinstance(c["norm_eps"], (int, float)) and c["norm_eps"] > 0):
        _refuse("norm_eps", c["norm_eps"], "give a positive number")
    if not (isinstance(c["dropout"], (int, float)) and 0 <= c["dropout"] < 1):
        _refuse("dropout", c["dropout"], "give a probability in [0, 1)")

    hid_dim = c["encoder_hid_dim"]
    if c["encoder_hid_dim_type"] == "text_proj" and hid_dim is None:
        _refuse("encoder_hid_dim", None, "encoder_hid_dim_type 'text_proj' needs the text token width")
    if hid_dim is not None:
        if isinstance(hid_dim, bool) or not isinstance(hid_dim, int) or hid_dim <= 0:
            _refuse("encoder_hid_dim", hid_dim, "give the text token width as a positive int")
        c["encoder_hid_dim_type"] = "text_proj"

    if c["addition_embed_type"] == "text_time":
        for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            v = c[field]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                _refuse(field, v, "addition_embed_type 'text_time' needs it as a positive int")

    time_embed_dim = c["time_embedding_dim"] or channels[0] * 4
    c.update(heads=heads, layers=layers, depths=depths, cross_dims=cross_dims, time_embed_dim=time_embed_dim,
             text_dim=hid_dim if hid_dim is not None else cross_dims[0], block_out_channels=channels)
    return c


def diffusers_fields(config: dict) -> dict:
    """Only diffusers' fields of a resolved config, as config.json holds them."""
    return {k: copy.deepcopy(config[k]) for k in DIFFUSERS_DEFAULTS}


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


def named_config(name: str) -> dict:
    """A copy of the registered config ``name`` (see NAMED_CONFIGS)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown U-Net config name {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    return copy.deepcopy(NAMED_CONFIGS[name])
