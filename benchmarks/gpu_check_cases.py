"""Correctness spot-check and compute-sanitizer snippets of benchmarks/gpu_check.py (run as a child process).

    python benchmarks/gpu_check_cases.py spot --rows FILE [--device cpu] [--deadline EPOCH]
    python benchmarks/gpu_check_cases.py sanitize CASE [CASE ...] [--device cpu]

spot: each op on each live GPU backend (cuda, then triton) at SD shapes, forward and every gradient,
against the float64 reference on the same device; one JSON line per (case, dtype, backend) appended to
--rows. Bounds on ||out - ref|| / ||ref|| as in tests/ops/test_ops.py (bf16 1e-2, fp16 2e-3).
sanitize: a small forward + backward of each CUDA kernel family with the cuda backend forced, meant to
run under compute-sanitizer; prints CASE-OK <name> after a device synchronize. --device cpu runs the
same code on CPU tensors (the cpu backend, or the reference where the extension is not built): the dry run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2, "float64": 1e-12}

# ------------------------------------------------------------------ spot-check cases
# GN: (shape, groups, layout, modulation, dtypes). Attention: (B, N, L, H, D, key lengths or None, dtypes).
# Shapes are those the benchmarks time (U-Net levels at 64x64 latents, the T5 generator at 128x128, the
# decoder), with batch or heads cut where the float64 reference would need too much memory.
GN_SPOT = [
    ((2, 320, 64, 64), 32, "nchw", ("add", "scale", "shift"), ("bfloat16", "float16")),
    ((2, 320, 64, 64), 32, "channels_last", ("add", "scale", "shift"), ("bfloat16",)),
    ((2, 1280, 8, 8), 32, "nchw", ("scale", "shift"), ("bfloat16",)),
    ((1, 128, 256, 256), 32, "nchw", (), ("bfloat16",)),  # a group too large for one CTA's shared memory
    ((1, 128, 256, 256), 32, "channels_last", ("add",), ("bfloat16",)),
]
ATTN_SPOT = [
    (2, 4096, 4096, 8, 40, None, ("bfloat16", "float16")),  # SD1.5 level 0
    (2, 1024, 1024, 8, 80, None, ("bfloat16",)),
    (2, 256, 256, 8, 160, None, ("bfloat16",)),
    (1, 16384, 16384, 2, 64, None, ("bfloat16",)),  # long N: the T5 generator's level 0 at 1024 px
    (2, 4096, 77, 8, 40, [77, 0], ("bfloat16", "float16")),  # a prompt with no tokens
    (2, 16384, 120, 2, 64, [120, 33], ("bfloat16",)),
    (3, 1024, 512, 2, 80, [512, 300, 0], ("bfloat16",)),  # long L
]
# CPU stand-ins for the dry run: the same code on tiny shapes.
GN_SPOT_TINY = [((2, 64, 5, 7), 8, "nchw", ("add", "scale", "shift"), ("float32",)),
                ((2, 64, 6, 5), 8, "channels_last", ("add",), ("float32",))]
ATTN_SPOT_TINY = [(2, 37, 37, 2, 40, None, ("float32",)), (2, 33, 77, 2, 64, [77, 0], ("float32",))]


def _torch():
    import torch

    return torch


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref||, ||ref|| floored at an RMS of 0.1 (as tests/ops/test_ops.py: inputs are O(1))."""
    out, ref = out.double(), ref.double()
    floor = 0.1 * max(ref.numel(), 1) ** 0.5
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()


def poison_allocator(*likes) -> None:
    """Hand NaN-filled blocks back to the caching allocator so outputs that reuse them start as NaN."""
    torch = _torch()
    junk = [torch.full_like(t, float("nan")) for t in likes]
    del junk


def worst_error(outs, refs) -> tuple[float, str]:
    torch = _torch()
    worst, where = 0.0, ""
    for name, out, ref in zip(("out", *(f"d{i}" for i in range(len(outs) - 1))), outs, refs):
        if not torch.isfinite(out).all():
            return float("inf"), f"{name} has non-finite values"
        err = rel_err(out, ref)
        if err > worst:
            worst, where = err, name
    return worst, where


def run_gn(fn, x, weight, bias, mods, groups, grad_y):
    torch = _torch()
    leaves = {"x": x, "weight": weight, "bias": bias, **mods}
    leaves = {k: v.detach().clone(memory_format=torch.preserve_format).requires_grad_() for k, v in leaves.items()}
    poison_allocator(x)
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], groups, 1e-5, **{k: leaves[k] for k in mods})
    poison_allocator(*leaves.values())
    y.backward(grad_y.to(y.dtype))
    return [y, *(v.grad for v in leaves.values())]


def spot_gn(ops, reference, backend, device, case, dtype_name):
    torch = _torch()
    shape, groups, layout, modulation, _ = case
    dtype = getattr(torch, dtype_name)
    B, C = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(C, device=device, dtype=dtype), torch.randn(C, device=device, dtype=dtype)
    mods = {n: 0.5 * torch.randn(B, C, device=device, dtype=dtype) for n in modulation}
    grad_y = torch.randn(shape, device=device, dtype=torch.float64)
    with ops.use_backend(backend):
        got = run_gn(ops.group_norm_silu, x, weight, bias, mods, groups, grad_y)
    ref = run_gn(reference.group_norm_silu, x.double(), weight.double(), bias.double(),
                 {k: v.double() for k, v in mods.items()}, groups, grad_y)
    note = ""
    if layout == "channels_last" and not got[0].is_contiguous(memory_format=torch.channels_last):
        note = "output lost channels_last"
    return (*worst_error(got, ref), note)


def run_attn(fn, q, k, v, lengths, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    poison_allocator(q)
    out = fn(*leaves) if lengths is None else fn(*leaves, lengths)
    poison_allocator(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return [out, *(t.grad for t in leaves)]


def spot_attention(ops, reference, backend, device, case, dtype_name):
    torch = _torch()
    B, N, L, H, D, lengths, _ = case
    dtype = getattr(torch, dtype_name)
    q = torch.randn(B, N, H, D, device=device, dtype=dtype)
    k, v = (torch.randn(B, L, H, D, device=device, dtype=dtype) for _ in range(2))
    grad_out = torch.randn(B, N, H, D, device=device, dtype=torch.float64)
    key_lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=device)
    fn = ops.attention if lengths is None else ops.cross_attention
    ref_fn = reference.attention if lengths is None else reference.cross_attention
    with ops.use_backend(backend):
        got = run_attn(fn, q, k, v, key_lengths, grad_out)
    ref = run_attn(ref_fn, q.double(), k.double(), v.double(), key_lengths, grad_out)
    note = ""
    for b, n in enumerate(lengths or []):
        if n == 0 and not all(bool((t[b] == 0).all()) for t in got):
            note = f"sample {b} has no keys but its output or gradients are not all zero"
    return (*worst_error(got, ref), note)


def spot_backends(ops, device) -> list[str]:
    live = ops.available_backends()
    if device.type == "cuda":
        return [b for b in ("cuda", "triton") if b in live]
    return ["cpu"] if "cpu" in live else ["reference"]


def emit(rows_file, row: dict) -> None:
    with open(rows_file, "a") as f:
        f.write(json.dumps(row) + "\n")


def is_sticky_cuda_error(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("illegal memory access", "misaligned address", "unspecified launch failure",
                                   "device-side assert", "CUDA error: an illegal instruction"))


def spot(args) -> int:
    torch = _torch()
    import dalle3_fast.ops as ops
    from dalle3_fast.ops import reference

    device = torch.device(args.device)
    tiny = device.type == "cpu"
    gn_cases, attn_cases = (GN_SPOT_TINY, ATTN_SPOT_TINY) if tiny else (GN_SPOT, ATTN_SPOT)
    work = []
    for backend in spot_backends(ops, device):  # cuda first: no JIT compile, the quickest verdict
        for case in gn_cases:
            for dt in case[-1]:
                work.append(("group_norm_silu", f"{case[0]} {case[2]} G{case[1]} {'+'.join(case[3]) or '-'}",
                             spot_gn, backend, case, dt))
        for case in attn_cases:
            B, N, L, H, D, lengths, _ = case
            op = "attention" if lengths is None else "cross_attention"
            name = f"B{B} N{N} H{H} D{D}" + ("" if lengths is None else f" L{L} len{lengths}")
            for dt in case[-1]:
                work.append((op, name, spot_attention, backend, case, dt))
    status = 0
    for op, name, fn, backend, case, dt in work:
        row = {"stage": "spot", "kind": "row", "op": op, "case": name, "dtype": dt, "backend": backend,
               "tol": TOL[dt]}
        if args.deadline and time.time() > args.deadline:
            emit(args.rows, {**row, "ok": True, "err": None, "skipped": True, "note": "not reached: stage budget"})
            continue
        t0 = time.perf_counter()
        try:
            err, where, note = fn(ops, reference, backend, device, case, dt)
            ok = err < TOL[dt] and not note
            row.update(err=err, worst=where, ok=ok, note=note)
        except Exception as exc:  # noqa: BLE001  (recorded as a failed row)
            row.update(err=None, ok=False, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            if is_sticky_cuda_error(exc):
                emit(args.rows, row)
                print(f"spot: {row['note']}: the CUDA context is unusable; stopping", flush=True)
                return 3
        row["seconds"] = round(time.perf_counter() - t0, 2)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        emit(args.rows, row)
        print(f"spot {op} {name} {dt} {backend}: err {row['err']} {'ok' if row['ok'] else 'MISMATCH'} "
              f"{row['note']}", flush=True)
        status |= 0 if row["ok"] else 1
    return status


# ------------------------------------------------------------------ sanitizer snippets


def _gn_run(ops, device, dtype, shape, groups, channels_last, modulation):
    torch = _torch()
    B, C = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = (torch.randn(C, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    mods = {n: torch.randn(B, C, device=device, dtype=dtype, requires_grad=True) for n in modulation}
    y = ops.group_norm_silu(x, w, b, groups, **mods)
    y.backward(torch.randn_like(y))


def _attn_run(ops, device, dtype, B, N, L, H, D, lengths):
    torch = _torch()
    q = torch.randn(B, N, H, D, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, L, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    if lengths is None:
        out = ops.attention(q, k, v)
    else:
        out = ops.cross_attention(q, k, v, torch.tensor(lengths, dtype=torch.int32, device=device))
    out.backward(torch.randn_like(out))


def sanitize_gn_fused(ops, device, torch):
    """Channels-first groups that fit in shared memory: the single-pass kernels (vector and scalar loads)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        _gn_run(ops, device, dtype, (2, 64, 8, 8), 8, False, ("add", "scale", "shift"))  # S % 8 == 0: vectors
        _gn_run(ops, device, dtype, (2, 40, 9, 11), 5, False, ("shift",))  # odd S: scalar loads
    _gn_run(ops, device, torch.float64, (1, 16, 3, 5), 4, False, ("scale",))


def sanitize_gn_split(ops, device, torch):
    """Channels-first groups too large for one CTA (>= 256 KB): stats -> finalize -> apply passes."""
    _gn_run(ops, device, torch.bfloat16, (1, 64, 64, 64), 2, False, ("add", "scale", "shift"))
    _gn_run(ops, device, torch.float32, (1, 64, 48, 50), 2, False, ())


def sanitize_gn_channels_last(ops, device, torch):
    for dtype in (torch.bfloat16, torch.float32):
        _gn_run(ops, device, dtype, (2, 320, 6, 5), 32, True, ("add", "scale", "shift"))  # C % 8 == 0: vectors
        _gn_run(ops, device, dtype, (2, 40, 9, 11), 5, True, ("add",))  # scalar channels
    _gn_run(ops, device, torch.float16, (1, 64, 40, 40), 4, True, ())


def sanitize_attention_tc(ops, device, torch):
    """The tensor-core kernels (fp16/bf16), every head dim, lengths that are not multiples of a tile."""
    for D in ops.SUPPORTED_HEAD_DIMS:
        _attn_run(ops, device, torch.bfloat16, 1, 37, 37, 2, D, None)
    _attn_run(ops, device, torch.float16, 2, 129, 129, 1, 64, None)
    _attn_run(ops, device, torch.bfloat16, 1, 200, 200, 1, 128, None)


def sanitize_cross_attention_tc(ops, device, torch):
    """Key lengths 0, 1, partial and full; L = 1 and L = 512."""
    _attn_run(ops, device, torch.bfloat16, 3, 37, 77, 2, 40, [77, 5, 0])
    _attn_run(ops, device, torch.float16, 2, 19, 1, 1, 64, [1, 0])
    _attn_run(ops, device, torch.bfloat16, 2, 65, 512, 1, 160, [512, 300])
    _attn_run(ops, device, torch.bfloat16, 2, 70, 120, 2, 80, [120, 33])


def sanitize_attention_simple(ops, device, torch):
    """The fp32/fp64 kernels."""
    _attn_run(ops, device, torch.float32, 2, 37, 37, 2, 64, None)
    _attn_run(ops, device, torch.float32, 2, 33, 77, 1, 40, [77, 0])
    _attn_run(ops, device, torch.float64, 1, 21, 21, 1, 160, None)


SANITIZE_CASES = {
    "gn_fused": sanitize_gn_fused,
    "gn_split": sanitize_gn_split,
    "gn_channels_last": sanitize_gn_channels_last,
    "attention_tc": sanitize_attention_tc,
    "cross_attention_tc": sanitize_cross_attention_tc,
    "attention_simple": sanitize_attention_simple,
}


def sanitize(args) -> int:
    torch = _torch()
    import dalle3_fast.ops as ops

    device = torch.device(args.device)
    backend = "cuda" if device.type == "cuda" else ("cpu" if "cpu" in ops.available_backends() else "reference")
    unknown = [n for n in args.cases if n not in SANITIZE_CASES]
    if unknown:
        print(f"gpu_check_cases.py: unknown sanitizer case(s) {unknown}; choose from {', '.join(SANITIZE_CASES)}",
              file=sys.stderr)
        return 2
    for name in args.cases:
        torch.manual_seed(0)
        with ops.use_backend(backend):
            SANITIZE_CASES[name](ops, device, torch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"CASE-OK {name} ({backend} backend on {device})", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("spot", help="correctness spot-check against the float64 reference")
    s.add_argument("--rows", required=True, help="JSON-lines file the rows are appended to")
    s.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    s.add_argument("--deadline", type=float, default=None, help="epoch seconds after which cases are skipped")
    z = sub.add_parser("sanitize", help="small runs of each CUDA kernel family, for compute-sanitizer")
    z.add_argument("cases", nargs="+", help=f"case names: {', '.join(SANITIZE_CASES)}")
    z.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args(argv)
    return spot(args) if args.cmd == "spot" else sanitize(args)


if __name__ == "__main__":
    sys.exit(main())
