"""The CPU dispatcher routes each op/shape class to the path cpu_policy decided, from the
recorded measurements, and both paths give the same results.

Speed is not asserted here (benchmarks/run.py measures it); this checks the routing
against the measurement table shipped next to the policy and the numerics of both paths.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dalle3_fast.ops as ops
from dalle3_fast import _native
from dalle3_fast.ops import cpu_policy, dispatch, reference

MEASUREMENTS = Path(cpu_policy.__file__).with_name("cpu_policy_measurements.json")
CPU = torch.device("cpu")

needs_cpu_kernels = pytest.mark.skipif(not _native.has_cpu_kernels(),
                                       reason=f"CPU kernels not built: {_native.why_not('cpu')}")


def _rows():
    return json.loads(MEASUREMENTS.read_text())["rows"]


def _decision(row) -> bool:
    return cpu_policy.row_prefers_kernel(row)


def test_measurements_cover_every_op_dtype_and_thread_count():
    rows = _rows()
    assert {r["op"] for r in rows} == {"group_norm_silu", "attention", "cross_attention"}
    assert {r["dtype"] for r in rows} >= {"float32", "bfloat16"}
    assert {r["threads"] for r in rows} >= {1, 2}
    assert {r["layout"] for r in rows if r["op"] == "group_norm_silu"} == {"nchw", "channels_last"}
    for r in rows:
        assert r["cpu_ms"] > 0 and r["reference_ms"] > 0, r


def test_policy_takes_the_faster_path_wherever_the_measurement_is_clear_cut():
    """Every row where one path was >= 25 % faster (beyond this shared machine's noise) takes that path."""
    wrong = []
    for r in _rows():
        if r.get("clock_limited"):
            continue
        ratio = r["reference_ms"] / r["cpu_ms"]  # > 1: our kernel is faster
        if ratio >= 1.25 and not _decision(r) or ratio <= 1 / 1.25 and _decision(r):
            wrong.append(f"{r['op']} {r['shape']} {r['dtype']} {r['threads']}t: kernel/peer speed {ratio:.2f}, "
                         f"policy says {'kernel' if _decision(r) else 'peer'}")
    assert not wrong, "policy disagrees with its measurements:\n" + "\n".join(wrong)


def test_policy_matches_the_recorded_decisions():
    for r in _rows():
        assert ("cpu" if _decision(r) else "reference") == r["policy"], r


# One representative per class, small enough for a test.
GN_CASES = [  # shape, silu, modulated (add), channels_last, expected backend
    ((2, 64, 16, 16), True, False, False, "cpu"),
    ((2, 64, 16, 16), True, True, False, "cpu"),
    ((1, 32, 7, 37), True, False, False, "cpu"),
    ((4, 64, 8, 8), True, True, False, "cpu"),
    ((4, 64, 4, 4), True, False, False, "reference"),
    ((4, 64, 4, 4), True, False, True, "cpu"),
    ((3, 48, 5, 3), True, True, True, "cpu"),
    ((2, 64, 16, 16), False, False, False, "reference"),
    ((2, 64, 16, 16), False, False, True, "cpu"),
    ((4, 64, 4, 4), False, False, True, "reference"),
    ((2, 64, 16, 16), False, True, False, "cpu"),
]
ATTN_CASES = [  # op, q (B, N, H, D), keys L, expected backend
    ("cross_attention", (2, 128, 2, 32), 13, "cpu"),
    ("cross_attention", (2, 64, 2, 64), 77, "cpu"),
    ("cross_attention", (4, 16, 2, 32), 8, "cpu"),
    ("attention", (2, 128, 2, 32), 128, "reference"),
    ("attention", (1, 16, 2, 32), 16, "cpu"),
]


@needs_cpu_kernels
@pytest.mark.parametrize("shape,silu,modulated,channels_last,expected", GN_CASES)
def test_group_norm_silu_routing_and_results(shape, silu, modulated, channels_last, expected):
    torch.manual_seed(0)
    B, C = shape[:2]
    x, w, b = torch.randn(shape), torch.randn(C), torch.randn(C)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    add = torch.randn(B, C) if modulated else None
    assert dispatch.resolve("group_norm_silu", CPU, (x, 16, silu, add, None, None)) == expected
    want = reference.group_norm_silu(x.double(), w.double(), b.double(), 16, add=None if add is None else add.double(),
                                     silu=silu)
    outputs = {"default": ops.group_norm_silu(x, w, b, 16, add=add, silu=silu)}
    for backend in ("cpu", "reference"):
        with ops.use_backend(backend):
            outputs[backend] = ops.group_norm_silu(x, w, b, 16, add=add, silu=silu)
    for name, y in outputs.items():
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), name


@needs_cpu_kernels
@pytest.mark.parametrize("op,q_shape,L,expected", ATTN_CASES)
def test_attention_routing_and_results(op, q_shape, L, expected):
    torch.manual_seed(0)
    B, N, H, D = q_shape
    q, k, v = torch.randn(q_shape), torch.randn(B, L, H, D), torch.randn(B, L, H, D)
    lengths = torch.tensor([L - i % 3 * (L // 3) for i in range(B)], dtype=torch.int32) if op == "cross_attention" else None
    if lengths is not None and B > 2:
        lengths[2] = 0  # a sample with no keys gets zeros on every path
    assert dispatch.resolve(op, CPU, (q, k, lengths)) == expected

    def call(*t):
        return ops.attention(*t) if lengths is None else ops.cross_attention(*t, lengths)

    want = reference.cross_attention(q.double(), k.double(), v.double(), lengths)
    outputs = {"default": call(q, k, v)}
    for backend in ("cpu", "reference"):
        with ops.use_backend(backend):
            outputs[backend] = call(q, k, v)
    for name, out in outputs.items():
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_cpu_kernels
def test_calls_that_will_run_backward_take_the_path_measured_for_backward():
    x = torch.randn(2, 64, 16, 16)
    q = torch.randn(1, 16, 2, 32)
    assert dispatch.resolve("group_norm_silu", CPU, (x, 16, True, None, None, None)) == "cpu"
    assert dispatch.resolve("attention", CPU, (q, q, None)) == "cpu"
    x.requires_grad_()
    q.requires_grad_()
    assert dispatch.resolve("group_norm_silu", CPU, (x, 16, True, None, None, None)) == "reference"
    assert dispatch.resolve("attention", CPU, (q, q, None)) == "reference"
    with torch.no_grad():
        assert dispatch.resolve("group_norm_silu", CPU, (x, 16, True, None, None, None)) == "cpu"
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert dispatch.resolve("group_norm_silu", CPU, (x_cl, 16, True, None, None, None)) == "cpu"
    x_cl8 = torch.randn(2, 512, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert dispatch.resolve("group_norm_silu", CPU, (x_cl8, 16, True, None, None, None)) == "reference"
    x_cl8_few = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert dispatch.resolve("group_norm_silu", CPU, (x_cl8_few, 16, True, None, None, None)) == "cpu"


@needs_cpu_kernels
def test_backward_follows_the_routed_path():
    """Gradients of both routed attention paths match the float64 reference."""
    torch.manual_seed(0)
    for op, q_shape, L, _ in ATTN_CASES[:1] + ATTN_CASES[3:4]:
        B, N, H, D = q_shape
        leaves = [torch.randn(s, dtype=torch.float64) for s in (q_shape, (B, L, H, D), (B, L, H, D))]
        lengths = torch.full((B,), L - 1, dtype=torch.int32) if op == "cross_attention" else None
        grad = torch.randn(q_shape, dtype=torch.float64)
        ref_leaves = [t.clone().requires_grad_() for t in leaves]
        reference.cross_attention(*ref_leaves, lengths).backward(grad)
        ours = [t.float().requires_grad_() for t in leaves]
        out = ops.attention(*ours) if lengths is None else ops.cross_attention(*ours, lengths)
        out.backward(grad.float())
        for a, b in zip(ours, ref_leaves):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
