"""Samplers against diffusers' schedulers, guidance batching, consistency pieces (CPU, small)."""
from __future__ import annotations

import math

import pytest
import torch

from dalle3_fast.diffusion import (DECODER_TIMESTEPS, Denoiser, EDMDenoiser, NoiseSchedule, add_noise,
                                   cfg_model_fn, consistency_distillation_loss, consistency_sigmas, diffusion_loss,
                                   inference_timesteps, initial_noise, predict_eps, predict_x0, sample_consistency,
                                   sample_ddim, sample_dpmpp_2m, sample_euler, sampling_sigmas, update_ema, velocity)

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class LinearNet:
    """An analytic stand-in for a U-Net: a fixed channel mix whose strength depends on t."""

    def __init__(self, channels: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.eye(channels, dtype=torch.float64) * 0.8 + 0.1 * torch.randn(channels, channels, generator=g,
                                                                                      dtype=torch.float64)
        self.calls = 0

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        gain = (1 + 0.3 * t / 1000 + 0.05 * torch.sin(t / 37)).view(-1, 1, 1, 1)
        out = torch.einsum("cd,bdhw->bchw", self.mix, x.double()) * gain
        if context is not None:
            out = out + context.double().mean(1).view(x.shape[0], -1, 1, 1)[:, : x.shape[1]]
        return out.to(x.dtype)


def run_diffusers(scheduler, net, x_vp_or_ve, steps):
    scheduler.set_timesteps(steps)
    x = x_vp_or_ve * scheduler.init_noise_sigma
    xs = []
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x).prev_sample
        xs.append(x)
    return scheduler, xs


def run_ours(sampler, denoiser, x, sigmas):
    xs = []
    out = sampler(denoiser, x, sigmas, callback=lambda i, xi, d, s: xs.append(xi))
    return out, xs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("leading", 20)])
def test_ddim_matches_diffusers(prediction_type, spacing, steps):
    net = LinearNet()
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
                                     set_alpha_to_one=True, clip_sample=False, prediction_type=prediction_type)
    theirs, their_xs = run_diffusers(theirs, net, noise, steps)
    schedule = NoiseSchedule(**SD)
    sigmas = sampling_sigmas(schedule, steps, spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    assert torch.equal(inference_timesteps(steps, spacing=spacing, steps_offset=1 if spacing == "leading" else 0).long(),
                       theirs.timesteps)
    x = noise * math.sqrt(sigmas[0] ** 2 + 1)  # VP N(0, I) seen in VE coordinates
    out, our_xs = run_ours(sample_ddim, Denoiser(net, schedule, prediction_type), x, sigmas)
    assert len(our_xs) == steps == net.calls / 2
    for i, (a, b) in enumerate(zip(our_xs, their_xs)):
        vp = a / math.sqrt(sigmas[i + 1] ** 2 + 1)
        assert rel(vp, b) < 1e-5, f"step {i}"
    assert rel(out, their_xs[-1]) < 1e-5


@pytest.mark.parametrize("spacing,steps", [("trailing", 12), ("linspace", 15), ("leading", 8)])
def test_euler_matches_diffusers(spacing, steps):
    net = LinearNet(seed=1)
    noise = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theirs = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    theirs, their_xs = run_diffusers(theirs, net, noise, steps)
    schedule = NoiseSchedule(**SD)
    sigmas = sampling_sigmas(schedule, steps, spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    assert rel(sigmas, theirs.sigmas) < 1e-6
    x = noise * float(theirs.init_noise_sigma)
    out, our_xs = run_ours(sample_euler, Denoiser(net, schedule), x, sigmas)
    for i, (a, b) in enumerate(zip(our_xs, their_xs)):
        assert rel(a, b) < 1e-5, f"step {i}"


@pytest.mark.parametrize("prediction_type,steps", [("epsilon", 10), ("v_prediction", 25)])
def test_dpmpp_2m_matches_diffusers(prediction_type, steps):
    net = LinearNet(seed=2)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theirs = diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                                   solver_type="midpoint", timestep_spacing="trailing",
                                                   final_sigmas_type="zero", prediction_type=prediction_type)
    theirs, their_xs = run_diffusers(theirs, net, noise, steps)
    schedule = NoiseSchedule(**SD)
    sigmas = sampling_sigmas(schedule, steps, spacing="trailing")
    assert rel(sigmas, theirs.sigmas) < 1e-6
    x = noise * math.sqrt(sigmas[0] ** 2 + 1)
    out, our_xs = run_ours(sample_dpmpp_2m, Denoiser(net, schedule, prediction_type), x, sigmas)
    for i, (a, b) in enumerate(zip(our_xs, their_xs)):
        assert rel(a / math.sqrt(sigmas[i + 1] ** 2 + 1), b) < 1e-5, f"step {i}"


def test_consistency_sampler_matches_consistency_decoder_scheduler():
    net = LinearNet(channels=3, seed=3)
    schedule = NoiseSchedule("cosine", num_train_timesteps=1024)
    from diffusers.schedulers.scheduling_consistency_decoder import ConsistencyDecoderScheduler
    theirs = ConsistencyDecoderScheduler()
    theirs.set_timesteps(2)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    x, gen = noise * theirs.init_noise_sigma, torch.Generator().manual_seed(5)
    for t in theirs.timesteps:
        x = theirs.step(net(theirs.scale_model_input(x, t), t), t, x, generator=gen).prev_sample
    sigmas = consistency_sigmas(schedule)
    assert rel(sigmas[:2], torch.sqrt(1 / theirs.sqrt_alphas_cumprod[list(DECODER_TIMESTEPS)].double() ** 2 - 1)) < 1e-6
    ours = sample_consistency(EDMDenoiser(net, schedule), noise * float(sigmas[0]), sigmas,
                              generator=torch.Generator().manual_seed(5))
    assert rel(ours, x) < 1e-5


def test_schedules_match_diffusers_betas():
    for kind, theirs in [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]:
        ours = NoiseSchedule(kind, beta_start=0.0001, beta_end=0.02)
        ref = diffusers.DDPMScheduler(beta_schedule=theirs, beta_start=0.0001, beta_end=0.02)
        assert rel(ours.alphas_cumprod, ref.alphas_cumprod) < 1e-6, kind


def test_diffusers_scheduler_config_round_trip():
    for kind in ("linear", "scaled_linear", "cosine"):
        ours = NoiseSchedule(kind, 1024, 0.0001, 0.03)
        cfg = ours.to_diffusers_config("v_prediction")
        theirs = diffusers.DDPMScheduler.from_config(cfg)
        assert rel(ours.alphas_cumprod, theirs.alphas_cumprod) < 1e-6 and theirs.config.prediction_type == "v_prediction"
        assert NoiseSchedule.from_diffusers_config(dict(theirs.config)).config() == ours.config()
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_diffusers_config({"beta_schedule": "sigmoid"})


def test_prediction_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    abar = torch.tensor([[0.9], [0.5], [0.01]], dtype=torch.float64)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = velocity(x0, eps, abar)
    for kind, pred in [("epsilon", eps), ("v_prediction", v), ("sample", x0)]:
        assert torch.allclose(predict_x0(pred, x_t, abar, kind), x0)
        assert torch.allclose(predict_eps(pred, x_t, abar, kind), eps)
    schedule = NoiseSchedule()
    t = torch.tensor([0.0, 10.5, 999.0, 500.25], dtype=torch.float64)
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-9)


def test_cfg_one_batched_call_equals_two_calls():
    net, schedule = LinearNet(), NoiseSchedule(**SD)
    den = Denoiser(net, schedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    cond = {"context": torch.randn(2, 7, 4, generator=g, dtype=torch.float64)}
    neg = {"context": torch.randn(2, 5, 4, generator=g, dtype=torch.float64)}  # shorter: gets padded
    sigma = torch.full((2,), 3.0, dtype=torch.float64)
    net.calls = 0
    guided = cfg_model_fn(den, cond, neg, 7.5)(x, sigma)
    assert net.calls == 1
    pad = torch.nn.functional.pad(neg["context"], (0, 0, 0, 2))
    u, c = den(x, sigma, context=pad), den(x, sigma, context=cond["context"])
    assert torch.allclose(guided, u + 7.5 * (c - u), rtol=1e-12, atol=1e-12)
    assert torch.allclose(cfg_model_fn(den, cond, neg, 1.0)(x, sigma), c)
    with pytest.raises(ValueError, match="guidance_scale"):
        cfg_model_fn(den, cond, neg, -1)


def test_seeded_noise_any_size_and_bad_inputs():
    a = initial_noise((1, 4, 3, 5), 14.6, generator=torch.Generator().manual_seed(7))
    b = initial_noise((1, 4, 3, 5), 14.6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (1, 4, 3, 5)
    with pytest.raises(ValueError, match="num_steps"):
        sampling_sigmas(NoiseSchedule(), 0)
    with pytest.raises(ValueError, match="spacing"):
        sampling_sigmas(NoiseSchedule(), 4, spacing="uniform")
    with pytest.raises(ValueError, match="non-increasing"):
        sample_euler(lambda x, s: x, a, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule("sigmoid")


def test_diffusion_loss_zero_for_oracle_and_min_snr():
    schedule = NoiseSchedule(**SD)
    x0 = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kind in ("epsilon", "v_prediction", "sample"):
        def oracle(x_t, t):  # recovers the target exactly from x_t and the known x0
            abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
            eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
            return {"epsilon": eps, "v_prediction": velocity(x0, eps, abar), "sample": x0}[kind]
        assert diffusion_loss(oracle, schedule, x0, prediction_type=kind, min_snr_gamma=5.0) < 1e-20
    loss = diffusion_loss(lambda x_t, t: torch.zeros_like(x_t), schedule, x0, generator=torch.Generator().manual_seed(1))
    assert 0.5 < float(loss) < 1.5  # E[eps^2] = 1
    t = torch.tensor([0, 999])
    assert torch.allclose(add_noise(schedule, x0[:2], torch.zeros_like(x0[:2]), t)[1], x0[1] * schedule.alphas_cumprod[999].sqrt())


def test_consistency_distillation_loss_and_ema():
    schedule = NoiseSchedule("cosine", num_train_timesteps=1024)
    x0 = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    perfect = lambda x, sigma: x0  # noqa: E731 - a teacher and student that already know x0
    assert consistency_distillation_loss(perfect, perfect, perfect, x0, schedule) == 0
    student = torch.nn.Conv2d(3, 3, 1)
    fn = EDMDenoiser(lambda x, t: student(x), schedule)
    loss = consistency_distillation_loss(fn, fn, perfect, x0, schedule, skip=16,
                                         generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert loss > 0 and student.weight.grad.abs().sum() > 0
    ema = [torch.zeros(2), torch.ones(2)]
    update_ema(ema, [torch.ones(2), torch.zeros(2)], 0.95)
    assert torch.allclose(ema[0], torch.full((2,), 0.05)) and torch.allclose(ema[1], torch.full((2,), 0.95))
    with pytest.raises(ValueError, match="skip"):
        consistency_distillation_loss(fn, fn, perfect, x0, schedule, skip=0)
