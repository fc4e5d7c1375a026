"""The U-Net's speed-ups keep its contract: channels_last weights still give contiguous state dicts (safetensors
writers work), and the stacked QKV projection kept outside autograd follows every change of the weights
(load_state_dict, in-place updates, dtype moves) and trains like three separate projections."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from dalle3_fast import ops
from dalle3_fast.models.unet import UNet
from dalle3_fast.nn.attention import Attention


def _inputs(unet, batch=2, size=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, unet.in_channels, size, size, generator=g), torch.tensor([10.0, 700.0][:batch]),
            torch.randn(batch, tokens, unet.text_dim, generator=g))


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_channels_last_weights_give_contiguous_state_dict(tmp_path):
    unet = UNet("tiny")
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    state = unet.state_dict()
    assert all(v.is_contiguous() for v in state.values())
    save_file(state, str(tmp_path / "w.safetensors"))  # refuses strided tensors
    x, t, text = _inputs(unet)
    with torch.no_grad():
        nchw = UNet("tiny").use_channels_last(False)
        nchw.load_state_dict(state)
        assert rel(unet.eval()(x, t, text), nchw.eval()(x, t, text)) < 1e-5


def test_stacked_qkv_follows_weight_changes():
    torch.manual_seed(0)
    a, b = UNet("tiny").eval(), UNet("tiny").eval()
    x, t, text = _inputs(a)
    with torch.no_grad(), ops.use_backend("reference"):
        a(x, t, text)  # fills the caches with a's weights
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x, t, text), b(x, t, text))
        for m in (a, b):
            for layer in m.modules():
                if isinstance(layer, Attention) and not layer.is_cross_attention:
                    layer.to_k.weight.mul_(1.5)  # in place, as an optimizer step
        assert torch.equal(a(x, t, text), b(x, t, text))
        a64, b64 = a.double(), b.double()
        out = a64(x.double(), t, text.double())
        assert out.dtype == torch.float64 and torch.equal(out, b64(x.double(), t, text.double()))


def test_stacked_qkv_gradients_equal_separate_projections():
    torch.manual_seed(1)
    attn = Attention(64, 2, 32).double()
    x = torch.randn(3, 7, 64, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("reference"):
        out = attn(x)
        q, k, v = (attn._heads(layer(x)) for layer in (attn.to_q, attn.to_k, attn.to_v))
        ref = attn.to_out[0](ops.reference.attention(q, k, v, scale=32 ** -0.5).flatten(-2))
    assert rel(out, ref) < 1e-12
    weights = [attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, x]
    grads = torch.autograd.grad((out * out.detach().cos()).sum(), weights)
    ref_grads = torch.autograd.grad((ref * out.detach().cos()).sum(), weights)
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < 1e-12
