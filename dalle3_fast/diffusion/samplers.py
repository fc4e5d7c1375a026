"""Samplers in k-diffusion's style: one signature for all of them.

    sample_X(model_fn, x, sigmas, *, generator=None, callback=None) -> x0

- ``model_fn(x, sigma) -> denoised``: ``x`` in VE coordinates (``x0 + sigma * eps``), ``sigma`` a
  (B,) tensor; wrap a network with :class:`~dalle3_fast.diffusion.denoisers.Denoiser` and guidance
  with :func:`~dalle3_fast.diffusion.guidance.cfg_model_fn`.
- ``x``: the starting sample at ``sigmas[0]`` (see ``initial_noise``); any shape (B, ...).
- ``sigmas``: descending (N+1,) grid ending in 0 (see ``sampling_sigmas``); N model calls.
- ``generator``: draws any fresh noise (only the stochastic samplers use it).
- ``callback(i, x, denoised, sigma)``: called after each step with the step index, the new
  sample, the model's x0 estimate and the sigma it was made at.
- ``noise_sampler(sigma, sigma_next) -> noise`` (stochastic samplers, k-diffusion's hook): where fresh
  noise comes from instead of ``generator``; :func:`noise_list_sampler` replays given tensors.

Each deterministic sampler reproduces a diffusers scheduler step for step (tests/test_diffusion.py):
DDIM (DDIMScheduler, eta 0, set_alpha_to_one), Euler (EulerDiscreteScheduler), DPM-Solver++(2M)
(DPMSolverMultistepScheduler, dpmsolver++, solver_order 2, midpoint, final sigma zero).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor, float], None]
NoiseSampler = Callable[[float, float], torch.Tensor]


def generator_noise_sampler(x: torch.Tensor, generator: torch.Generator | None) -> NoiseSampler:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (one seed, one picture on any device)."""
    device = generator.device if generator is not None else x.device

    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return sample


def noise_list_sampler(noises) -> NoiseSampler:
    """Hands out the given tensors in order, one per call (fixed noise for tests and exported graphs)."""
    it = iter(noises)

    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        try:
            return next(it)
        except StopIteration:
            raise ValueError("noise_list_sampler: more noise requested than given") from None
    return sample


def _check_sigmas(sigmas: torch.Tensor, x: torch.Tensor) -> list[float]:
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 values (N steps need N+1); got shape "
                         f"{tuple(sigmas.shape)}")
    values = [float(s) for s in sigmas]
    if any(b > a for a, b in zip(values, values[1:])) or values[-1] < 0:
        raise ValueError("sigmas must be non-increasing and non-negative (build them with sampling_sigmas)")
    if x.ndim < 2:
        raise ValueError(f"x must be batched (B, ...); got shape {tuple(x.shape)}")
    return values


def _sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
                callback: Callback | None = None, eta: float = 0.0,
                noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DDIM: ``x_next = D + sigma_down * (x - D) / sigma + sigma_up * noise``.

    ``eta`` 0 is deterministic (``sigma_down = sigma_next``); otherwise DDIM's eta in VE coordinates,
    ``sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2)``, ``sigma_down^2 = sigma_next^2 - sigma_up^2``
    (DDIMScheduler's variance; eta 1 is DDPM's posterior).
    """
    s = _check_sigmas(sigmas, x)
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    if eta and noise_sampler is None:
        noise_sampler = generator_noise_sampler(x, generator)
    for i in range(len(s) - 1):
        denoised = model_fn(x, _sigma_batch(x, s[i]))
        eps = (x - denoised) / s[i]
        sigma_up = min(s[i + 1], eta * s[i + 1] * max(1 - s[i + 1] ** 2 / s[i] ** 2, 0.0) ** 0.5)
        if sigma_up > 0:
            sigma_down = max(s[i + 1] ** 2 - sigma_up ** 2, 0.0) ** 0.5
            x = denoised + eps * sigma_down + sigma_up * noise_sampler(s[i], s[i + 1]).to(x)
        else:
            x = denoised + eps * s[i + 1]
        if callback is not None:
            callback(i, x, denoised, s[i])
    return x


@torch.no_grad()
def sample_euler(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None) -> torch.Tensor:
    """Euler on the probability-flow ODE ``dx/dsigma = (x - D) / sigma``."""
    s = _check_sigmas(sigmas, x)
    for i in range(len(s) - 1):
        denoised = model_fn(x, _sigma_batch(x, s[i]))
        d = (x - denoised) / s[i]
        x = x + d * (s[i + 1] - s[i])
        if callback is not None:
            callback(i, x, denoised, s[i])
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep in log-SNR; first order on the first and last step."""
    s = _check_sigmas(sigmas, x)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = model_fn(x, _sigma_batch(x, s[i]))
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])  # lambda = -log(sigma) in VE coordinates
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised, s[i])
    return x


@torch.no_grad()
def sample_consistency(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
                       callback: Callback | None = None, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Multistep consistency sampling: jump to x0, re-noise to the next sigma with fresh noise, repeat.

    ``model_fn`` is a consistency function (maps any point of a trajectory to its x0); with
    ``sigmas = [sigma(t=1008), sigma(t=512), 0]`` of the cosine 1024-step schedule and ``x`` =
    ``sigmas[0] * noise`` this is diffusers' ConsistencyDecoderScheduler (2 steps).
    """
    s = _check_sigmas(sigmas, x)
    noise_sampler = noise_sampler or generator_noise_sampler(x, generator)
    for i in range(len(s) - 1):
        denoised = model_fn(x, _sigma_batch(x, s[i]))
        if s[i + 1] > 0:
            x = denoised + s[i + 1] * noise_sampler(s[i], s[i + 1]).to(x)
        else:
            x = denoised
        if callback is not None:
            callback(i, x, denoised, s[i])
    return x


SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m, "consistency": sample_consistency}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown; use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
