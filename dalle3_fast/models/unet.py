"""The text-conditioned latent U-Net: diffusers' UNet2DConditionModel layout on the fused ops.

    unet = UNet.from_config("tiny")                    # or a UNetConfig, or a dict of diffusers config fields
    unet = UNet.from_pretrained("path/to/unet")        # a diffusers unet directory
    eps = unet(latents, t, t5_tokens, encoder_lengths=lengths)

    text = unet.precompute_text_kv(t5_tokens, encoder_lengths=lengths)   # once per sampling call
    for t in timesteps:
        eps = unet(latents, t, text_kv=text)                               # no K/V projections per step

Parameter names equal diffusers', so a diffusers ``unet`` directory loads as is and
``save_pretrained`` writes one diffusers reads. The supported config subset is documented
in ``dalle3_fast.models.unet_config`` (``UNetConfig``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from dalle3_fast import io, ops
from dalle3_fast.models.unet_config import DIFFUSERS_CLASS, UNetConfig, unet_config
from dalle3_fast.models.weights import weights_file_name
from dalle3_fast.models.unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
                                            UpBlock2D)
from dalle3_fast.nn.attention import Attention, TextContext
from dalle3_fast.nn.channels_last import activation_layout, contiguous_state, use_channels_last
from dalle3_fast.nn.embeddings import TimestepEmbedding, Timesteps

WEIGHTS_NAME = io.DIFFUSERS_WEIGHTS
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def pooled_text_embeds(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each prompt's first ``lengths[b]`` tokens: (B, L, C) -> (B, C); zeros for an empty prompt.

    The ``text_embeds`` of size micro-conditioning ("text_time") for a T5 encoder, which has no pooled output.
    """
    keep = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None].long()
    total = (tokens * keep[:, :, None].to(tokens.dtype)).sum(dim=1)
    return total / keep.sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)


def size_time_ids(batch: int, original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                  target_size: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's ``time_ids``: (batch, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    ids = [*original_size, *crops_coords_top_left, *target_size]
    if len(ids) != 6:
        raise ValueError("size_time_ids: give (h, w) sizes and a (top, left) crop corner")
    return torch.tensor(ids, dtype=dtype, device=device).repeat(batch, 1)


class UNet(nn.Module):
    """SD-style U-Net predicting noise (or v) for latents, conditioned on timesteps and text tokens."""

    def __init__(self, config: UNetConfig | dict | str | None = None, **overrides):
        super().__init__()
        if config is None:
            config = UNetConfig.from_dict(overrides)
        elif isinstance(config, str):
            config = unet_config(config, **overrides)
        elif isinstance(config, dict):
            config = UNetConfig.from_dict({**config, **overrides})
        elif not isinstance(config, UNetConfig):
            raise ValueError(f"U-Net config must be a UNetConfig, a dict or a name, got {type(config).__name__}")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = c = config
        ch = c.block_out_channels
        n = len(ch)
        groups, eps, dropout = c.norm_num_groups, c.norm_eps, c.dropout
        shift = c.resnet_time_scale_shift
        temb = c.time_embed_dim
        heads, layers, depths = c.heads, c.layers, c.depths
        attn = dict(cross_attention_dim=c.cross_dims[0], use_linear_projection=c.use_linear_projection)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2)
        self.time_proj = Timesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb, cond_proj_dim=c.time_cond_proj_dim)
        self.encoder_hid_proj = (nn.Linear(c.encoder_hid_dim, c.cross_dims[0])
                                 if c.encoder_hid_dim is not None else None)
        if c.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(c.down_block_types):
            common = dict(num_layers=layers[i], eps=eps, groups=groups, dropout=dropout, time_scale_shift=shift,
                          add_downsample=i < n - 1, downsample_padding=c.downsample_padding)
            in_ch = ch[max(i - 1, 0)]
            if kind == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(in_ch, ch[i], temb, num_attention_heads=heads[i],
                                             transformer_layers=depths[i], **attn, **common)
            else:
                block = DownBlock2D(in_ch, ch[i], temb, **common)
            self.down_blocks.append(block)

        self.mid_block = None
        if c.mid_block_type is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(
                ch[-1], temb, eps=eps, groups=groups, num_attention_heads=heads[-1],
                transformer_layers=depths[-1], dropout=dropout, time_scale_shift=shift,
                output_scale_factor=c.mid_block_scale_factor, **attn)

        self.up_blocks = nn.ModuleList()
        rch = list(reversed(ch))
        for i, kind in enumerate(c.up_block_types):
            level = n - 1 - i
            common = dict(num_layers=layers[level] + 1, eps=eps, groups=groups, dropout=dropout,
                          time_scale_shift=shift, add_upsample=i < n - 1)
            in_ch, prev_ch = rch[min(i + 1, n - 1)], rch[max(i - 1, 0)]
            if kind == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(in_ch, prev_ch, rch[i], temb, num_attention_heads=heads[level],
                                           transformer_layers=depths[level], **attn, **common)
            else:
                block = UpBlock2D(in_ch, prev_ch, rch[i], temb, **common)
            self.up_blocks.append(block)

        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2)

        cross = [m for m in self.modules() if isinstance(m, Attention) and m.is_cross_attention]
        for slot, module in enumerate(cross):
            module.kv_slot = slot
        self._cross_attention_layers = cross  # a plain list: the modules are registered above
        self.register_state_dict_post_hook(contiguous_state)
        self.use_channels_last()

    # ----------------------------------------------------------------- config and files
    @classmethod
    def from_config(cls, config: UNetConfig | dict | str) -> "UNet":
        """Build from a UNetConfig, diffusers config fields (a dict) or a registered name ("tiny", "sd15", ...)."""
        return cls(config)

    def save_pretrained(self, directory, *, variant: str | None = None) -> None:
        """Write ``directory/config.json`` and ``diffusion_pytorch_model[.variant].safetensors`` (diffusers format)."""
        io.save_pretrained(self, self.config.to_dict(), directory, weights_name=weights_file_name(variant, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory, *, variant: str | None = None, dtype: torch.dtype | None = None,
                        device=None) -> "UNet":
        """Load a diffusers ``unet`` directory: config.json plus safetensors weights.

        Weights: ``diffusion_pytorch_model[.variant].safetensors``, or its sharded index; with no
        ``variant`` and no full-precision file, the ``.fp16`` variant is used when present.
        The model takes ``dtype`` (default: float32) whatever the dtype of the stored tensors.
        """
        directory = Path(directory)
        config = io.read_config(directory)
        name = config.get("_class_name", DIFFUSERS_CLASS)
        if name != DIFFUSERS_CLASS:
            raise io.CheckpointError(f"{str(directory)!r} holds a {name}, not a {DIFFUSERS_CLASS}")
        try:
            model = cls(UNetConfig.from_dict(config))
        except (ValueError, TypeError, KeyError) as exc:
            raise io.CheckpointError(f"{str(directory / io.CONFIG)!r} does not describe a loadable U-Net: "
                                     f"{exc}") from exc
        model.load_state_dict_strict(cls._read_weights(directory, variant), source=f"weights in {str(directory)!r}")
        return model.to(device=device, dtype=dtype or torch.float32)

    @staticmethod
    def _read_weights(directory: Path, variant: str | None) -> dict[str, torch.Tensor]:
        candidates = [variant] if variant is not None else [None, "fp16"]
        for v in candidates:
            single = directory / weights_file_name(v, WEIGHTS_NAME)
            if single.is_file():
                return io.load_safetensors(single)
            index = directory / weights_file_name(v, WEIGHTS_INDEX_NAME)
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise io.CheckpointError(f"{str(index)!r} is not a safetensors index ({exc})") from exc
                state = {}
                for shard in sorted(set(weight_map.values())):
                    state.update(io.load_safetensors(directory / shard))
                return state
        wanted = ", ".join(weights_file_name(v, WEIGHTS_NAME) for v in candidates)
        raise io.no_weights_error(directory, f"{wanted} (or a sharded index)", "U-Net weights")

    def load_state_dict_strict(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load diffusers-named tensors; missing, unexpected or mis-shaped ones are one clear error."""
        io.load_state_dict_strict(self, state, source=source)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResBlock and transformer activations in backward instead of storing them."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enabled

    # ----------------------------------------------------------------- conditioning
    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def text_dim(self) -> int:
        """Width of the text tokens forward takes (encoder_hid_dim, else cross_attention_dim)."""
        return self.config.text_dim

    @property
    def size_conditioned(self) -> bool:
        """True when forward needs added_cond_kwargs {"text_embeds", "time_ids"} (addition_embed_type "text_time")."""
        return self.config.addition_embed_type == "text_time"

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def _text_context(self, encoder_hidden_states, encoder_lengths, encoder_attention_mask) -> TextContext:
        width = self.config.text_dim
        if isinstance(encoder_hidden_states, torch.Tensor) and encoder_hidden_states.dim() == 3 \
                and encoder_hidden_states.shape[-1] != width:
            raise ValueError(f"`encoder_hidden_states` tokens are {encoder_hidden_states.shape[-1]} wide but this "
                             f"U-Net takes {width} (config cross_attention_dim / encoder_hid_dim)")
        ctx = TextContext.from_tokens(encoder_hidden_states, encoder_lengths, encoder_attention_mask)
        if self.encoder_hid_proj is not None:
            ctx = ctx._replace(tokens=self.encoder_hid_proj(ctx.tokens))
        return ctx

    def precompute_text_kv(self, encoder_hidden_states: torch.Tensor, encoder_lengths: torch.Tensor | None = None,
                           encoder_attention_mask: torch.Tensor | None = None) -> TextContext:
        """Project the prompt's tokens (B, L, C) to every cross-attention layer's keys and values once.

        Pass the result as ``text_kv=`` to ``forward`` at every denoising step; the output is the
        same as passing the tokens. Give ``encoder_lengths`` (B,) or ``encoder_attention_mask`` (B, L).
        """
        ctx = self._text_context(encoder_hidden_states, encoder_lengths, encoder_attention_mask)
        kv = tuple(layer.project_kv(ctx.tokens) for layer in self._cross_attention_layers)
        return TextContext(None, ctx.lengths, kv)

    def _timestep_features(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        B = sample.shape[0]
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor([timestep], dtype=torch.float64 if isinstance(timestep, float) else torch.int64,
                                    device=sample.device)
        timestep = timestep.to(sample.device).reshape(-1)
        if timestep.shape[0] not in (1, B):
            raise ValueError(f"`timestep` must be a number, a 0-d tensor or a (B,) = ({B},) tensor, "
                             f"got shape {tuple(timestep.shape)}")
        return self.time_proj(timestep.expand(B)).to(sample.dtype)

    def _added_embedding(self, emb: torch.Tensor, added_cond_kwargs: dict | None) -> torch.Tensor:
        if not self.size_conditioned:
            return emb
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("this U-Net has size micro-conditioning (addition_embed_type 'text_time'): pass "
                             "added_cond_kwargs={'text_embeds': (B, E) pooled text, 'time_ids': (B, n) sizes}")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        B = emb.shape[0]
        if text_embeds.shape[0] != B or time_ids.shape[0] != B:
            raise ValueError(f"added_cond_kwargs: `text_embeds` {tuple(text_embeds.shape)} and `time_ids` "
                             f"{tuple(time_ids.shape)} must both have batch {B}")
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(B, -1)
        add = torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1)
        want = self.config.projection_class_embeddings_input_dim
        if add.shape[-1] != want:
            raise ValueError(f"added_cond_kwargs: text_embeds width {text_embeds.shape[-1]} + {time_ids.shape[-1]} "
                             f"time ids x {self.config.addition_time_embed_dim} = {add.shape[-1]}, but the config "
                             f"says projection_class_embeddings_input_dim = {want}")
        return emb + self.add_embedding(add.to(emb.dtype))

    # ----------------------------------------------------------------- forward
    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                encoder_lengths: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None, *,
                text_kv: TextContext | None = None, timestep_cond: torch.Tensor | None = None,
                added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """Predict the model output for ``sample`` (B, in_channels, H, W), any H, W >= 1.

        timestep: number, 0-d or (B,) tensor. Text: ``encoder_hidden_states`` (B, L, C) with
        ``encoder_lengths`` (B,) ints or ``encoder_attention_mask`` (B, L) (True/1 = keep; neither:
        every token counts), or ``text_kv`` from ``precompute_text_kv``. ``timestep_cond``
        (B, time_cond_proj_dim) and ``added_cond_kwargs`` as in diffusers.
        """
        c = self.config
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.shape[1] != c.in_channels:
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"`sample` must be (B, {c.in_channels}, H, W), got {shape}")
        if text_kv is not None:
            if encoder_hidden_states is not None or encoder_lengths is not None or encoder_attention_mask is not None:
                raise ValueError("pass either `text_kv` or `encoder_hidden_states` (with its lengths/mask), not both")
            if not isinstance(text_kv, TextContext) or text_kv.kv is None \
                    or len(text_kv.kv) != len(self._cross_attention_layers):
                raise ValueError("`text_kv` must come from this model's precompute_text_kv")
            context = text_kv
        elif encoder_hidden_states is not None:
            context = self._text_context(encoder_hidden_states, encoder_lengths, encoder_attention_mask)
        elif self._cross_attention_layers:
            raise ValueError("this U-Net cross-attends to text: pass `encoder_hidden_states` or `text_kv`")
        else:
            context = None
        if context is not None and context.batch_size != sample.shape[0]:
            raise ValueError(f"the text has batch {context.batch_size} but `sample` has batch {sample.shape[0]}")

        if c.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embedding(self._timestep_features(timestep, sample), timestep_cond)
        emb = self._added_embedding(emb, added_cond_kwargs)

        h = self.conv_in(activation_layout(self.conv_in, sample))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[2:] if i < len(self.up_blocks) - 1 else None
            h = block(h, block_skips, emb, context, upsample_size)
        h = ops.group_norm_silu(h, self.conv_norm_out.weight, self.conv_norm_out.bias, self.conv_norm_out.num_groups,
                                self.conv_norm_out.eps)
        return self.conv_out(h).contiguous()

    def use_channels_last(self, enabled: bool = True) -> "UNet":
        """Run the feature maps channels_last (the default; see ``dalle3_fast.nn.channels_last``).

        On CPU, oneDNN's convolutions then skip the per-call reorders of their input, output and weight
        (20-30 % faster at U-Net shapes) and the transformers' token views cost no copy."""
        return use_channels_last(self, enabled)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
