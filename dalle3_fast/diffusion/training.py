"""Diffusion training losses: noising, epsilon / v targets, optional min-SNR weighting."""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule, append_dims, velocity


def sample_timesteps(batch_size: int, schedule: NoiseSchedule, *, device=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer training timesteps, uniform over ``[0, num_train_timesteps)``."""
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
    return t.to(device)


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """VP forward process ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (diffusers' ``add_noise``)."""
    abar = append_dims(schedule.alphas_cumprod.to(x0.device)[t], x0.ndim).to(x0.dtype)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample weights of Min-SNR-gamma (Hang et al. 2023) for an MSE on the given target."""
    snr = schedule.snr(t)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type={prediction_type!r} is unknown; use epsilon, v_prediction or sample")


def diffusion_loss(net: Callable[..., torch.Tensor], schedule: NoiseSchedule, x0: torch.Tensor, *,
                   prediction_type: str = "epsilon", cond: dict | None = None, min_snr_gamma: float | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean denoising MSE of ``net(x_t, t, **cond)`` against the epsilon / v / x0 target.

    Timesteps and noise come from ``generator`` (or the global RNG, which the trainer checkpoints).
    """
    b = x0.shape[0]
    t = sample_timesteps(b, schedule, device=x0.device, generator=generator)
    gen_device = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    x_t = add_noise(schedule, x0, noise, t)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        abar = append_dims(schedule.alphas_cumprod.to(x0.device)[t], x0.ndim).to(x0.dtype)
        target = velocity(x0, noise, abar)
    elif prediction_type == "sample":
        target = x0
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is unknown; use epsilon, v_prediction or sample")
    pred = net(x_t, t, **(cond or {}))
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(schedule, t, min_snr_gamma, prediction_type).to(per_sample)
    return per_sample.mean()
