"""Measure the table behind dalle3_fast/ops/cpu_policy.py: our CPU kernel vs plain PyTorch, per op shape.

    python benchmarks/cpu_policy_table.py --threads 1 --dtype float32 --layout channels_last \\
        --update dalle3_fast/ops/cpu_policy_measurements.json

For every op call of the shipped tiny U-Net (batch 32, 8x8 latents), SD1.5 (batch 2, 64x64) and SDXL
(batch 2, 128x128) it times the op with backend "cpu" (our kernel, forced) and backend "reference"
(eager F.group_norm + F.silu, or SDPA with a bool key mask), forward only and forward + backward.
GroupNorm rows are taken for each ``--layout``: the U-Net runs its feature maps channels_last, and
eager GroupNorm's speed differs a lot between the two layouts.

Clock: 1 thread: median thread CPU time (stable on a shared machine); 2 threads: median process CPU
time, which ticks in ~8 ms steps on this VM, so rows under 100 ms are marked ``clock_limited``.
The rows replace those with the same key in ``--update`` (or are printed), each with the path
``cpu_policy.prefers_kernel`` takes for it, so tests/ops/test_cpu_policy.py checks the policy against them.
Outputs are allocated as users' calls allocate them (glibc's default malloc: a fresh large buffer may
page-fault, and eager GroupNorm + SiLU allocates two where the kernel allocates one);
``--no-page-faults`` re-executes under GLIBC_TUNABLES=glibc.malloc.mmap_max=0 to compare compute only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ALLOCATOR = "glibc.malloc.mmap_max=0"

# (net, shape, groups, silu, add): every group_norm_silu call class of the three U-Nets.
GN_SHAPES = [
    ("tiny_b32_8x8", (32, 64, 8, 8), 16, True, False), ("tiny_b32_8x8", (32, 64, 8, 8), 16, True, True),
    ("tiny_b32_8x8", (32, 64, 8, 8), 16, False, False), ("tiny_b32_8x8", (32, 64, 4, 4), 16, True, False),
    ("tiny_b32_8x8", (32, 128, 4, 4), 16, True, True), ("tiny_b32_8x8", (32, 128, 4, 4), 16, False, False),
    ("tiny_b32_8x8", (32, 128, 4, 4), 16, True, False), ("tiny_b32_8x8", (32, 256, 4, 4), 16, True, False),
    ("tiny_b32_8x8", (32, 192, 4, 4), 16, True, False), ("tiny_b32_8x8", (32, 192, 8, 8), 16, True, False),
    ("tiny_b32_8x8", (32, 128, 8, 8), 16, True, False),
    ("sd15_b2_64x64", (2, 320, 64, 64), 32, True, False), ("sd15_b2_64x64", (2, 320, 64, 64), 32, True, True),
    ("sd15_b2_64x64", (2, 320, 64, 64), 32, False, False), ("sd15_b2_64x64", (2, 320, 32, 32), 32, True, False),
    ("sd15_b2_64x64", (2, 640, 32, 32), 32, True, True), ("sd15_b2_64x64", (2, 640, 32, 32), 32, False, False),
    ("sd15_b2_64x64", (2, 640, 32, 32), 32, True, False), ("sd15_b2_64x64", (2, 640, 16, 16), 32, True, False),
    ("sd15_b2_64x64", (2, 1280, 16, 16), 32, True, True), ("sd15_b2_64x64", (2, 1280, 16, 16), 32, False, False),
    ("sd15_b2_64x64", (2, 1280, 16, 16), 32, True, False), ("sd15_b2_64x64", (2, 1280, 8, 8), 32, True, False),
    ("sd15_b2_64x64", (2, 1280, 8, 8), 32, True, True), ("sd15_b2_64x64", (2, 1280, 8, 8), 32, False, False),
    ("sd15_b2_64x64", (2, 2560, 8, 8), 32, True, False), ("sd15_b2_64x64", (2, 2560, 16, 16), 32, True, False),
    ("sd15_b2_64x64", (2, 1920, 16, 16), 32, True, False), ("sd15_b2_64x64", (2, 1920, 32, 32), 32, True, False),
    ("sd15_b2_64x64", (2, 1280, 32, 32), 32, True, False), ("sd15_b2_64x64", (2, 960, 32, 32), 32, True, False),
    ("sd15_b2_64x64", (2, 960, 64, 64), 32, True, False), ("sd15_b2_64x64", (2, 640, 64, 64), 32, True, False),
    ("sdxl_b2_128x128", (2, 320, 128, 128), 32, True, False), ("sdxl_b2_128x128", (2, 320, 128, 128), 32, True, True),
    ("sdxl_b2_128x128", (2, 640, 64, 64), 32, True, True), ("sdxl_b2_128x128", (2, 640, 64, 64), 32, False, False),
    ("sdxl_b2_128x128", (2, 1280, 32, 32), 32, True, True), ("sdxl_b2_128x128", (2, 1280, 32, 32), 32, False, False),
    ("sdxl_b2_128x128", (2, 2560, 32, 32), 32, True, False), ("sdxl_b2_128x128", (2, 1920, 64, 64), 32, True, False),
    ("sdxl_b2_128x128", (2, 1280, 64, 64), 32, True, False), ("sdxl_b2_128x128", (2, 960, 128, 128), 32, True, False),
    ("sdxl_b2_128x128", (2, 640, 128, 128), 32, True, False),
]

# (net, op, measured (B, N, H, D), keys, the U-Net's own (B, N, H, D)); large B*H scaled down in B*H.
ATTENTION_SHAPES = [
    ("tiny_b32_8x8", "attention", (32, 64, 2, 32), 64, (32, 64, 2, 32)),
    ("tiny_b32_8x8", "cross_attention", (32, 64, 2, 32), 32, (32, 64, 2, 32)),
    ("tiny_b32_8x8", "attention", (32, 16, 4, 32), 16, (32, 16, 4, 32)),
    ("tiny_b32_8x8", "cross_attention", (32, 16, 4, 32), 32, (32, 16, 4, 32)),
    ("sd15_b2_64x64", "attention", (1, 4096, 2, 40), 4096, (2, 4096, 8, 40)),
    ("sd15_b2_64x64", "cross_attention", (2, 4096, 8, 40), 77, (2, 4096, 8, 40)),
    ("sd15_b2_64x64", "attention", (1, 1024, 4, 80), 1024, (2, 1024, 8, 80)),
    ("sd15_b2_64x64", "cross_attention", (2, 1024, 8, 80), 77, (2, 1024, 8, 80)),
    ("sd15_b2_64x64", "attention", (2, 256, 8, 160), 256, (2, 256, 8, 160)),
    ("sd15_b2_64x64", "cross_attention", (2, 256, 8, 160), 77, (2, 256, 8, 160)),
    ("sd15_b2_64x64", "attention", (2, 64, 8, 160), 64, (2, 64, 8, 160)),
    ("sd15_b2_64x64", "cross_attention", (2, 64, 8, 160), 77, (2, 64, 8, 160)),
    ("sdxl_b2_128x128", "attention", (1, 4096, 2, 64), 4096, (2, 4096, 10, 64)),
    ("sdxl_b2_128x128", "cross_attention", (1, 4096, 10, 64), 77, (2, 4096, 10, 64)),
    ("sdxl_b2_128x128", "attention", (1, 1024, 5, 64), 1024, (2, 1024, 20, 64)),
    ("sdxl_b2_128x128", "cross_attention", (2, 1024, 20, 64), 77, (2, 1024, 20, 64)),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/cpu_policy_table.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, action="append", choices=(1, 2),
                   help="torch threads (repeatable; default 1)")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16"), help="dtypes (repeatable; default float32)")
    p.add_argument("--layout", action="append", choices=("nchw", "channels_last"),
                   help="GroupNorm input layouts (repeatable; default both)")
    p.add_argument("--ops", default="group_norm_silu,attention,cross_attention",
                   help="comma-separated ops to measure (default: all three)")
    p.add_argument("--nets", default="tiny_b32_8x8,sd15_b2_64x64,sdxl_b2_128x128",
                   help="comma-separated U-Nets whose shapes to measure (default: all three)")
    p.add_argument("--shape", action="append", default=None, metavar="B,C,H,W",
                   help="only rows of this GroupNorm shape or attention (B,N,H,D) shape (repeatable)")
    p.add_argument("--no-backward", action="store_true", help="forward rows only")
    p.add_argument("--backward-only", action="store_true", help="forward + backward rows only")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed calls of each path per row (default 0: as many as fit in ~0.6 s, 5 to 41)")
    p.add_argument("--update", type=Path, default=None,
                   help="merge the rows into this measurement JSON (replacing rows with the same key)")
    p.add_argument("--no-page-faults", action="store_true",
                   help="re-execute with GLIBC_TUNABLES=glibc.malloc.mmap_max=0: fresh outputs come from the heap "
                        "without page faults, so the rows compare compute only")
    p.add_argument("--refresh-policy", action="store_true",
                   help="measure nothing: rewrite the policy column of --update's rows for the current policy")
    args = p.parse_args(argv)
    args.threads = args.threads or [1]
    args.dtype = args.dtype or ["float32"]
    args.layout = args.layout or ["nchw", "channels_last"]
    args.ops = args.ops.split(",")
    args.nets = args.nets.split(",")
    try:
        args.shape = None if args.shape is None else {tuple(int(n) for n in s.split(",")) for s in args.shape}
    except ValueError:
        p.error("--shape takes four comma-separated integers, e.g. 2,320,64,64")
    unknown = [o for o in args.ops if o not in ("group_norm_silu", "attention", "cross_attention")]
    if unknown:
        p.error(f"--ops: unknown op {unknown[0]!r}")
    return args


def _clock(threads: int):
    return time.thread_time if threads == 1 else time.process_time


def _paired_ms(run, threads: int, repeats: int) -> dict[str, float]:
    """Median ms per call of ``run`` under backend "cpu" and "reference", timed alternately.

    Alternating the two paths call by call makes a load that comes and goes on a shared machine
    fall on both alike; the medians are of each path's own calls.
    """
    import dalle3_fast.ops as ops

    clock = _clock(threads)

    def once(backend: str) -> float:
        with ops.use_backend(backend):
            t0 = clock()
            run()
            return clock() - t0

    for backend in ("cpu", "reference"):
        once(backend)
    first = max(once("cpu") + once("reference"), 1e-6)
    n = repeats or max(5, min(41, int(0.6 / first)))
    times = {"cpu": [], "reference": []}
    for i in range(n):
        for backend in (("cpu", "reference") if i % 2 == 0 else ("reference", "cpu")):
            times[backend].append(once(backend))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _gn_call(ops, x, w, b, groups, silu, add, backward):
    def run():
        y = ops.group_norm_silu(x.detach().requires_grad_(backward), w, b, groups, silu=silu, add=add)
        if backward:
            y.backward(torch.ones_like(y))
    return run


def _attention_call(ops, op, q, k, v, lengths, backward):
    def run():
        qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
        out = ops.cross_attention(qq, kk, vv, lengths) if op == "cross_attention" else ops.attention(qq, kk, vv)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def measure(args) -> list[dict]:
    import dalle3_fast.ops as ops
    from dalle3_fast.ops import cpu_policy

    rows = []
    g = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            for backward in (False,) if args.no_backward else (True,) if args.backward_only else (False, True):
                if "group_norm_silu" in args.ops:
                    for net, shape, groups, silu, add in GN_SHAPES:
                        if net not in args.nets or args.shape is not None and shape not in args.shape:
                            continue
                        for layout in args.layout:
                            x = torch.randn(shape, generator=g).to(dtype)
                            if layout == "channels_last":
                                x = x.contiguous(memory_format=torch.channels_last)
                            w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
                            a = torch.randn(shape[:2], generator=g).to(dtype) if add else None
                            run = _gn_call(ops, x, w.to(dtype), b.to(dtype), groups, silu, a, backward)
                            with torch.set_grad_enabled(backward):
                                ms = _paired_ms(run, threads, args.repeats)
                            with torch.set_grad_enabled(backward):
                                xx = x.detach().requires_grad_(backward)
                                kernel = cpu_policy.prefers_kernel("group_norm_silu", xx, groups, silu, a, None, None)
                            rows.append(_row("group_norm_silu", net, list(shape), dtype_name, threads, backward, ms,
                                             kernel, groups=groups, silu=silu, add=add, layout=layout))
                for net, op, shape, keys, unet_shape in ATTENTION_SHAPES:
                    if net not in args.nets or op not in args.ops or args.shape is not None and shape not in args.shape:
                        continue
                    B, N, H, D = shape
                    q = torch.randn(B, N, H, D, generator=g).to(dtype)
                    k, v = (torch.randn(B, keys, H, D, generator=g).to(dtype) for _ in range(2))
                    lengths = None
                    if op == "cross_attention":
                        lengths = torch.randint(1, keys + 1, (B,), generator=g, dtype=torch.int32)
                        lengths[0] = keys
                    run = _attention_call(ops, op, q, k, v, lengths, backward)
                    with torch.set_grad_enabled(backward):
                        ms = _paired_ms(run, threads, args.repeats)
                    with torch.set_grad_enabled(backward):
                        qq = q.detach().requires_grad_(backward)
                        kernel = cpu_policy.prefers_kernel(op, qq, k, lengths)
                    rows.append(_row(op, net, list(shape), dtype_name, threads, backward, ms, kernel, keys=keys,
                                     unet_shape=list(unet_shape)))
                    print(_describe(rows[-1]), file=sys.stderr)
    return rows


def _row(op, net, shape, dtype, threads, backward, ms, kernel, **extra) -> dict:
    row = {"op": op, "net": net, "shape": shape, **extra, "dtype": dtype, "threads": threads, "backward": backward,
           "cpu_ms": round(ms["cpu"], 4), "reference_ms": round(ms["reference"], 4),
           "policy": "cpu" if kernel else "reference",
           "allocator": "no page faults" if ALLOCATOR in os.environ.get("GLIBC_TUNABLES", "") else "default"}
    if threads > 1 and min(ms.values()) < 100:
        row["clock_limited"] = True
    if op == "group_norm_silu":
        print(_describe(row), file=sys.stderr)
    return row


def _describe(r: dict) -> str:
    return (f"{r['op']:16s} {r['net']:16s} {str(r['shape']):22s} {r.get('layout', ''):13s} {r['dtype']:8s} "
            f"{r['threads']}t {'fwd+bwd' if r['backward'] else 'fwd':7s} ours {r['cpu_ms']:9.3f} ms  "
            f"peer {r['reference_ms']:9.3f} ms  x{r['reference_ms'] / r['cpu_ms']:.2f}  policy {r['policy']}")


def row_key(r: dict) -> tuple:
    return (r["op"], r["net"], tuple(r["shape"]), r.get("groups"), r.get("silu"), r.get("add"), r.get("keys"),
            r.get("layout", "nchw") if r["op"] == "group_norm_silu" else None, r["dtype"], r["threads"], r["backward"])


def merge(path: Path, rows: list[dict]) -> None:
    from dalle3_fast.ops import cpu_policy

    table = json.loads(path.read_text())
    new = {row_key(r): r for r in rows}
    kept = [r for r in table["rows"] if row_key(r) not in new]
    table["rows"] = kept + rows
    for r in table["rows"]:  # the path the current policy takes, for every row old and new
        r["policy"] = "cpu" if cpu_policy.row_prefers_kernel(r) else "reference"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.refresh_policy:
        if args.update is None:
            print("cpu_policy_table.py: --refresh-policy needs --update FILE", file=sys.stderr)
            return 2
        merge(args.update, [])
        return 0
    if args.no_page_faults and ALLOCATOR not in os.environ.get("GLIBC_TUNABLES", ""):
        env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), ALLOCATOR])))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    rows = measure(args)
    if args.update:
        merge(args.update, rows)
        print(f"{len(rows)} rows merged into {args.update}", file=sys.stderr)
    else:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
