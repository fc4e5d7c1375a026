"""Noise schedules, samplers, guidance and consistency distillation.

Samplers share one signature, ``sample_X(model_fn, x, sigmas, *, generator=None, callback=None)``,
with ``model_fn(x, sigma) -> denoised`` in VE coordinates; see :mod:`.samplers`.
"""
from .consistency import (DECODER_TIMESTEPS, consistency_distillation_loss, consistency_sigmas, decoder_schedule,
                          decoder_timesteps, pseudo_huber, update_ema)
from .denoisers import Denoiser, EDMDenoiser, edm_scalings
from .guidance import cfg_model_fn, concat_conditions
from .latent_decoding import decode_consistency, decode_ddim, decoder_denoiser
from .samplers import (SAMPLERS, get_sampler, noise_list_sampler, sample_consistency, sample_ddim, sample_dpmpp_2m,
                       sample_euler)
from .schedule import BETA_SCHEDULES, NoiseSchedule, append_dims, predict_eps, predict_x0, velocity
from .timesteps import SPACINGS, inference_timesteps, initial_noise, sampling_sigmas
from .training import add_noise, diffusion_loss, min_snr_weights, sample_timesteps

__all__ = [
    "BETA_SCHEDULES", "DECODER_TIMESTEPS", "Denoiser", "EDMDenoiser", "NoiseSchedule", "SAMPLERS", "SPACINGS",
    "add_noise", "append_dims", "cfg_model_fn", "concat_conditions", "consistency_distillation_loss",
    "consistency_sigmas", "decode_consistency", "decode_ddim", "decoder_denoiser", "decoder_schedule",
    "decoder_timesteps", "diffusion_loss", "edm_scalings", "get_sampler", "inference_timesteps", "initial_noise",
    "min_snr_weights", "noise_list_sampler", "predict_eps", "predict_x0", "pseudo_huber", "sample_consistency",
    "sample_ddim", "sample_dpmpp_2m", "sample_euler", "sample_timesteps", "sampling_sigmas", "update_ema", "velocity",
]
