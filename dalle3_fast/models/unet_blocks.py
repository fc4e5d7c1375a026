"""The down, mid and up blocks of an SD-style U-Net, in diffusers' layout.

Each block mirrors the diffusers class of the same name (CrossAttnDownBlock2D,
DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D): same
sub-module names (``resnets``, ``attentions``, ``downsamplers``, ``upsamplers``) and the
same order of operations, so diffusers weights load and outputs match.
"""
from __future__ import annotations

import torch
from torch import nn

from dalle3_fast.nn.attention import TextContext
from dalle3_fast.nn.checkpointing import checkpointed
from dalle3_fast.nn.resnet import ResnetBlock2D
from dalle3_fast.nn.sampling import Downsample2D, Upsample2D
from dalle3_fast.nn.transformer import SpatialTransformer


class _Block(nn.Module):
    gradient_checkpointing = False

    def _run(self, layer: nn.Module, *args):
        return checkpointed(layer, self.gradient_checkpointing, *args)


def _resnet(in_channels, out_channels, temb_channels, *, eps, groups, dropout, time_scale_shift,
            output_scale_factor=1.0):
    return ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                         eps=eps, groups=groups, dropout=dropout, time_embedding_norm=time_scale_shift,
                         non_linearity="silu", output_scale_factor=output_scale_factor)


def _transformer(channels, heads, depth, *, cross_attention_dim, groups, use_linear_projection, dropout):
    if channels % heads != 0:
        raise ValueError(f"U-Net: {channels} channels cannot be split into {heads} attention heads "
                         "(attention_head_dim, which diffusers reads as the head count, must divide the channels)")
    return SpatialTransformer(heads, channels // heads, in_channels=channels, num_layers=depth,
                              cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                              use_linear_projection=use_linear_projection, dropout=dropout)


class DownBlock2D(_Block):
    """``num_layers`` ResBlocks, then an optional stride-2 convolution; returns every output as a skip."""

    has_cross_attention = False

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int, eps: float,
                 groups: int, dropout: float = 0.0, time_scale_shift: str = "default", add_downsample: bool = True,
                 downsample_padding: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList([
            _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, eps=eps, groups=groups,
                    dropout=dropout, time_scale_shift=time_scale_shift) for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                                         padding=downsample_padding)])
                             if add_downsample else None)

    def forward(self, hidden_states, temb, context: TextContext | None = None):
        skips = []
        for resnet in self.resnets:
            hidden_states = self._run(resnet, hidden_states, temb)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a SpatialTransformer after each ResBlock."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int, eps: float,
                 groups: int, num_attention_heads: int, transformer_layers: int, cross_attention_dim: int,
                 use_linear_projection: bool, dropout: float = 0.0, time_scale_shift: str = "default",
                 add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__(in_channels, out_channels, temb_channels, num_layers=num_layers, eps=eps, groups=groups,
                         dropout=dropout, time_scale_shift=time_scale_shift, add_downsample=add_downsample,
                         downsample_padding=downsample_padding)
        self.attentions = nn.ModuleList([
            _transformer(out_channels, num_attention_heads, transformer_layers, cross_attention_dim=cross_attention_dim,
                         groups=groups, use_linear_projection=use_linear_projection, dropout=dropout)
            for _ in range(num_layers)])

    def forward(self, hidden_states, temb, context: TextContext | None = None):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = self._run(resnet, hidden_states, temb)
            hidden_states = attn(hidden_states, context)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, skips


class UNetMidBlock2DCrossAttn(_Block):
    """ResBlock, then (SpatialTransformer, ResBlock) once, at the lowest resolution."""

    has_cross_attention = True

    def __init__(self, channels: int, temb_channels: int, *, eps: float, groups: int, num_attention_heads: int,
                 transformer_layers: int, cross_attention_dim: int, use_linear_projection: bool,
                 dropout: float = 0.0, time_scale_shift: str = "default", output_scale_factor: float = 1.0):
        super().__init__()
        kw = dict(eps=eps, groups=groups, dropout=dropout, time_scale_shift=time_scale_shift,
                  output_scale_factor=output_scale_factor)
        self.resnets = nn.ModuleList([_resnet(channels, channels, temb_channels, **kw),
                                      _resnet(channels, channels, temb_channels, **kw)])
        self.attentions = nn.ModuleList([
            _transformer(channels, num_attention_heads, transformer_layers, cross_attention_dim=cross_attention_dim,
                         groups=groups, use_linear_projection=use_linear_projection, dropout=dropout)])

    def forward(self, hidden_states, temb, context: TextContext | None = None):
        hidden_states = self._run(self.resnets[0], hidden_states, temb)
        hidden_states = self.attentions[0](hidden_states, context)
        return self._run(self.resnets[1], hidden_states, temb)


class UpBlock2D(_Block):
    """``num_layers`` ResBlocks, each on [x, skip] concatenated, then an optional upsampling to the next skip's size."""

    has_cross_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int, eps: float, groups: int, dropout: float = 0.0, time_scale_shift: str = "default",
                 add_upsample: bool = True):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(_resnet(resnet_in + skip_channels, out_channels, temb_channels, eps=eps, groups=groups,
                                   dropout=dropout, time_scale_shift=time_scale_shift))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = (nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
                           if add_upsample else None)

    def _attend(self, i: int, hidden_states, context):
        return hidden_states

    def forward(self, hidden_states, skips: list, temb, context: TextContext | None = None, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)
            hidden_states = self._run(resnet, hidden_states, temb)
            hidden_states = self._attend(i, hidden_states, context)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a SpatialTransformer after each ResBlock."""

    has_cross_attention = True

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int, eps: float, groups: int, num_attention_heads: int, transformer_layers: int,
                 cross_attention_dim: int, use_linear_projection: bool, dropout: float = 0.0,
                 time_scale_shift: str = "default", add_upsample: bool = True):
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, num_layers=num_layers,
                         eps=eps, groups=groups, dropout=dropout, time_scale_shift=time_scale_shift,
                         add_upsample=add_upsample)
        self.attentions = nn.ModuleList([
            _transformer(out_channels, num_attention_heads, transformer_layers, cross_attention_dim=cross_attention_dim,
                         groups=groups, use_linear_projection=use_linear_projection, dropout=dropout)
            for _ in range(num_layers)])

    def _attend(self, i: int, hidden_states, context):
        return self.attentions[i](hidden_states, context)
