"""The images of ``/v1/images/edits``: untrusted PNG bytes -> the tensors of an edit job.

Call from a worker thread (``asyncio.to_thread``): decoding and resizing take time the event loop must not
lose. The declared size is read from the header (``Image.open`` is lazy) and checked before any pixel is
decoded, so a small file declaring a huge image costs nothing.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dalle3_fast.pipeline import from_pil
from dalle3_fast.serve.errors import invalid
from dalle3_fast.serve.policy import RequestPolicy, Settings


@dataclass
class EditInputs:
    settings: Settings
    images: torch.Tensor   # (1, 3, H, W) in [-1, 1]
    masks: torch.Tensor    # (1, 1, H, W), 1 = repaint


def decode_png(data: bytes, param: str, max_side: int) -> Image.Image:
    """``data`` as a decoded PNG no larger than ``max_side`` a side, as RGBA if it has transparency (an alpha
    channel or a tRNS colour), else RGB; a 400 naming ``param`` otherwise."""
    # Pillow signals a malformed file with many exception types (OSError, SyntaxError, ValueError, EOFError,
    # struct.error, DecompressionBombError, ...): any of them, from these calls on the client's bytes, is the
    # client's file, not a server fault.
    try:
        image = Image.open(io.BytesIO(data))  # the header only
        width, height, kind = image.width, image.height, image.format
    except Exception as exc:
        raise invalid(param, f"'{param}' is not a valid PNG image: {exc}") from None
    if kind != "PNG":
        raise invalid(param, f"'{param}' must be a PNG image; got {kind}.")
    if width > max_side or height > max_side:
        raise invalid(param, f"'{param}' is {width}x{height}; this server takes images of at most {max_side} "
                             f"pixels a side.")
    try:
        image.load()
        transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        return image.convert("RGBA" if transparent else "RGB")  # a palette image without PLTE fails here
    except Exception as exc:
        raise invalid(param, f"'{param}' is not a valid PNG image: {exc or type(exc).__name__}") from None


def transparent_region(image: Image.Image, param: str) -> Image.Image:
    """The fully transparent pixels of ``image`` (from ``decode_png``) as an "L" image (255 = edit)."""
    if image.mode != "RGBA":
        raise invalid(param, f"'{param}' has no alpha channel; the transparent pixels mark the region to edit "
                             "(pass an RGBA PNG, or a mask).")
    alpha = np.asarray(image)[..., 3]
    edit = alpha == 0
    if not edit.any():
        raise invalid(param, f"'{param}' has no fully transparent pixels; nothing to edit.")
    return Image.fromarray((edit * 255).astype(np.uint8), mode="L")


def prepare_edit(policy: RequestPolicy, image: bytes, mask: bytes | None, size: str | None) -> EditInputs:
    """Decode and check ``image`` (and ``mask``), pick the size (``size``, else the image's own if served, else
    the default), and resize both to it."""
    picture = decode_png(image, "image", policy.max_image_side)
    alpha_source = decode_png(mask, "mask", policy.max_image_side) if mask is not None else picture
    if mask is not None and alpha_source.size != picture.size:
        raise invalid("mask", f"'mask' is {alpha_source.size[0]}x{alpha_source.size[1]} but 'image' is "
                              f"{picture.size[0]}x{picture.size[1]}; they must be the same size.")
    edit = transparent_region(alpha_source, "mask" if mask is not None else "image")
    if size is None:
        native = f"{picture.size[0]}x{picture.size[1]}"
        size = native if native in policy.sizes else None
    settings = policy.settings(size=size, quality=None, style=None)
    target = (settings.width, settings.height)
    rgb = from_pil([picture.convert("RGB").resize(target, Image.BICUBIC)])
    region = np.asarray(edit.resize(target, Image.NEAREST), dtype=np.float32) / 255.0
    return EditInputs(settings, rgb, torch.from_numpy(region)[None, None])
