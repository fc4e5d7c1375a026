"""Latents -> images with a latent decoder network and the shared samplers (diffusers' ConsistencyDecoderVAE.decode).

The decoder is a network (``models.latent_decoder.LatentDecoder``): ``condition(z)`` maps unscaled VAE latents
to its conditioning, ``decoder(x_in, t, cond=...)`` is the EDM network ``F``. Here it is wrapped as an
:class:`EDMDenoiser` on :func:`decoder_schedule` and run by :func:`sample_consistency` (the distilled 2-step
decoder) or :func:`sample_ddim` (the undistilled teacher).

Noise: ``noise`` as tensors (B, 3, H, W), the start noise then one per re-noising, or drawn in that order from
``generator`` — the draws of diffusers' ConsistencyDecoderVAE.decode.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .consistency import consistency_sigmas, decoder_schedule, decoder_timesteps
from .denoisers import EDMDenoiser
from .samplers import noise_list_sampler, sample_consistency, sample_ddim
from .timesteps import sampling_sigmas

NoiseArg = torch.Tensor | Sequence[torch.Tensor] | None


def draw_noises(noise: NoiseArg, count: int, shape, generator: torch.Generator | None, device,
                dtype) -> list[torch.Tensor]:
    """``count`` noise tensors: the given ones (a list or a (count, *shape) tensor, checked) or drawn from ``generator``."""
    if noise is None:
        gen_device = generator.device if generator is not None else device
        return [torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
                for _ in range(count)]
    noises = list(noise.unbind(0)) if isinstance(noise, torch.Tensor) and noise.dim() == 5 else list(
        [noise] if isinstance(noise, torch.Tensor) else noise)
    if len(noises) < count or any(tuple(n.shape) != tuple(shape) for n in noises[:count]):
        raise ValueError(f"`noise` must hold {count} tensors of shape {tuple(shape)} (a list or a "
                         f"({count}, *shape) tensor), got {[tuple(n.shape) for n in noises]}")
    return [n.to(device=device, dtype=dtype) for n in noises[:count]]


def decoder_denoiser(decoder) -> EDMDenoiser:
    """``D(x, sigma, cond=...) -> x0`` in VE coordinates for ``decoder`` (its schedule and sigma_data)."""
    return EDMDenoiser(decoder, decoder_schedule(decoder.num_train_timesteps), decoder.sigma_data)


def _start(decoder, z: torch.Tensor, sigmas: torch.Tensor, count: int, noise: NoiseArg, generator):
    cond = decoder.condition(z)
    B, _, H, W = cond.shape
    noises = draw_noises(noise, count, (B, 3, H, W), generator, cond.device, cond.dtype)
    return cond, noises[0] * float(sigmas[0]), noises[1:]


@torch.no_grad()
def decode_consistency(decoder, z: torch.Tensor, *, generator: torch.Generator | None = None, noise: NoiseArg = None,
                       num_inference_steps: int = 2, timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in about [-1, 1] by multistep consistency sampling.

    ``timesteps`` default to (1008, 512)[:num_inference_steps] of the 1024-step schedule.
    """
    T = decoder.num_train_timesteps
    timesteps = tuple(timesteps) if timesteps is not None else decoder_timesteps(num_inference_steps, T)
    if not timesteps:
        raise ValueError("decode: `timesteps` is empty")
    sigmas = consistency_sigmas(decoder_schedule(T), timesteps)
    cond, x, renoise = _start(decoder, z, sigmas, len(timesteps), noise, generator)
    denoiser = decoder_denoiser(decoder)
    return sample_consistency(lambda x, sigma: denoiser(x, sigma, cond=cond), x, sigmas,
                              noise_sampler=noise_list_sampler(renoise))


@torch.no_grad()
def decode_ddim(decoder, z: torch.Tensor, num_inference_steps: int = 50, *, eta: float = 0.0,
                generator: torch.Generator | None = None, noise: NoiseArg = None) -> torch.Tensor:
    """The undistilled decoder as an ordinary diffusion sampler (the distillation teacher).

    DDIM (eta 0) or DDPM-like (eta 1) over "trailing" timesteps (50 -> 1023, 1002, ..., 20), ending at x0.
    Noise: the start noise, then (eta > 0) one per step but the last.
    """
    sigmas = sampling_sigmas(decoder_schedule(decoder.num_train_timesteps), num_inference_steps)
    count = 1 + (num_inference_steps - 1 if eta > 0 else 0)
    cond, x, renoise = _start(decoder, z, sigmas, count, noise, generator)
    denoiser = decoder_denoiser(decoder)
    return sample_ddim(lambda x, sigma: denoiser(x, sigma, cond=cond), x, sigmas, eta=eta,
                       noise_sampler=noise_list_sampler(renoise))
