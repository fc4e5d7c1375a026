"""cross_attention ignores what the padding holds: keys/values past a sample's length that are
NaN or inf change nothing, forward or backward, on every live backend (reference included)."""
from __future__ import annotations

import pytest
import torch

import dalle3_fast.ops as ops
from conftest import backend_device

# (B, N, L, H, D, key lengths): a full sample, a padded one and one with no keys at all.
CASES = [
    (3, 11, 9, 2, 32, [9, 4, 0]),
    (2, 7, 20, 1, 40, [1, 13]),
]


@pytest.fixture(params=ops.BACKENDS)
def any_backend(request):
    name = request.param
    if name not in ops.available_backends():
        pytest.skip(f"backend {name!r} is not live")
    return name


def poison_padding(t: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """t with every position at or past its sample's length set to NaN, +inf or -inf."""
    t = t.clone()
    for b, n in enumerate(lengths):
        pad = t[b, n:]
        junk = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=t.dtype, device=t.device)
        pad.copy_(junk[torch.arange(pad.numel(), device=t.device) % 3].view_as(pad))
    return t


def run(q, k, v, key_lengths, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ops.cross_attention(*leaves, key_lengths)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("case", CASES, ids=[str(c[-1]) for c in CASES])
def test_padding_contents_change_nothing(any_backend, case):
    B, N, L, H, D, lengths = case
    device = backend_device(any_backend)
    q = torch.randn(B, N, H, D, device=device)
    k = torch.randn(B, L, H, D, device=device)
    v = torch.randn(B, L, H, D, device=device)
    grad_out = torch.randn(B, N, H, D, device=device)
    key_lengths = torch.tensor(lengths, dtype=torch.int32, device=device)
    with ops.use_backend(any_backend):
        out, grads = run(q, k, v, key_lengths, grad_out)
        out_p, grads_p = run(q, poison_padding(k, lengths), poison_padding(v, lengths), key_lengths, grad_out)
    assert torch.isfinite(out_p).all(), f"{any_backend}: NaN/inf in the padding reached the output"
    assert torch.equal(out_p, out), f"{any_backend}: the output depends on what the padding holds"
    for name, g, g_p in zip("qkv", grads, grads_p):
        assert torch.isfinite(g_p).all(), f"{any_backend}: NaN/inf in the padding reached d{name}"
        assert torch.equal(g_p, g), f"{any_backend}: d{name} depends on what the padding holds"
    for b, n in enumerate(lengths):
        for name, g in (("k", grads_p[1]), ("v", grads_p[2])):
            assert (g[b, n:] == 0).all(), f"{any_backend}: d{name} of padded keys of sample {b} is not 0"
