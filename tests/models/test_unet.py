"""The U-Net against diffusers' UNet2DConditionModel (the oracle): weights load both ways, outputs match."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle3_fast import io, ops
from dalle3_fast.models.unet_config import NAMED_CONFIGS, UNetConfig, unet_config
from dalle3_fast.models.unet import UNet, pooled_text_embeds, size_time_ids

diffusers = pytest.importorskip("diffusers")
UNet2DConditionModel = diffusers.UNet2DConditionModel

# Each: (config, latent (H, W), use a mask). Widths/heads chosen so head widths are 32 or 64.
PARITY_CASES = {
    # SD-1.x style: 1x1 conv projections, transformer depth 1 and 2, a 2:1 latent, padded prompts.
    "conv-proj-depth-1-2": (dict(
        block_out_channels=[32, 64], layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[1, 2],
        transformer_layers_per_block=[2, 1], cross_attention_dim=48, norm_num_groups=8,
        use_linear_projection=False), (48, 24), True),
    # SD-2.x / SDXL style: linear projections, 3 levels, odd latent sizes (13x9 -> 7x5 -> 4x3 and back).
    "linear-proj-odd-size": (dict(
        block_out_channels=[32, 64, 64], layers_per_block=[1, 2, 1],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=1,
        transformer_layers_per_block=[1, 2, 1], cross_attention_dim=40, norm_num_groups=16,
        use_linear_projection=True, flip_sin_to_cos=False, freq_shift=1), (13, 9), False),
    # Modulated GroupNorm, size micro-conditioning, LCM-style timestep_cond, text projection, no mid block.
    "scale-shift-text-time": (dict(
        block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[1, 1], cross_attention_dim=64, encoder_hid_dim=24, norm_num_groups=8,
        resnet_time_scale_shift="scale_shift", addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8, time_cond_proj_dim=16, time_embedding_dim=96,
        conv_in_kernel=1, center_input_sample=True, mid_block_type=None, use_linear_projection=True,
        in_channels=3, out_channels=6), (16, 24), True),
    # SD's mid block with depth 2 and output scale, 4-channel latents at 24x40 (a landscape bucket / 8).
    "mid-block-depth-2": (dict(
        block_out_channels=[32, 64], layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[1, 1],
        transformer_layers_per_block=[1, 2], mid_block_scale_factor=2.0, cross_attention_dim=32,
        norm_num_groups=8, norm_eps=1e-6, downsample_padding=0), (24, 40), True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model, std=0.05):
    # diffusers initialises some projections to zero; random weights everywhere let no layer hide
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def make_inputs(config, hw, batch=2, tokens=7, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
    x = torch.randn(batch, c.in_channels, *hw, generator=g)
    text = torch.randn(batch, tokens, c.text_dim, generator=g)
    t = torch.tensor([3.0, 731.0])[:batch]
    kwargs = {}
    if masked:
        lengths = torch.tensor([tokens, 3])[:batch]
        kwargs["encoder_attention_mask"] = torch.arange(tokens)[None, :] < lengths[:, None]
    if c.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, c.text_dim, generator=g),
                                       "time_ids": size_time_ids(batch, (128, 192), (0, 8), hw)}
    if c.time_cond_proj_dim:
        kwargs["timestep_cond"] = torch.randn(batch, c.time_cond_proj_dim, generator=g)
    return x, t, text, kwargs


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return randomize(UNet.from_config("tiny"))


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_matches_diffusers(name, tmp_path):
    config, hw, masked = PARITY_CASES[name]
    torch.manual_seed(0)
    ref = randomize(UNet2DConditionModel(**config))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = UNet.from_pretrained(tmp_path).eval()
    x, t, text, kwargs = make_inputs(config, hw, masked=masked)
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False, **kwargs)[0]
        got = ours(x, t, text, **kwargs)
        mask = kwargs.pop("encoder_attention_mask", None)
        kv = ours.precompute_text_kv(text, encoder_attention_mask=mask)
        cached = ours(x, t, text_kv=kv, **kwargs)
    assert got.shape == expected.shape
    assert rel(got, expected) < 1e-4
    assert torch.equal(cached, got)


def test_diffusers_loads_what_we_save(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    ref = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, t, text, _ = make_inputs(tiny_unet.config, (8, 16), masked=False)
    lengths = torch.tensor([7, 5])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    with torch.no_grad():
        assert rel(tiny_unet(x, t, text, encoder_lengths=lengths),
                   ref(x, t, text, encoder_attention_mask=mask, return_dict=False)[0]) < 1e-4


def test_save_load_round_trip_and_fp16_variant(tmp_path, tiny_unet):
    x, t, text, _ = make_inputs(tiny_unet.config, (8, 8), masked=False)
    tiny_unet.save_pretrained(tmp_path / "full")
    loaded = UNet.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text), tiny_unet(x, t, text))

    half_dir = tmp_path / "half"
    tiny_unet.save_pretrained(half_dir, variant="fp16")
    (half_dir / "diffusion_pytorch_model.fp16.safetensors").unlink()
    save_file({k: v.half() for k, v in tiny_unet.state_dict().items()},
              str(half_dir / "diffusion_pytorch_model.fp16.safetensors"))
    assert not (half_dir / "diffusion_pytorch_model.safetensors").exists()
    loaded = UNet.from_pretrained(half_dir)  # falls back to the fp16 variant
    assert loaded.dtype == torch.float32
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, tiny_unet.state_dict()[name].half().float()), name


def test_strict_loading_names_the_bad_tensors(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    del state["conv_in.bias"]
    state["mid_block.attentions.0.proj_in.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(io.CheckpointError, match="conv_in.bias") as err:
        UNet.from_pretrained(tmp_path)
    assert "extra.weight" in str(err.value) and "proj_in.weight" in str(err.value)
    with pytest.raises(io.CheckpointError, match="does not exist"):
        UNet.from_pretrained(tmp_path / "nowhere")
    path.unlink()
    with pytest.raises(io.CheckpointError, match="no U-Net weights"):
        UNet.from_pretrained(tmp_path)


def test_precomputed_text_kv_is_identical(tiny_unet):
    x, t, text, _ = make_inputs(tiny_unet.config, (8, 8), masked=False)
    lengths = torch.tensor([7, 2], dtype=torch.int32)
    with torch.no_grad():
        kv = tiny_unet.precompute_text_kv(text, encoder_lengths=lengths)
        for step in (999, 500, 1):
            assert torch.equal(tiny_unet(x, step, text_kv=kv), tiny_unet(x, step, text, encoder_lengths=lengths))


def test_fully_masked_prompt_is_finite_and_ignores_its_tokens(tiny_unet):
    x, t, text, _ = make_inputs(tiny_unet.config, (8, 8), masked=False)
    lengths = torch.tensor([0, 7])
    other = text.clone()
    other[0] = torch.randn_like(other[0]) * 10
    with torch.no_grad():
        a = tiny_unet(x, t, text, encoder_lengths=lengths)
        b = tiny_unet(x, t, other, encoder_lengths=lengths)
        full = tiny_unet(x, t, text)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], full[0])
    torch.testing.assert_close(a[1], full[1], rtol=1e-5, atol=1e-5)


def test_channels_last_gives_the_same_output(tiny_unet):
    x, t, text, _ = make_inputs(tiny_unet.config, (16, 8), masked=False)
    with torch.no_grad():
        expected = tiny_unet(x, t, text)
        cl = UNet.from_config("tiny").eval()
        cl.load_state_dict(tiny_unet.state_dict())
        cl = cl.to(memory_format=torch.channels_last)
        assert cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        got = cl(x.contiguous(memory_format=torch.channels_last), t, text)
    assert rel(got, expected) < 1e-5


def test_every_live_cpu_backend_matches_reference(tiny_unet):
    x, t, text, _ = make_inputs(tiny_unet.config, (8, 8), masked=False)
    lengths = torch.tensor([7, 3])
    with torch.no_grad(), ops.use_backend("reference"):
        expected = tiny_unet(x, t, text, encoder_lengths=lengths)
    with torch.no_grad():
        assert rel(tiny_unet(x, t, text, encoder_lengths=lengths), expected) < 1e-5  # default dispatch
    for backend in set(ops.available_backends()) - {"reference", "cuda", "triton"}:
        with torch.no_grad(), ops.use_backend(backend):
            assert rel(tiny_unet(x, t, text, encoder_lengths=lengths), expected) < 1e-5, backend


def test_backward_and_gradient_checkpointing_agree():
    torch.manual_seed(0)
    model = randomize(UNet.from_config("tiny")).train()
    x, t, text, _ = make_inputs(model.config, (8, 8), masked=False)
    lengths = torch.tensor([7, 4])

    def grads():
        model.zero_grad()
        model(x, t, text, encoder_lengths=lengths).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    for name, g in plain.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7)
    assert plain["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].abs().sum() > 0


@pytest.mark.parametrize("name", list(NAMED_CONFIGS))
def test_named_configs_have_diffusers_parameter_layout(name):
    config = unet_config(name).to_dict()
    with torch.device("meta"):
        ours = UNet.from_config(name)
        ref = UNet2DConditionModel(**config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes


def test_config_fields_are_diffusers_init_arguments_with_its_defaults():
    import inspect

    params = inspect.signature(UNet2DConditionModel.__init__).parameters
    theirs = {name: list(p.default) if isinstance(p.default, tuple) else p.default
              for name, p in params.items() if name != "self"}
    ours = UNetConfig().to_dict()
    assert ours.pop("_class_name") == "UNet2DConditionModel"
    assert ours == theirs


def test_config_instances_and_overrides_build_the_same_model():
    with torch.device("meta"):
        by_name = UNet("tiny", norm_num_groups=16)
        by_config = UNet(unet_config("tiny"), norm_num_groups=16)
        by_dict = UNet({**NAMED_CONFIGS["tiny"], "norm_num_groups": 16})
    assert by_name.config == by_config.config == by_dict.config
    assert by_name.config.norm_num_groups == 16 and by_name.conv_norm_out.num_groups == 16
    with pytest.raises(ValueError, match="not_a_diffusers_field"):
        UNet("tiny", not_a_diffusers_field=1)


def test_public_properties(tiny_unet):
    assert (tiny_unet.in_channels, tiny_unet.out_channels, tiny_unet.text_dim) == (4, 4, 64)
    assert not tiny_unet.size_conditioned
    with torch.device("meta"):
        assert UNet.from_config("dalle3-t5").size_conditioned
        assert UNet.from_config(PARITY_CASES["scale-shift-text-time"][0]).text_dim == 24


def test_text_time_helpers():
    tokens = torch.randn(2, 5, 4)
    pooled = pooled_text_embeds(tokens, torch.tensor([2, 0]))
    torch.testing.assert_close(pooled[0], tokens[0, :2].mean(0))
    assert torch.equal(pooled[1], torch.zeros(4))
    assert size_time_ids(3, (1024, 1792), (0, 0), (1024, 1792)).shape == (3, 6)


@pytest.mark.parametrize("field,value", [
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("act_fn", "gelu"),
    ("num_attention_heads", 2),
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text"),
    ("attention_head_dim", [4, 4]),  # head widths 8 and 16: not a fused-kernel width
    ("norm_num_groups", 12),
    ("only_cross_attention", True),
    ("transformer_layers_per_block", [[1], [1]]),
    ("layers_per_block", [1, 1, 1]),
    ("time_embedding_type", "fourier"),
    ("not_a_diffusers_field", 1),
])
def test_config_outside_the_subset_is_refused_naming_the_field(field, value):
    config = {**NAMED_CONFIGS["tiny"], field: value}
    with pytest.raises(ValueError, match=field):
        UNet.from_config(config)


def test_bad_forward_inputs_are_clear_errors(tiny_unet):
    x, t, text, _ = make_inputs(tiny_unet.config, (8, 8), masked=False)
    with pytest.raises(ValueError, match="sample"):
        tiny_unet(x[:, :3], t, text)
    with pytest.raises(ValueError, match="batch"):
        tiny_unet(x, t, text[:1])
    with pytest.raises(ValueError, match="wide"):
        tiny_unet(x, t, text[..., :32])
    with pytest.raises(ValueError, match="text_kv"):
        tiny_unet(x, t, text, text_kv=tiny_unet.precompute_text_kv(text))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        tiny_unet(x, t)
    with pytest.raises(ValueError, match="timestep"):
        tiny_unet(x, torch.tensor([1, 2, 3]), text)
    with pytest.raises(ValueError, match="unknown U-Net config name"):
        UNet.from_config("sd99")
    text_time = UNet.from_config(PARITY_CASES["scale-shift-text-time"][0])
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        text_time(torch.randn(1, 3, 8, 8), 1, torch.randn(1, 4, 24))


def test_bfloat16_forward_stays_close_to_float32(tiny_unet):
    x, t, text, _ = make_inputs(tiny_unet.config, (8, 8), masked=False)
    lengths = torch.tensor([7, 4])
    low = UNet.from_config("tiny").eval()
    low.load_state_dict(tiny_unet.state_dict())
    low = low.to(torch.bfloat16)
    with torch.no_grad():
        expected = tiny_unet(x, t, text, encoder_lengths=lengths)
        kv = low.precompute_text_kv(text.bfloat16(), encoder_lengths=lengths)
        got = low(x.bfloat16(), t, text_kv=kv)
    assert got.dtype == torch.bfloat16
    assert rel(got.float(), expected) < 2e-2


def test_loads_sharded_diffusers_checkpoints(tmp_path):
    config = unet_config("tiny").to_dict()
    torch.manual_seed(0)
    ref = randomize(UNet2DConditionModel(**config))
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="1MB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = UNet.from_pretrained(tmp_path)
    for name, p in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], p), name


def test_deepcopy_keeps_its_own_cross_attention_layers(tiny_unet):
    import copy

    ema = copy.deepcopy(tiny_unet)
    own = [m for m in ema.modules() if getattr(m, "is_cross_attention", False)]
    assert [id(m) for m in ema._cross_attention_layers] == [id(m) for m in own]
    x, t, text, _ = make_inputs(tiny_unet.config, (8, 8), masked=False)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
        assert torch.equal(ema(x, t, text_kv=ema.precompute_text_kv(text)), ema(x, t, text))
