"""2x spatial down/upsampling in diffusers' Downsample2D / Upsample2D layout.

Parameter names match diffusers (``conv.weight``, ``conv.bias``) so their weights load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Downsample2D(nn.Module):
    """Halve H and W: a stride-2 convolution (``use_conv``) or a 2x2 average pool.

    With ``padding=0`` the convolution input is padded by one zero row/column on the
    bottom/right only (the asymmetric padding of the SD VAE encoder); otherwise the
    convolution pads ``padding`` on every side.
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None,
                 padding: int = 1, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=kernel_size, stride=2,
                                  padding=padding, bias=bias)
        else:
            if self.out_channels != channels:
                raise ValueError(f"Downsample2D: average pooling keeps the channel count ({channels}); "
                                 f"out_channels={out_channels} needs use_conv=True")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[1] != self.channels:
            raise ValueError(f"Downsample2D: input has {hidden_states.shape[1]} channels, expected {self.channels}")
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then an optional 3x3 convolution.

    ``forward(x, output_size=(H, W))`` interpolates to that exact size instead of 2x,
    so a U-Net whose skip connections have odd sizes lines up.
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None,
                 kernel_size: int = 3, padding: int = 1, bias: bool = True):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=kernel_size, padding=padding, bias=bias)
        else:
            if self.out_channels != channels:
                raise ValueError(f"Upsample2D: interpolation keeps the channel count ({channels}); "
                                 f"out_channels={out_channels} needs use_conv=True")
            self.conv = None

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if hidden_states.shape[1] != self.channels:
            raise ValueError(f"Upsample2D: input has {hidden_states.shape[1]} channels, expected {self.channels}")
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=tuple(s if isinstance(s, (int, torch.SymInt)) else int(s)
                                                                 for s in output_size), mode="nearest")
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states
