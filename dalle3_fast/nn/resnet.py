"""The ResBlock of SD-style U-Nets and VAEs, on the fused GroupNorm+SiLU op.

Same parameters and maths as diffusers' ``ResnetBlock2D`` (its weights load as they are):

    h = conv1(silu(norm1(x)))                              [x, h resampled after norm1 if up/down]
    default:      h = silu(norm2(h + proj(silu(temb))))
    scale_shift:  h = silu(norm2(h) * (1 + scale) + shift),   (scale, shift) = proj(silu(temb)).chunk(2)
    out = (shortcut(x) + conv2(dropout(h))) / output_scale_factor

Each "norm + modulation + SiLU" is one call to ``dalle3_fast.ops.group_norm_silu``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dalle3_fast import ops

TIME_EMBEDDING_NORMS = ("default", "scale_shift")
_SILU_NAMES = ("swish", "silu")


class ResnetBlock2D(nn.Module):
    """A ResBlock with optional timestep conditioning and optional 2x up/downsampling.

    Args (keyword-only, as in diffusers):
        in_channels, out_channels: channels in and out (out defaults to in).
        temb_channels: width of the timestep embedding, or None for an unconditioned block (VAE).
        groups, groups_out: GroupNorm groups of norm1 / norm2 (groups_out defaults to groups).
        eps: GroupNorm epsilon.
        time_embedding_norm: "default" (embedding added before norm2) or "scale_shift"
            (norm2 output modulated by (1 + scale) and shift).
        skip_time_act: feed the embedding to ``time_emb_proj`` without the SiLU first.
        output_scale_factor: the sum (shortcut + residual) is divided by this.
        up, down: nearest 2x upsampling / 2x2 average pooling of both branches after norm1.
        conv_shortcut: when the shortcut needs a projection, make it a 3x3 convolution
            (the original LDM option). diffusers >= 0.2x ignores this flag and always uses
            1x1; leave it False to load diffusers weights.
        use_in_shortcut: force (True) or forbid (False) the shortcut projection; by default
            it exists when in_channels != output channels.
        conv_shortcut_bias: whether the shortcut projection has a bias.
        conv_2d_out_channels: output channels of conv2 (defaults to out_channels).
        dropout: dropout probability before conv2.
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int | None = 512, groups: int = 32,
                 groups_out: int | None = None, eps: float = 1e-6, non_linearity: str = "swish",
                 skip_time_act: bool = False, time_embedding_norm: str = "default",
                 output_scale_factor: float = 1.0, use_in_shortcut: bool | None = None, up: bool = False,
                 down: bool = False, conv_shortcut_bias: bool = True, conv_2d_out_channels: int | None = None):
        super().__init__()
        if time_embedding_norm not in TIME_EMBEDDING_NORMS:
            raise ValueError(f"ResnetBlock2D: time_embedding_norm={time_embedding_norm!r} is not supported; "
                             f"use one of {TIME_EMBEDDING_NORMS}")
        if non_linearity not in _SILU_NAMES:
            raise ValueError(f"ResnetBlock2D: non_linearity={non_linearity!r} is not supported; the fused "
                             "GroupNorm op applies SiLU, so use 'swish' or 'silu'")
        if up and down:
            raise ValueError("ResnetBlock2D: pass at most one of up=True and down=True")
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        for name, channels, g in (("groups", in_channels, groups), ("groups_out", out_channels, groups_out)):
            if channels % g != 0:
                raise ValueError(f"ResnetBlock2D: {name}={g} does not divide {channels} channels; pick a divisor")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut
        self.up = up
        self.down = down
        self.output_scale_factor = output_scale_factor
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act

        self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_out)
        self.norm2 = nn.GroupNorm(num_groups=groups_out, num_channels=out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, stride=1, padding=1)

        self.use_in_shortcut = in_channels != conv_2d_out_channels if use_in_shortcut is None else use_in_shortcut
        if self.use_in_shortcut:
            k = 3 if conv_shortcut else 1
            self.conv_shortcut = nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=k, stride=1,
                                           padding=k // 2, bias=conv_shortcut_bias)
        else:
            self.conv_shortcut = None

    def _resample(self, t: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(t, kernel_size=2, stride=2)
        return t

    def _time_modulation(self, temb: torch.Tensor | None, batch: int):
        """(add, scale, shift) for norm2, each (B, C) or None."""
        if temb is None:
            if self.time_embedding_norm == "scale_shift":
                raise ValueError("ResnetBlock2D: `temb` is required when time_embedding_norm='scale_shift'")
            return None, None, None
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = F.silu(temb)
            temb = self.time_emb_proj(temb)
        temb = temb.reshape(temb.shape[0], -1)
        if temb.shape[0] != batch:
            raise ValueError(f"ResnetBlock2D: `temb` has batch {temb.shape[0]} but the input has batch {batch}")
        if self.time_embedding_norm == "scale_shift":
            scale, shift = temb.chunk(2, dim=1)
            return None, scale, shift
        return temb, None, None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = ops.group_norm_silu(input_tensor, self.norm1.weight, self.norm1.bias,
                                            self.norm1.num_groups, self.norm1.eps)
        if self.up or self.down:
            input_tensor = self._resample(input_tensor)
            hidden_states = self._resample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        add, scale, shift = self._time_modulation(temb, hidden_states.shape[0])
        dtype = hidden_states.dtype
        hidden_states = ops.group_norm_silu(
            hidden_states, self.norm2.weight, self.norm2.bias, self.norm2.num_groups, self.norm2.eps,
            add=None if add is None else add.to(dtype),
            scale=None if scale is None else scale.to(dtype),
            shift=None if shift is None else shift.to(dtype))
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)

        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        output = input_tensor + hidden_states
        if self.output_scale_factor != 1.0:
            output = output / self.output_scale_factor
        return output
