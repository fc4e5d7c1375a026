"""Timestep embeddings: sinusoidal features and the MLP that widens them.

Same maths and parameter names as diffusers' ``get_timestep_embedding``, ``Timesteps``
and ``TimestepEmbedding`` (``linear_1``, ``linear_2``, ``cond_proj``), so their weights load.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0, max_period: float = 10000.0
                       ) -> torch.Tensor:
    """(N,) timesteps (may be fractional) -> (N, dim) float32 sinusoidal features.

    Frequencies are exp(-ln(max_period) * i / (dim/2 - downscale_freq_shift)), i < dim/2;
    the output is [sin, cos] (or [cos, sin] with ``flip_sin_to_cos``), zero-padded when
    ``dim`` is odd.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timestep_embedding: `timesteps` must be 1-D (N,), got shape {tuple(timesteps.shape)}")
    if dim < 2:
        raise ValueError(f"timestep_embedding: `dim` must be >= 2, got {dim}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal features of the timesteps, always float32."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                  downscale_freq_shift=self.downscale_freq_shift, scale=self.scale)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, with an optional bias-free ``cond_proj`` of an extra
    condition (e.g. an LCM guidance-scale embedding) added to the input first."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None,
                 cond_proj_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = None if cond_proj_dim is None else nn.Linear(cond_proj_dim, in_channels, bias=False)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("TimestepEmbedding: a `condition` was given but this embedding has no cond_proj "
                                 "(build it with cond_proj_dim, i.e. the U-Net config's time_cond_proj_dim)")
            sample = sample + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(sample)))
