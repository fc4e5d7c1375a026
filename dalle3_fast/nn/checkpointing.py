"""Activation checkpointing: one wrapper every model uses."""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


def checkpointed(module: nn.Module, enabled: bool, *args):
    """``module(*args)``, recomputed in the backward instead of stored when ``enabled`` (and grads are on)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)
