"""LatentDecoder against diffusers' ConsistencyDecoderVAE (random weights, fixed noise), samplers, I/O."""
import json

import pytest
import torch

from dalle3_fast import io, ops
from dalle3_fast.diffusion import (add_noise, decode_consistency, decode_ddim, decoder_denoiser, decoder_schedule,
                                   decoder_timesteps, edm_scalings, inference_timesteps)
from dalle3_fast.models.latent_decoder import (LatentDecoder, LatentDecoderConfig, count_parameters,
                                               latent_decoder_config)

diffusers = pytest.importorskip("diffusers")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def config_kwargs(enc, dec, layers, groups, enc_groups=8):
    return dict(encoder_block_out_channels=enc, encoder_norm_num_groups=enc_groups, encoder_layers_per_block=1,
                decoder_block_out_channels=dec, decoder_layers_per_block=layers, decoder_norm_num_groups=groups)


def diffusers_decoder(kw, seed=0):
    n_enc, n_dec = len(kw["encoder_block_out_channels"]), len(kw["decoder_block_out_channels"])
    model = diffusers.ConsistencyDecoderVAE(
        encoder_down_block_types=["DownEncoderBlock2D"] * n_enc,
        decoder_down_block_types=["ResnetDownsampleBlock2D"] * n_dec,
        decoder_up_block_types=["ResnetUpsampleBlock2D"] * n_dec, **kw).eval()
    randomize(model, seed)
    return model


CONFIGS = [
    # (encoder channels -> latent upsample factor, decoder channels, layers per block, groups, latent h, w)
    ((32, 64), (32, 64), 1, 8, 5, 7),
    ((16, 16, 32, 32), (32, 32, 64, 64), 2, 8, 2, 3),  # KL-f8: 16x24 images
    ((32, 64), (32, 64), 3, 32, 4, 6),
]


@pytest.mark.parametrize("enc,dec,layers,groups,h,w", CONFIGS)
def test_decode_matches_diffusers(enc, dec, layers, groups, h, w):
    kw = config_kwargs(enc, dec, layers, groups)
    theirs = diffusers_decoder(kw, seed=layers)
    ours = LatentDecoder(**kw).eval()
    io.load_state_dict_strict(ours, theirs.state_dict())
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs.decode(z, generator=torch.Generator().manual_seed(7)).sample
    out = decode_consistency(ours, z, generator=torch.Generator().manual_seed(7))
    f = ours.config.latent_upsample_factor
    assert out.shape == ref.shape == (2, 3, h * f, w * f)
    assert rel_err(out, ref) < 1e-4
    other = decode_consistency(ours, z, generator=torch.Generator().manual_seed(8))
    assert rel_err(other, ref) > 1e-3  # the noise matters: the comparison above is not vacuous


def test_encode_matches_diffusers():
    kw = config_kwargs((32, 64), (32, 64), 1, 8)
    theirs = diffusers_decoder(kw)
    ours = LatentDecoder(**kw).eval()
    io.load_state_dict_strict(ours, theirs.state_dict())
    x = torch.rand(1, 3, 12, 20) * 2 - 1
    with torch.no_grad():
        ref = theirs.encode(x).latent_dist
        post = ours.encode(x)
    assert rel_err(post.mean, ref.mean) < 1e-4 and rel_err(post.logvar, ref.logvar) < 1e-4


def small_decoder(**overrides):
    model = LatentDecoder(**{**config_kwargs((32, 64), (32, 64), 1, 8), "with_encoder": False, **overrides}).eval()
    randomize(model, 3)
    return model


def test_explicit_noise_and_step_pieces_reproduce_decode():
    model = small_decoder()
    z = torch.randn(2, 4, 3, 5)
    gen = torch.Generator().manual_seed(4)
    noise = [torch.randn(2, 3, 6, 10, generator=gen) for _ in range(2)]
    out = decode_consistency(model, z, generator=torch.Generator().manual_seed(4))
    assert torch.equal(decode_consistency(model, z, noise=noise), out)
    assert torch.equal(decode_consistency(model, z, noise=torch.stack(noise)), out)
    with torch.no_grad():  # the steps by hand: the shared schedule's sigmas, EDM scalings and the network
        cond = model.condition(z)
        sigmas = decoder_schedule().sigmas[list(decoder_timesteps(2))].float()
        x = noise[0] * sigmas[0]
        x = decoder_denoiser(model)(x, sigmas[0], cond=cond) + sigmas[1] * noise[1]
        c_skip, c_out, c_in = (c.float() for c in edm_scalings(sigmas[1].double()))
        manual = c_skip * x + c_out * model(c_in * x, 512, cond)
    assert rel_err(manual, out) < 1e-6
    assert decoder_timesteps(2) == (1008, 512)


def test_schedule_matches_diffusers_scheduler():
    from diffusers.schedulers.scheduling_consistency_decoder import ConsistencyDecoderScheduler

    sched = ConsistencyDecoderScheduler()
    model = small_decoder()
    schedule = decoder_schedule(model.num_train_timesteps)
    abar = schedule.alphas_cumprod
    c_skip, c_out, c_in = edm_scalings(schedule.sigmas, model.sigma_data)
    ours = {"c_skip": c_skip / abar.sqrt(), "c_out": c_out, "c_in": c_in / abar.sqrt(),  # VE -> diffusers' VP form
            "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt()}
    for name, table in ours.items():
        assert torch.allclose(table.float(), getattr(sched, name), rtol=1e-6, atol=0), name
    x = torch.randn(3, 3, 4, 4)
    t = torch.tensor([5, 512, 1008])
    assert torch.allclose(add_noise(schedule, torch.zeros_like(x), x, t),
                          sched.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * x)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_teacher_matches_diffusers_ddim(eta):
    # float64: at t=1023 of the cosine schedule 1 - alpha_prev - sigma^2 is ~1e-8, which float32 rounds
    # below zero inside diffusers' step (NaN from the square root)
    model = small_decoder().double()
    z = torch.randn(1, 4, 3, 5, dtype=torch.float64)
    steps = 4
    gen = torch.Generator().manual_seed(9)
    noises = [torch.randn(1, 3, 6, 10, generator=gen, dtype=torch.float64) for _ in range(steps)]
    out = decode_ddim(model, z, num_inference_steps=steps, eta=eta, noise=noises if eta else noises[:1])
    ddim = diffusers.DDIMScheduler(num_train_timesteps=1024, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                   set_alpha_to_one=True, prediction_type="sample", timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    ddim.alphas_cumprod = ddim.alphas_cumprod.double()
    assert ddim.timesteps.tolist() == inference_timesteps(steps, 1024).long().tolist()
    schedule, denoiser = decoder_schedule(), decoder_denoiser(model)
    with torch.no_grad():
        cond = model.condition(z)
        x = (1 - schedule.alphas_cumprod[ddim.timesteps[0]]).sqrt() * noises[0]
        for i, t in enumerate(ddim.timesteps):
            abar = schedule.alphas_cumprod[int(t)]
            x0 = denoiser(x / abar.sqrt(), schedule.sigmas[int(t)], cond=cond)  # VP sample -> VE -> x0
            vn = noises[i + 1] if eta and i + 1 < steps else torch.zeros_like(x)
            x = ddim.step(x0, t, x, eta=eta, variance_noise=vn).prev_sample
    assert rel_err(out, x) < 1e-4


def test_backends_agree():
    model = small_decoder()
    z = torch.randn(1, 4, 2, 3)
    with ops.use_backend("reference"):
        ref = decode_consistency(model, z, generator=torch.Generator().manual_seed(0))
    for backend in ops.available_backends():
        with ops.use_backend(backend):
            out = decode_consistency(model, z, generator=torch.Generator().manual_seed(0))
            assert rel_err(out, ref) < 1e-5, backend


def test_gradients_flow_through_predict_x0():
    model = small_decoder()
    model.decoder_unet.gradient_checkpointing = True
    cond = model.condition(torch.randn(2, 4, 2, 3))
    x0 = torch.rand(2, 3, 4, 6) * 2 - 1
    sigma = decoder_schedule().sigmas[torch.tensor([100, 900])]
    x = x0 + sigma.view(-1, 1, 1, 1).float() * torch.randn_like(x0)
    loss = (decoder_denoiser(model)(x, sigma, cond=cond) - x0).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_round_trips_with_diffusers(tmp_path):
    kw = config_kwargs((32, 64), (32, 64), 1, 8)
    theirs = diffusers_decoder(kw)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = LatentDecoder.from_pretrained(tmp_path / "theirs")
    z = torch.randn(1, 4, 2, 3)
    assert torch.equal(decode_consistency(ours, z, generator=torch.Generator().manual_seed(0)),
                       decode_consistency(LatentDecoder.from_pretrained(tmp_path / "theirs"), z,
                                          generator=torch.Generator().manual_seed(0)))
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.ConsistencyDecoderVAE.from_pretrained(tmp_path / "ours").eval()
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # A decoder-only directory of our own.
    small = small_decoder(sigma_data=0.4)
    small.save_pretrained(tmp_path / "small")
    again = LatentDecoder.from_pretrained(tmp_path / "small")
    assert again.encoder is None and again.sigma_data == 0.4
    assert torch.equal(decode_consistency(again, z, generator=torch.Generator().manual_seed(1)),
                       decode_consistency(small, z, generator=torch.Generator().manual_seed(1)))


def test_config_and_input_errors(tmp_path):
    cfg = LatentDecoderConfig().to_dict()
    with pytest.raises(ValueError, match="decoder_add_attention=True"):
        LatentDecoderConfig.from_dict({**cfg, "decoder_add_attention": True})
    with pytest.raises(ValueError, match="decoder_time_embedding_type='positional'"):
        LatentDecoderConfig.from_dict({**cfg, "decoder_time_embedding_type": "positional"})
    with pytest.raises(ValueError, match="unknown fields mystery"):
        LatentDecoderConfig.from_dict({**cfg, "mystery": 1})
    with pytest.raises(ValueError, match="decoder_in_channels"):
        LatentDecoderConfig(decoder_in_channels=6)
    with pytest.raises(ValueError, match="unknown latent decoder config"):
        latent_decoder_config("huge")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({**cfg, "decoder_up_block_types": ["UpBlock2D"] * 4}))
    with pytest.raises(ValueError, match="decoder_up_block_types"):
        LatentDecoder.from_pretrained(tmp_path / "d")
    model = small_decoder()
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
        decode_consistency(model, torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="`noise` must hold 2 tensors"):
        decode_consistency(model, torch.randn(1, 4, 2, 2), noise=[torch.randn(1, 3, 4, 4)])
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        decode_consistency(model, torch.randn(1, 4, 2, 2), num_inference_steps=3)
    with pytest.raises(ValueError, match="outside"):
        model(torch.randn(1, 3, 4, 4), 1024, model.condition(torch.randn(1, 4, 2, 2)))
    with pytest.raises(ValueError, match="without an encoder"):
        model.encode(torch.randn(1, 3, 4, 4))


def test_named_configs():
    tiny = LatentDecoder("tiny")
    assert tiny.config.latent_upsample_factor == 8 and tiny.encoder is None
    assert count_parameters(tiny) < 3_000_000
    assert latent_decoder_config("openai").decoder_block_out_channels == (320, 640, 1024, 1024)


def test_bf16_and_channels_last_follow_fp32():
    model = small_decoder()
    z = torch.randn(2, 4, 3, 5)
    noise = torch.randn(2, 2, 3, 6, 10)
    ref = decode_consistency(model, z, noise=noise)
    twin = LatentDecoder(model.config).eval()
    twin.load_state_dict(model.state_dict())
    twin = twin.to(memory_format=torch.channels_last)
    assert rel_err(decode_consistency(twin, z, noise=noise), ref) < 1e-5
    twin = twin.to(torch.bfloat16)
    out = decode_consistency(twin, z.bfloat16(), noise=noise)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 3e-2


def test_unet_exports_with_torch_export():
    unet = small_decoder().decoder_unet
    x, t = torch.randn(1, 7, 8, 12), torch.tensor([512])
    program = torch.export.export(unet, (x, t))
    with torch.no_grad():
        assert rel_err(program.module()(x, t), unet(x, t)) < 1e-6
