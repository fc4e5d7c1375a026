"""Sample grids as PNG."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import atomic_write_bytes


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> Image.Image:
    """(N, 3, H, W) floats in [0, 1] -> one RGB image, ``columns`` wide (default: near-square)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W); got {tuple(images.shape)}")
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = img.expand(3, h, w)
    array = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(array)


def save_grid(images: torch.Tensor, path: Path) -> None:
    buffer = io.BytesIO()
    image_grid(images).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
