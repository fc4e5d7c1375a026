"""ResnetBlock2D / Downsample2D / Upsample2D against diffusers (weights copied, fp32)."""
import pytest
import torch

from dalle3_fast import ops
from dalle3_fast.nn.resnet import ResnetBlock2D
from dalle3_fast.nn.sampling import Downsample2D, Upsample2D

diffusers_resnet = pytest.importorskip("diffusers.models.resnet")
from diffusers.models.downsampling import Downsample2D as DDownsample2D  # noqa: E402
from diffusers.models.upsampling import Upsample2D as DUpsample2D  # noqa: E402


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


CONFIGS = [
    dict(in_channels=16, out_channels=16, temb_channels=24, groups=8, eps=1e-6),
    dict(in_channels=16, out_channels=32, temb_channels=24, groups=8, eps=1e-5, time_embedding_norm="scale_shift"),
    dict(in_channels=32, out_channels=16, temb_channels=None, groups=4, groups_out=8, output_scale_factor=2.0),
    dict(in_channels=16, out_channels=16, temb_channels=24, groups=8, up=True, skip_time_act=True),
    dict(in_channels=16, out_channels=32, temb_channels=24, groups=8, down=True, time_embedding_norm="scale_shift"),
    dict(in_channels=16, out_channels=16, temb_channels=24, groups=8, use_in_shortcut=True, conv_shortcut_bias=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "eps"))
def test_resnet_block_matches_diffusers(cfg):
    gen = torch.Generator().manual_seed(0)
    theirs = diffusers_resnet.ResnetBlock2D(**cfg).eval()
    randomize(theirs, gen)
    ours = ResnetBlock2D(**cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, cfg["in_channels"], 10, 14, generator=gen)
    temb = None if cfg["temb_channels"] is None else torch.randn(2, cfg["temb_channels"], generator=gen)
    with torch.no_grad():
        ref = theirs(x, temb)
        out = ours(x, temb)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


def test_resnet_block_backends_agree_and_backprop():
    gen = torch.Generator().manual_seed(1)
    block = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=8, groups=8,
                          time_embedding_norm="scale_shift")
    randomize(block, gen)
    x = torch.randn(2, 16, 6, 10, generator=gen, requires_grad=True)
    temb = torch.randn(2, 8, generator=gen)
    with ops.use_backend("reference"):
        ref = block(x, temb)
        (gref,) = torch.autograd.grad(ref.square().sum(), x)
    for backend in ops.available_backends():
        with ops.use_backend(backend):
            out = block(x, temb)
            (g,) = torch.autograd.grad(out.square().sum(), x)
        assert rel_err(out, ref) < 1e-5, backend
        assert rel_err(g, gref) < 1e-4, backend


def test_resnet_block_errors():
    with pytest.raises(ValueError, match="time_embedding_norm"):
        ResnetBlock2D(in_channels=8, groups=4, time_embedding_norm="ada_group")
    with pytest.raises(ValueError, match="non_linearity"):
        ResnetBlock2D(in_channels=8, groups=4, non_linearity="gelu")
    with pytest.raises(ValueError, match="groups"):
        ResnetBlock2D(in_channels=12, groups=8)
    block = ResnetBlock2D(in_channels=8, groups=4, temb_channels=4, time_embedding_norm="scale_shift")
    with pytest.raises(ValueError, match="temb"):
        block(torch.randn(1, 8, 4, 4), None)


def test_conv_shortcut_option_is_3x3():
    block = ResnetBlock2D(in_channels=8, out_channels=16, groups=4, temb_channels=None, conv_shortcut=True)
    assert block.conv_shortcut.kernel_size == (3, 3)
    assert block(torch.randn(1, 8, 5, 7)).shape == (1, 16, 5, 7)


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample_conv_matches_diffusers(padding):
    gen = torch.Generator().manual_seed(2)
    theirs = DDownsample2D(8, use_conv=True, out_channels=12, padding=padding, name="op")
    randomize(theirs, gen)
    ours = Downsample2D(8, use_conv=True, out_channels=12, padding=padding)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 8, 11, 14, generator=gen)
    ref, out = theirs(x), ours(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-6


def test_downsample_avgpool_and_upsample_match_diffusers():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 6, 10, generator=gen)
    assert torch.equal(Downsample2D(8)(x), DDownsample2D(8, name="op")(x))
    theirs = DUpsample2D(8, use_conv=True, out_channels=4)
    randomize(theirs, gen)
    ours = Upsample2D(8, use_conv=True, out_channels=4)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert rel_err(ours(x), theirs(x)) < 1e-6
    odd = ours(x, output_size=(13, 21))
    assert odd.shape == (2, 4, 13, 21)
    assert rel_err(odd, theirs(x, output_size=(13, 21))) < 1e-6
    assert torch.equal(Upsample2D(8)(x), DUpsample2D(8)(x))
