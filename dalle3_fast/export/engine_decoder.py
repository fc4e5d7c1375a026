"""A latent decoder backed by an exported 2-step graph, usable as ``Dalle3Pipeline.decoder``.

    pipe.decoder = ORTDecoder("decoder.onnx", like=pipe.decoder)        # onnxruntime, CPU
    pipe.decoder = TRTDecoder("decoder.plan", like=pipe.decoder)        # TensorRT, CUDA
    images = pipe.decode(latents, decoder="consistency", seeds=seeds)

``decode`` has ``diffusion.decode_consistency``'s signature (less the decoder) and draws its noise the same way
(from ``generator`` in diffusers' order, or given), so swapping the PyTorch decoder for an engine leaves the
images unchanged up to the engine's numerics.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dalle3_fast.diffusion.latent_decoding import draw_noises
from dalle3_fast.export.tensorrt import TRTEngine
from dalle3_fast.models.latent_decoder import LatentDecoder


class EngineDecoder(nn.Module):
    """Base: subclasses implement ``run(latents, noise_0, noise_1) -> images`` on torch tensors."""

    def __init__(self, upsample_factor: int, latent_channels: int):
        super().__init__()
        self.upsample_factor = upsample_factor
        self.latent_channels = latent_channels

    def run(self, latents: torch.Tensor, noise_0: torch.Tensor, noise_1: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, z: torch.Tensor, generator: torch.Generator | None = None, noise=None,
               num_inference_steps: int = 2, timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, f*h, f*w); the engine holds the 2-step schedule only."""
        if num_inference_steps != 2 or timesteps is not None:
            raise ValueError(f"{type(self).__name__}: the exported graph runs the 2-step schedule only "
                             f"(num_inference_steps=2, default timesteps); got {num_inference_steps} / {timesteps}")
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != self.latent_channels:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{type(self).__name__}: latents must be (B, {self.latent_channels}, h, w), got {shape}")
        f = self.upsample_factor
        shape = (z.shape[0], 3, z.shape[2] * f, z.shape[3] * f)
        noise_0, noise_1 = draw_noises(noise, 2, shape, generator, z.device, z.dtype)
        return self.run(z, noise_0, noise_1)


class ORTDecoder(EngineDecoder):
    """The exported decoder graph run by onnxruntime (CPU execution provider)."""

    def __init__(self, onnx_path: str | os.PathLike, *, like: LatentDecoder, threads: int | None = None):
        from dalle3_fast.export.onnx_export import onnx_session

        super().__init__(like.config.latent_upsample_factor, like.config.latent_channels)
        self.session = onnx_session(onnx_path, threads)

    def run(self, latents, noise_0, noise_1):
        feeds = {"latents": latents, "noise_0": noise_0, "noise_1": noise_1}
        out = self.session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})[0]
        return torch.from_numpy(out).to(latents.device)


class TRTDecoder(EngineDecoder):
    """The 2-step decoder engine (TensorRT, CUDA) as a drop-in ``Dalle3Pipeline.decoder``."""

    def __init__(self, plan_path: str | os.PathLike, *, like: LatentDecoder):
        super().__init__(like.config.latent_upsample_factor, like.config.latent_channels)
        self.engine = TRTEngine(plan_path)

    def run(self, latents, noise_0, noise_1):
        out = self.engine(latents=latents, noise_0=noise_0, noise_1=noise_1)["images"]
        return out.to(device=latents.device, dtype=latents.dtype)


def use_decoder_engine(pipe, path: Path) -> None:
    """Replace the pipeline's latent decoder by the exported graph at ``path`` and make it the default decoder."""
    if not path.is_file():
        raise FileNotFoundError(f"--decoder-engine {path}: no such file")
    if pipe.decoder is None:
        raise ValueError("--decoder-engine: this pipeline has no latent decoder to replace")
    if path.suffix == ".onnx":
        pipe.decoder = ORTDecoder(path, like=pipe.decoder)
    else:
        try:
            pipe.decoder = TRTDecoder(path, like=pipe.decoder)
        except RuntimeError as exc:
            raise ValueError(f"--decoder-engine {path}: {exc}") from None
    pipe.defaults["decoder"] = "consistency"
