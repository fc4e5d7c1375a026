"""Classifier-free guidance with a negative prompt in one batched model call."""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    pad = [0, 0] * (t.ndim - 2) + [0, length - t.shape[1]]
    return F.pad(t, pad)


def concat_conditions(uncond: Mapping[str, object], cond: Mapping[str, object]) -> dict:
    """Stack two condition dicts along the batch: ``[uncond, cond]``.

    Tensors of rank >= 2 whose dim 1 differs (token sequences of different lengths) are
    zero-padded to the longer one; a matching ``*_lengths`` tensor keeps the padding masked.
    Non-tensor values must be equal in both and are passed through.
    """
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond must have the same keys; got {sorted(cond)} and {sorted(uncond)}")
    out = {}
    for key in cond:
        a, b = uncond[key], cond[key]
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape[0] != b.shape[0]:
                raise ValueError(f"condition {key!r}: uncond and cond must be tensors with the same batch size")
            if a.ndim >= 2 and a.shape[1] != b.shape[1]:
                n = max(a.shape[1], b.shape[1])
                a, b = _pad_to(a, n), _pad_to(b, n)
            out[key] = torch.cat([a, b])
        else:
            if a != b:
                raise ValueError(f"condition {key!r} is not a tensor and differs between cond and uncond")
            out[key] = b
    return out


def cfg_model_fn(denoiser: Callable[..., torch.Tensor], cond: Mapping[str, object], uncond: Mapping[str, object],
                 guidance_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn(x, sigma)`` = ``D_u + w * (D_c - D_u)`` from ONE call on the batch ``[uncond, cond]``.

    ``denoiser(x, sigma, **conditions) -> denoised``; ``uncond`` is the empty prompt or the negative
    prompt. Guidance on x0 equals guidance on epsilon (they are affine in each other at fixed x).
    ``guidance_scale == 1`` skips the unconditional half.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 0 (1 disables guidance)")
    if guidance_scale == 1:
        cond = dict(cond)
        return lambda x, sigma: denoiser(x, sigma, **cond)
    both = concat_conditions(uncond, cond)

    def model_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out_u, out_c = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    return model_fn
