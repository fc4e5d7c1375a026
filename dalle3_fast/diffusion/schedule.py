"""The discrete DDPM noise schedule shared by training and every sampler.

Training uses the variance-preserving (VP) form of diffusers:
``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps``.
Samplers work in k-diffusion's variance-exploding (VE) form, ``x = x0 + sigma * eps`` with
``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``; the two are related by
``x_ve = x_vp / sqrt(alpha_bar_t) = x_vp * sqrt(sigma_t**2 + 1)``.

The schedule is held in float64; callers cast where they use it. ``precision="float32"`` computes it
the way diffusers' ConsistencyDecoderScheduler does (float32 betas and cumprod, ``sigma = sqrt(1/abar - 1)``
in float32), so the latent decoder's coefficients equal diffusers' tables to float32 rounding.
"""
from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PRECISIONS = ("float64", "float32")
_DIFFUSERS_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


class NoiseSchedule:
    """``num_train_timesteps`` DDPM betas and everything derived from them.

    ``beta_schedule``: ``"linear"`` (DDPM), ``"scaled_linear"`` (Stable Diffusion: linear in
    sqrt(beta)), or ``"cosine"`` (Nichol & Dhariwal, diffusers' ``squaredcos_cap_v2``, betas
    capped at ``max_beta``; the consistency decoder's schedule with 1024 timesteps).
    ``precision``: ``"float64"``, or ``"float32"`` for diffusers' float32 arithmetic (see the module doc).
    """

    def __init__(self, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, max_beta: float = 0.999,
                 precision: str = "float64"):
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={beta_schedule!r} is unknown; use one of {', '.join(BETA_SCHEDULES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={num_train_timesteps} must be at least 2")
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start, self.beta_end, self.max_beta = beta_start, beta_end, max_beta
        self.precision = precision
        T = self.num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        else:
            def alpha_bar(s: float) -> float:
                return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                                 dtype=torch.float64)
        if precision == "float32":
            abar = torch.cumprod(1.0 - betas.float(), dim=0)
            self.betas, self.alphas_cumprod = betas.float().double(), abar.double()
            self.sigmas = (1.0 / abar - 1).sqrt().double()
        else:
            self.betas = betas
            self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
            self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def config(self) -> dict:
        config = {"beta_schedule": self.beta_schedule, "num_train_timesteps": self.num_train_timesteps,
                  "beta_start": self.beta_start, "beta_end": self.beta_end, "max_beta": self.max_beta}
        if self.precision != "float64":
            config["precision"] = self.precision
        return config

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        return cls(**config)

    def to_diffusers_config(self, prediction_type: str = "epsilon") -> dict:
        """diffusers' ``scheduler_config.json`` fields (read by DDPM/DDIM/Euler/DPM-Solver schedulers)."""
        return {"_class_name": "DDPMScheduler", "num_train_timesteps": self.num_train_timesteps,
                "beta_schedule": _DIFFUSERS_NAMES[self.beta_schedule], "beta_start": self.beta_start,
                "beta_end": self.beta_end, "prediction_type": prediction_type, "clip_sample": False}

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "NoiseSchedule":
        """Read a diffusers ``scheduler_config.json`` dict (SD's, or one ``to_diffusers_config`` wrote)."""
        names = {v: k for k, v in _DIFFUSERS_NAMES.items()}
        kind = config.get("beta_schedule", "linear")
        if kind not in names:
            raise ValueError(f"scheduler config: beta_schedule={kind!r} is not supported; use one of "
                             f"{', '.join(names)}")
        if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config: trained_betas and rescale_betas_zero_snr are not supported")
        return cls(names[kind], int(config.get("num_train_timesteps", 1000)), float(config.get("beta_start", 0.0001)),
                   float(config.get("beta_end", 0.02)))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # -- timestep <-> sigma ------------------------------------------------------------------
    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at (possibly fractional) timesteps, linear in t between integers as diffusers interpolates."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if ((t < 0) | (t > self.num_train_timesteps - 1)).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]; got {t.tolist()}")
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        return self.sigmas[lo] * (1 - w) + self.sigmas[lo + 1] * w

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`t_to_sigma` (float timesteps, same device and dtype as ``sigma``)."""
        sigmas = self.sigmas.to(sigma.device)
        s = sigma.to(torch.float64).clamp(sigmas[0], sigmas[-1])
        hi = torch.searchsorted(sigmas, s).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        w = (s - sigmas[lo]) / (sigmas[hi] - sigmas[lo])
        return (lo.to(torch.float64) + w).to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    # -- VP <-> VE ---------------------------------------------------------------------------
    @staticmethod
    def vp_scale(sigma: torch.Tensor) -> torch.Tensor:
        """``sqrt(alpha_bar) = 1 / sqrt(sigma**2 + 1)``: multiply a VE sample by it to get the VP sample."""
        return (sigma ** 2 + 1).rsqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at integer timesteps."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

    def __repr__(self) -> str:
        return (f"NoiseSchedule({self.beta_schedule!r}, num_train_timesteps={self.num_train_timesteps}, "
                f"sigma {self.sigma_min:.4g}..{self.sigma_max:.4g})")


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """View ``x`` (B,) as (B, 1, ..., 1) with ``ndim`` dimensions, to broadcast against a sample."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def predict_x0(prediction: torch.Tensor, x_vp: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Clean-sample estimate from a network output at VP sample ``x_vp``; ``alpha_bar`` broadcasts."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (x_vp - s * prediction) / a
    if prediction_type == "v_prediction":
        return a * x_vp - s * prediction
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"prediction_type={prediction_type!r} is unknown; use epsilon, v_prediction or sample")


def predict_eps(prediction: torch.Tensor, x_vp: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        return s * x_vp + a * prediction
    if prediction_type == "sample":
        return (x_vp - a * prediction) / s
    raise ValueError(f"prediction_type={prediction_type!r} is unknown; use epsilon, v_prediction or sample")


def velocity(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``sqrt(abar) * eps - sqrt(1 - abar) * x0``."""
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
