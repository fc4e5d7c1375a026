"""The plain PyTorch references: outside autograd the GroupNorm epilogue runs in place on
group_norm's own output; that must give the same values as the autograd path and never
touch the caller's tensors."""
from __future__ import annotations

import pytest
import torch

from dalle3_fast.ops import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_epilogue_in_place_matches_autograd_path(dtype, modulated, silu, channels_last):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 3, 12, 5, 7
    x = torch.randn(B, C, H, W, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
    mods = {k: torch.randn(B, C, generator=g).to(dtype) for k in ("add", "scale", "shift")} if modulated else {}
    inputs = [x, weight, bias, *mods.values()]
    before = [t.clone() for t in inputs]

    with torch.no_grad():
        fast = reference.group_norm_silu(x, weight, bias, 3, add=mods.get("add"), scale=mods.get("scale"),
                                         shift=mods.get("shift"), silu=silu)
    tracked = [t.clone().requires_grad_(True) for t in inputs]
    x_t, w_t, b_t, *m_t = tracked
    slow = reference.group_norm_silu(x_t, w_t, b_t, 3, **dict(zip(mods, m_t)), silu=silu)
    slow.sum().backward()  # the in-place path is not taken under autograd: backward still works

    assert torch.equal(fast, slow.detach())
    assert fast.dtype == dtype and fast.is_contiguous(memory_format=torch.channels_last) == channels_last
    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0)
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in tracked)
