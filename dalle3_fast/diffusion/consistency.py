"""Consistency models for the latent decoder: the 2-step grid and consistency distillation.

Distillation (Song et al. 2023; LCM's recipe): draw ``t_{n+k}``, noise a clean sample to it, take
ONE DDIM step of the frozen teacher down to ``t_n = t_{n+k} - k`` (k = the skipping step), and pull
the student's output at ``t_{n+k}`` towards the EMA target network's output at ``t_n`` with a
pseudo-Huber loss. Functions are ``fn(x, sigma, **cond) -> x0`` in VE coordinates (EDMDenoiser).
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import torch

from .schedule import NoiseSchedule, append_dims

# OpenAI's consistency decoder / diffusers' ConsistencyDecoderScheduler: cosine schedule, 1024 steps.
DECODER_TIMESTEPS = (1008, 512)
DECODER_TRAIN_TIMESTEPS = 1024


@functools.lru_cache(maxsize=8)
def decoder_schedule(num_train_timesteps: int = DECODER_TRAIN_TIMESTEPS) -> NoiseSchedule:
    """The latent decoder's schedule: cosine, in diffusers' float32 arithmetic (ConsistencyDecoderScheduler's tables)."""
    return NoiseSchedule("cosine", num_train_timesteps, precision="float32")


def decoder_timesteps(num_steps: int = 2, num_train_timesteps: int = DECODER_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """(1008, 512) for 2 steps and (1008,) for 1, scaled to a schedule of ``num_train_timesteps``."""
    if num_steps not in (1, 2):
        raise ValueError(f"num_inference_steps={num_steps}: the consistency schedule is defined for 1 or 2 steps; "
                         "pass `timesteps` explicitly for more, or sample the teacher with DDIM")
    T = num_train_timesteps
    return tuple(t * T // DECODER_TRAIN_TIMESTEPS for t in DECODER_TIMESTEPS[:num_steps])


def consistency_sigmas(schedule: NoiseSchedule, timesteps: Sequence[int] = DECODER_TIMESTEPS) -> torch.Tensor:
    """``[sigma(t) for t in timesteps] + [0]``, the grid :func:`sample_consistency` walks."""
    t = torch.as_tensor(list(timesteps), dtype=torch.float64)
    if (t[1:] >= t[:-1]).any():
        raise ValueError(f"timesteps must be strictly decreasing; got {list(timesteps)}")
    return torch.cat([schedule.t_to_sigma(t), t.new_zeros(1)])


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Elementwise ``sqrt((a - b)^2 + c^2) - c``, averaged (LCM's loss)."""
    return ((a.float() - b.float()).pow(2) + c * c).sqrt().sub(c).mean()


def consistency_distillation_loss(student: Callable[..., torch.Tensor], target: Callable[..., torch.Tensor],
                                  teacher: Callable[..., torch.Tensor], x0: torch.Tensor, schedule: NoiseSchedule, *,
                                  skip: int = 20, huber_c: float = 1e-3, cond: dict | None = None,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One consistency-distillation loss on the clean batch ``x0``.

    ``student`` is trained; ``target`` (EMA of the student) and ``teacher`` (the diffusion model)
    run without gradients. ``skip`` is k in timesteps (LCM: 1000 / 50 = 20).
    """
    T = schedule.num_train_timesteps
    if not 1 <= skip < T:
        raise ValueError(f"skip={skip} must lie in [1, {T - 1}]")
    cond = cond or {}
    b, dev = x0.shape[0], x0.device
    gen_device = generator.device if generator is not None else dev
    t_hi = torch.randint(skip, T, (b,), generator=generator, device=gen_device).to(dev)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(dev)
    sigmas = schedule.sigmas.to(dev)
    sigma_hi, sigma_lo = sigmas[t_hi], sigmas[t_hi - skip]
    x_hi = x0 + append_dims(sigma_hi, x0.ndim).to(x0.dtype) * noise
    with torch.no_grad():
        d = teacher(x_hi, sigma_hi, **cond)
        ratio = append_dims(sigma_lo / sigma_hi, x0.ndim).to(x0.dtype)
        x_lo = d + ratio * (x_hi - d)  # DDIM (eta 0) from t_{n+k} to t_n
        goal = target(x_lo, sigma_lo, **cond)
    return pseudo_huber(student(x_hi, sigma_hi, **cond), goal, huber_c)


@torch.no_grad()
def update_ema(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * param`` in place (the target network's update)."""
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError("EMA and online parameter lists differ in length")
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(params, ema_params)], 1 - decay)
