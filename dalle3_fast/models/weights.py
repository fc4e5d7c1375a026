"""Weights file names in diffusers' layout, one helper for every model."""
from __future__ import annotations

from dalle3_fast import io


def weights_file_name(variant: str | None = None, name: str = io.DIFFUSERS_WEIGHTS) -> str:
    """``name`` with ``variant`` before its last suffix, as diffusers names variants.

    ``diffusion_pytorch_model.fp16.safetensors``, ``diffusion_pytorch_model.safetensors.index.fp16.json``;
    ``name`` itself when ``variant`` is None.
    """
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"
