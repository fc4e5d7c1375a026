"""Convolutional models that run their feature maps channels_last (NHWC in memory).

On CPU, oneDNN's convolutions on channels_last weights and inputs skip the per-call reorders
of input, output and weight (20-35 % faster at U-Net and VAE shapes), eager GroupNorm is the
slow path there but ``ops.group_norm_silu`` is not, and (B, C, H, W) <-> (B, H*W, C) token
views cost no copy. Every layer keeps the memory format it is given, so storing the
convolution weights channels_last and handing the first layer a channels_last input is all
a model does; ``state_dict()`` still hands out contiguous tensors for writers that refuse
strided ones (safetensors).
"""
from __future__ import annotations

import torch
from torch import nn


def use_channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Store every Conv2d weight of ``model`` channels_last (or back to contiguous), in place."""
    fmt = torch.channels_last if enabled else torch.contiguous_format
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=fmt)
    return model


def activation_layout(first_conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the layout the model runs: channels_last when its first convolution's weight is."""
    if first_conv.weight.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4 and x.shape[1] > 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def contiguous_state(module, state_dict, prefix, local_metadata) -> None:
    """A ``register_state_dict_post_hook`` hook: contiguous copies of strided (channels_last) tensors."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[name] = value.contiguous()
