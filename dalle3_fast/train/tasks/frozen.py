"""Frozen helper models a task uses but does not train (never part of the trained module)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def required_dir(value: str, option: str, what: str) -> Path:
    if not value:
        raise ValueError(f"task_options.{option} is required: the directory of {what}")
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"task_options.{option}={value!r} does not exist; pass the directory of {what}")
    return path


def load_frozen_vae(path: str, device: torch.device, option: str = "vae"):
    from dalle3_fast.models.vae import AutoencoderKL

    return freeze(AutoencoderKL.from_pretrained(required_dir(path, option, "a trained VAE (config.json + weights)"),
                                                device=device))
