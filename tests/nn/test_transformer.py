"""nn/transformer.py: the GEGLU feed-forward gives the same values on its inference path as on its autograd path."""
from __future__ import annotations

import pytest
import torch

from dalle3_fast.nn.transformer import GEGLU


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 12), (5, 12)])
def test_geglu_inference_path_matches_the_formula(shape, bias):
    torch.manual_seed(0)
    geglu = GEGLU(12, 10).double()
    if not bias:
        geglu.proj.bias = None
    x = torch.randn(shape, dtype=torch.float64)
    proj = torch.nn.functional.linear(x, geglu.proj.weight, geglu.proj.bias)
    want = proj[..., :10] * torch.nn.functional.gelu(proj[..., 10:])
    with torch.no_grad():
        fast = geglu(x)
    slow = geglu(x.clone().requires_grad_())
    assert fast.shape == want.shape and fast.is_contiguous()
    torch.testing.assert_close(fast, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slow.detach(), want, rtol=1e-12, atol=1e-12)
