"""AutoencoderKL against diffusers' AutoencoderKL (random weights, fp32), I/O and config checks."""
import json

import pytest
import torch

from dalle3_fast import io, ops
from dalle3_fast.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, vae_config

diffusers = pytest.importorskip("diffusers")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + torch.randn(p.shape, generator=gen) * 0.05)


def diffusers_vae(block_out_channels, layers_per_block, norm_num_groups, **kw):
    n = len(block_out_channels)
    model = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                                    block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                                    norm_num_groups=norm_num_groups, **kw).eval()
    randomize(model, seed=sum(block_out_channels) + layers_per_block)
    return model


CONFIGS = [
    # (block_out_channels, layers_per_block, norm_num_groups, image H, W)
    ((32, 64), 1, 8, 48, 80),            # mid attention head dim 64: fused attention op
    ((16, 48), 2, 16, 24, 40),           # head dim 48: SDPA fallback
    ((32, 64, 64, 64), 2, 32, 48, 80),   # KL-f8, odd latent aspect (6x10)
]


@pytest.mark.parametrize("channels,layers,groups,H,W", CONFIGS)
def test_matches_diffusers(channels, layers, groups, H, W):
    theirs = diffusers_vae(channels, layers, groups)
    ours = AutoencoderKL(block_out_channels=channels, layers_per_block=layers, norm_num_groups=groups).eval()
    io.load_state_dict_strict(ours, theirs.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, H, W, generator=gen) * 2 - 1
    with torch.no_grad():
        post_ref, post = theirs.encode(x).latent_dist, ours.encode(x)
        assert rel_err(post.mean, post_ref.mean) < 1e-4
        assert rel_err(post.logvar, post_ref.logvar) < 1e-4
        assert rel_err(post.kl(), post_ref.kl()) < 1e-4
        z = post.sample(torch.Generator().manual_seed(3))
        z_ref = post_ref.sample(torch.Generator().manual_seed(3))
        assert rel_err(z, z_ref) < 1e-4
        f = 2 ** (len(channels) - 1)
        assert z.shape == (2, 4, H // f, W // f)
        img_ref, img = theirs.decode(z_ref).sample, ours.decode(z_ref)
    assert img.shape == (2, 3, H, W)
    assert rel_err(img, img_ref) < 1e-4


def test_backends_agree():
    model = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8).eval()
    randomize(model, 5)
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad(), ops.use_backend("reference"):
        ref = model(x)
    for backend in ops.available_backends():
        with torch.no_grad(), ops.use_backend(backend):
            assert rel_err(model(x), ref) < 1e-5, backend


def test_save_load_round_trip_and_diffusers_reads_ours(tmp_path):
    ours = AutoencoderKL("tiny", scaling_factor=0.5, shift_factor=0.1).eval()
    randomize(ours, 7)
    ours.save_pretrained(tmp_path / "vae")
    again = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert again.config.scaling_factor == 0.5 and again.shift_factor == 0.1
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    z = torch.randn(1, 4, 4, 6)
    with torch.no_grad():
        assert rel_err(ours.decode(z), theirs.decode(z).sample) < 1e-4
    assert ours.unscale_latents(ours.scale_latents(z)).sub(z).abs().max() < 1e-6


def test_reads_diffusers_directory_and_legacy_attention_names(tmp_path):
    theirs = diffusers_vae((32, 64), 1, 8, scaling_factor=0.13025)
    theirs.save_pretrained(tmp_path / "d")
    ours = AutoencoderKL.from_pretrained(tmp_path / "d")
    assert ours.scaling_factor == 0.13025
    # Pre-0.14 diffusers checkpoints: query/key/value/proj_attn.
    state = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
             for k, v in theirs.state_dict().items()}
    io.atomic_save_safetensors(state, tmp_path / "d" / io.DIFFUSERS_WEIGHTS)
    legacy = AutoencoderKL.from_pretrained(tmp_path / "d")
    assert torch.equal(legacy.encoder.mid_block.attentions[0].to_q.weight,
                       theirs.encoder.mid_block.attentions[0].to_q.weight)
    theirs.half().save_pretrained(tmp_path / "h", variant="fp16")
    half = AutoencoderKL.from_pretrained(tmp_path / "h", variant="fp16", dtype=torch.float16)
    assert half.decoder.conv_out.weight.dtype == torch.float16
    assert torch.equal(half.decoder.conv_out.weight, theirs.decoder.conv_out.weight)


def test_strict_loading_names_bad_tensors(tmp_path):
    AutoencoderKL("tiny").save_pretrained(tmp_path / "v")
    path = tmp_path / "v" / io.DIFFUSERS_WEIGHTS
    state = io.load_safetensors(path)
    state.pop("decoder.conv_out.bias")
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:1]
    io.atomic_save_safetensors(state, path)
    with pytest.raises(io.CheckpointError) as excinfo:
        AutoencoderKL.from_pretrained(tmp_path / "v")
    assert "missing: decoder.conv_out.bias" in str(excinfo.value)
    assert "mis-shaped: encoder.conv_in.weight" in str(excinfo.value)


def test_unsupported_config_fields_are_named(tmp_path):
    cfg = AutoencoderKLConfig().to_dict()
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        AutoencoderKLConfig.from_dict({**cfg, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="unknown fields frobnicate"):
        AutoencoderKLConfig.from_dict({**cfg, "frobnicate": 1})
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKLConfig.from_dict({**cfg, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="_class_name"):
        AutoencoderKLConfig.from_dict({**cfg, "_class_name": "AutoencoderTiny"})
    with pytest.raises(ValueError, match="unknown VAE config"):
        vae_config("huge")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "config.json").write_text(json.dumps({**cfg, "use_tiling": True}))
    with pytest.raises(ValueError, match="use_tiling"):
        AutoencoderKL.from_pretrained(tmp_path / "v")


def test_input_errors():
    model = AutoencoderKL("tiny")
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode(torch.randn(1, 3, 20, 24))
    with pytest.raises(ValueError, match=r"`z` must be \(B, 4, H, W\)"):
        model.decode(torch.randn(1, 3, 4, 4))


def test_named_configs_and_posterior():
    assert vae_config("sd").scaling_factor == 0.18215 and vae_config("sdxl").scaling_factor == 0.13025
    assert vae_config("tiny").downsample_factor == 8
    params = torch.randn(2, 8, 3, 5)
    params[:, 4:] = 100.0
    post = DiagonalGaussian(params)
    assert post.logvar.max() == 20.0
    noise = torch.randn(2, 4, 3, 5)
    assert torch.allclose(post.sample(noise=noise), post.mean + post.std * noise)
    assert torch.equal(post.mode(), params[:, :4])
    assert torch.allclose(post.kl(post), torch.zeros(2), atol=1e-3)


def test_bf16_and_channels_last_follow_fp32():
    model = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8).eval()
    randomize(model, 11)
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    twin = AutoencoderKL(model.config).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        twin = twin.to(memory_format=torch.channels_last)
        assert rel_err(twin(x.to(memory_format=torch.channels_last)), ref) < 1e-5
        out = twin.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 3e-2


def test_widen_latent_channels_reconstructs_as_before_and_trains_the_new_channels():
    from dalle3_fast.models.vae import widen_latent_channels

    torch.manual_seed(3)
    vae = AutoencoderKL(vae_config("tiny")).eval()
    for p in vae.parameters():  # a trained-looking VAE: no zero biases
        p.data.add_(0.05 * torch.randn_like(p))
    wide = widen_latent_channels(vae, 16)
    assert wide.config.latent_channels == 16 and vae.config.latent_channels == 4
    x = torch.rand(3, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        old, new = vae.encode(x), wide.encode(x)
        torch.testing.assert_close(new.mode()[:, :4], old.mode(), rtol=0, atol=1e-6)
        torch.testing.assert_close(new.logvar[:, :4], old.logvar, rtol=0, atol=1e-6)
        assert new.mode()[:, 4:].abs().mean() > 1e-3  # the new channels carry something from the start
        torch.testing.assert_close(wide.decode(new.mode()), vae.decode(old.mode()), rtol=0, atol=1e-5)
    wide.train()
    (wide.decode(wide.encode(x).mode()) - x).square().mean().backward()
    assert wide.decoder.conv_in.weight.grad[:, 4:].abs().sum() > 0  # the decoder can learn to read them
    with pytest.raises(ValueError, match="narrow"):
        widen_latent_channels(wide, 8)
