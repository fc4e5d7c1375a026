"""Wrap a network into the ``model_fn(x, sigma) -> denoised`` every sampler calls.

The samplers work in VE coordinates (``x = x0 + sigma * eps``); networks are trained on VP inputs
at integer timesteps. These wrappers do the conversion, so one network serves every sampler.
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule, append_dims, predict_x0

Net = Callable[..., torch.Tensor]


def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},); got {tuple(sigma.shape)}")
    return sigma


class Denoiser:
    """``net(x_vp, t, **cond)`` predicting epsilon / v / x0 -> ``model_fn(x_ve, sigma, **cond) -> x0``."""

    def __init__(self, net: Net, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type={prediction_type!r} is unknown; use epsilon, v_prediction or sample")
        self.net, self.schedule, self.prediction_type = net, schedule, prediction_type

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = _batch_sigma(sigma, x).to(torch.float64)
        c_in = append_dims(NoiseSchedule.vp_scale(sigma), x.ndim)
        t = self.schedule.sigma_to_t(sigma).to(torch.float32)
        x_vp = x * c_in.to(x.dtype)
        out = self.net(x_vp, t, **cond)
        return predict_x0(out.to(x.dtype), x_vp, (c_in ** 2).to(x.dtype), self.prediction_type)


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in) of Karras et al. in VE coordinates: ``D = c_skip x + c_out F(c_in x)``."""
    denom = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / denom, sigma * sigma_data / denom.sqrt(), denom.rsqrt()


class EDMDenoiser:
    """``net(c_in * x, t, **cond) -> F``; ``D = c_skip * x + c_out * F``.

    The parameterisation of OpenAI's consistency decoder (diffusers' ConsistencyDecoderScheduler:
    cosine schedule, 1024 timesteps, sigma_data 0.5). ``D -> x`` as ``sigma -> 0``, which is the
    boundary condition a consistency function needs, so the same wrapper serves the diffusion
    decoder (teacher) and its distilled 2-step student.
    """

    def __init__(self, net: Net, schedule: NoiseSchedule, sigma_data: float = 0.5):
        self.net, self.schedule, self.sigma_data = net, schedule, sigma_data

    def _scalings(self, sigma: torch.Tensor, x: torch.Tensor):
        return (append_dims(c, x.ndim).to(x.dtype) for c in edm_scalings(sigma, self.sigma_data))

    def network_output(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """``F(c_in * x)`` at the timestep of ``sigma`` (float64 (B,))."""
        _, _, c_in = self._scalings(sigma, x)
        return self.net(x * c_in, self.schedule.sigma_to_t(sigma).to(torch.float32), **cond).to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = _batch_sigma(sigma, x).to(torch.float64)
        c_skip, c_out, _ = self._scalings(sigma, x)
        return c_skip * x + c_out * self.network_output(x, sigma, **cond)

    def training_target(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What ``F`` must output so that ``D == x0``; MSE on it is EDM's lambda-weighted denoising loss."""
        c_skip, c_out, _ = self._scalings(sigma.to(torch.float64), x)
        return (x0 - c_skip * x) / c_out

    def loss(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """EDM's denoising loss at ``x = x0 + sigma * noise``: MSE of ``F`` against :meth:`training_target`."""
        sigma = _batch_sigma(sigma, x0).to(torch.float64)
        x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
        out = self.network_output(x, sigma, **cond)
        return (out.float() - self.training_target(x0, x, sigma).float()).square().mean()
