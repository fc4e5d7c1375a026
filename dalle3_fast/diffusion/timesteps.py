"""Inference grids: which timesteps / sigmas a sampler visits for N steps.

Spacings follow diffusers' ``timestep_spacing`` (DDIM and Euler schedulers):
- ``"trailing"``: ``round(arange(T, 0, -T/N)) - 1``; always starts at T-1 (use it: the others never
  reach pure noise with few steps);
- ``"leading"``: ``arange(N) * (T // N)`` reversed, plus ``steps_offset`` (SD 1.x configs use 1);
- ``"linspace"``: ``linspace(0, T-1, N)`` reversed, fractional timesteps kept.
"""
from __future__ import annotations

import torch

from .schedule import NoiseSchedule

SPACINGS = ("trailing", "leading", "linspace")


def inference_timesteps(num_steps: int, num_train_timesteps: int = 1000, *, spacing: str = "trailing",
                        steps_offset: int = 0) -> torch.Tensor:
    """Descending float64 timesteps, ``num_steps`` of them."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={num_train_timesteps}")
    T = num_train_timesteps
    if spacing == "trailing":
        t = torch.arange(T, 0, -T / num_steps, dtype=torch.float64).round() - 1
    elif spacing == "leading":
        t = (torch.arange(num_steps, dtype=torch.float64) * (T // num_steps)).round().flip(0) + steps_offset
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, num_steps, dtype=torch.float64).flip(0)
    else:
        raise ValueError(f"spacing={spacing!r} is unknown; use one of {', '.join(SPACINGS)}")
    return t.clamp(0, T - 1)


def sampling_sigmas(schedule: NoiseSchedule, num_steps: int, *, spacing: str = "trailing",
                    steps_offset: int = 0) -> torch.Tensor:
    """``num_steps + 1`` descending float64 sigmas for the samplers; the last is 0 (a clean sample)."""
    t = inference_timesteps(num_steps, schedule.num_train_timesteps, spacing=spacing, steps_offset=steps_offset)
    return torch.cat([schedule.t_to_sigma(t), t.new_zeros(1)])


def initial_noise(shape, sigma_max: float, *, generator: torch.Generator | None = None,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """Starting point of a VE sampler: ``randn(shape) * sqrt(sigma_max**2 + 1)``.

    That is the standard deviation of ``x0 + sigma * eps`` for unit-variance data (scaled
    latents), i.e. the VP prior N(0, I) seen in VE coordinates. The noise is drawn on the
    generator's device and moved, so one seed gives the same picture on CPU and GPU.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    return (noise * (float(sigma_max) ** 2 + 1) ** 0.5).to(device=device, dtype=dtype)
