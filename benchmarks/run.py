"""Side-by-side timings of dalle3_fast against its peers, in one process on one device.

    python benchmarks/run.py --suite ops|unet|pipeline [--json FILE] [--device cpu|cuda]
    python benchmarks/run.py --suite unet --threads 1 --clock thread-cpu [--no-compile]

Each row: op, shape, dtype, implementation, median milliseconds, speedup over the suite's
baseline (ops: PyTorch eager; unet: diffusers' UNet2DConditionModel eager on the same weights;
pipeline: the same pipeline forced to the reference backend), and for ops the fraction of the
hardware limit measured in the same process at the same thread count (GroupNorm: bytes moved,
one read and one write, over the best copy bandwidth of a copy with the same working set, so
an in-cache row is held to the cache's bandwidth; attention: FLOPs over the best rate of a large
sgemm). Suites are registered in SUITES (a function taking the parsed arguments and a Bench,
adding rows); the unet and pipeline suites live in model_suites.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # model_suites.py beside this file

import dalle3_fast.ops as ops  # noqa: E402
from cpu_isa import cpu_info, isa_summary  # noqa: E402  (beside this file)


# ------------------------------------------------------------------ timing and hardware limits


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    ms: float | None
    speedup: float | None = None  # eager ms / this ms
    fraction: float | None = None  # of the measured hardware limit
    note: str = ""
    limit: float | None = None  # the limit the fraction is of: GB/s (bytes rows) or TFLOP/s (FLOP rows)


@dataclass
class Bench:
    device: torch.device
    warmup: int
    iters: int
    clock: str = "wall"  # or "thread-cpu": CPU time of the calling thread (single-threaded CPU runs)
    copy_gbps: float = 0.0  # out-of-cache (DRAM) copy peak, bytes read + written
    matmul_tflops: float = 0.0
    rows: list[Row] = field(default_factory=list)
    _copy_peaks: dict[int, float] = field(default_factory=dict)

    def time_once_ms(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        clock = time.thread_time if self.clock == "thread-cpu" else time.perf_counter
        t0 = clock()
        fn()
        return (clock() - t0) * 1e3

    def time_many_ms(self, fns: dict[str, Callable[[], object]]) -> dict[str, float | str]:
        """Median ms of each fn after warm-up, timed round-robin (one call of each in turn) so
        that load from other processes falls on all of them alike. A fn that raises gets
        its error message instead."""
        results: dict[str, float | str] = {}
        live = {}
        for name, fn in fns.items():
            try:
                for _ in range(self.warmup):
                    fn()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                live[name] = fn
            except Exception as exc:  # a peer that refuses these inputs is reported, not fatal
                results[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        times = {name: [] for name in live}
        for _ in range(self.iters):
            for name, fn in live.items():
                times[name].append(self.time_once_ms(fn))
        for name in fns:
            if name in times:
                results[name] = statistics.median(times[name])
        return results

    def time_ms(self, fn: Callable[[], object]) -> float:
        result = self.time_many_ms({"fn": fn})["fn"]
        if isinstance(result, str):
            raise RuntimeError(result)
        return result

    def _best_ms(self, fn: Callable[[], object], tries: int, min_ms: float = 2.0) -> float:
        """Best (smallest) ms per call of fn over ``tries`` samples, each repeating fn until it lasts
        ``min_ms``, so that short calls are not at the clock's resolution. A peak, not a median."""
        for _ in range(2):
            fn()
        reps = 1
        while self.time_once_ms(lambda: [fn() for _ in range(reps)]) < min_ms and reps < 1 << 16:
            reps *= 2
        return min(self.time_once_ms(lambda: [fn() for _ in range(reps)]) / reps for _ in range(tries))

    def copy_peak_gbps(self, working_set_bytes: float) -> float:
        """Best copy bandwidth (bytes read + written per second / 1e9) of a float32 copy whose source and
        destination together span ``working_set_bytes``, at the current thread count: the peak for a
        kernel of that working set, in cache or not. Measured once per size (rounded up to a power of 2)."""
        size = 1 << max(12, math.ceil(math.log2(max(working_set_bytes, 1))))
        if size not in self._copy_peaks:
            src = torch.empty(size // 8, device=self.device, dtype=torch.float32).uniform_()
            dst = torch.empty_like(src)
            self._copy_peaks[size] = size / self._best_ms(lambda: dst.copy_(src), tries=7) / 1e6
        return self._copy_peaks[size]

    def measure_limits(self, small: bool = False):
        """DRAM copy peak (a 512 MiB working set: out of every cache) and sgemm peak, best of N, at the
        thread count the rows run with. small: a 16 MiB copy and a 256^3 sgemm (plumbing checks only)."""
        if self.device.type == "cuda":
            dram_bytes, mm_n, mm_dtype = 1 << 31, 8192, torch.bfloat16
        else:
            dram_bytes, mm_n, mm_dtype = 1 << 29, 2048 if torch.get_num_threads() <= 4 else 4096, torch.float32
        if small:
            dram_bytes, mm_n = 1 << 24, 256
        self.copy_gbps = self.copy_peak_gbps(dram_bytes)
        a = torch.randn(mm_n, mm_n, device=self.device, dtype=mm_dtype)
        b = torch.randn(mm_n, mm_n, device=self.device, dtype=mm_dtype)
        c = torch.empty(mm_n, mm_n, device=self.device, dtype=mm_dtype)
        self.matmul_tflops = 2 * mm_n**3 / self._best_ms(lambda: torch.mm(a, b, out=c), tries=5) / 1e9
        print(f"device: {device_name(self.device)}; copy {self.copy_gbps:.1f} GB/s out of cache (read + write, best "
              f"of 7); {mm_dtype} {mm_n}^3 matmul {self.matmul_tflops:.3f} TFLOP/s (best of 5)")

    def compare(self, op: str, shape: str, dtype: torch.dtype, impls: dict[str, Callable[[], object]],
                *, bytes_moved: float | None = None, flops: float | None = None, baseline: str = "eager",
                notes: dict[str, str] | None = None):
        """Time every impl; the one named ``baseline`` is the speedup baseline. ``notes``: text per impl."""
        results = {name: (None, r) if isinstance(r, str) else (r, "") for name, r in self.time_many_ms(impls).items()}
        base_ms = results.get(baseline, (None, ""))[0]
        limit = None
        if bytes_moved is not None:
            limit = self.copy_peak_gbps(bytes_moved)
        elif flops is not None:
            limit = self.matmul_tflops
        for name, (ms, note) in results.items():
            fraction = None
            if ms is not None and bytes_moved is not None:
                fraction = bytes_moved / (ms * 1e6) / limit
            elif ms is not None and flops is not None:
                fraction = flops / (ms * 1e9) / limit
            speedup = base_ms / ms if ms is not None and base_ms is not None else None
            note = "; ".join(n for n in (note, (notes or {}).get(name, "")) if n)
            row = Row(op, shape, str(dtype).removeprefix("torch."), name, ms, speedup, fraction, note, limit)
            self.rows.append(row)
            print(format_row(row), flush=True)

    def add_skipped(self, op: str, shape: str, dtype: torch.dtype, impl: str, why: str):
        """A peer that cannot run here (not installed, failed to build): a row with the reason, no time."""
        row = Row(op, shape, str(dtype).removeprefix("torch."), impl, None, note=why)
        self.rows.append(row)
        print(format_row(row), flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = cpu_info()
    return f"{info['model']} ({isa_summary(info)}), {torch.get_num_threads()} threads"


HEADER = f"{'op':<16} {'shape':<34} {'dtype':<9} {'impl':<26} {'ms':>9} {'speedup':>8} {'of limit':>9}"


def format_row(r: Row) -> str:
    ms = f"{r.ms:9.3f}" if r.ms is not None else f"{'n/a':>9}"
    sp = f"{r.speedup:7.2f}x" if r.speedup is not None else f"{'':>8}"
    fr = f"{100 * r.fraction:8.1f}%" if r.fraction is not None else f"{'':>9}"
    return f"{r.op:<16} {r.shape:<34} {r.dtype:<9} {r.impl:<26} {ms} {sp} {fr}" + (f"  {r.note}" if r.note else "")


DEFAULT = "ours (default)"  # no backend forced: the path the dispatcher picks for these inputs


def kernel_backends(device: torch.device) -> list[str]:
    """Our live backends that run natively on `device` (Triton's CPU interpreter is no benchmark)."""
    live = ops.available_backends()
    wanted = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    return [b for b in wanted if b in live]


def compiled(fn, enabled: bool):
    return torch.compile(fn, dynamic=False) if enabled else None


def with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with ops.use_backend(backend):
            return fn()

    return run


# ------------------------------------------------------------------ ops suite


def eager_group_norm_silu(x, weight, bias, groups):
    return F.silu(F.group_norm(x, groups, weight, bias, 1e-5))


def bench_group_norm(bench: Bench, args, shapes, dtype):
    compiled_gn = compiled(eager_group_norm_silu, args.compile)
    for shape in shapes:
        for layout in ("nchw", "channels_last"):
            x = torch.randn(shape, device=bench.device, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            w = torch.randn(shape[1], device=bench.device, dtype=dtype)
            b = torch.randn(shape[1], device=bench.device, dtype=dtype)
            groups = 32 if shape[1] % 32 == 0 and shape[1] >= 256 else 16
            impls = {"eager": lambda: eager_group_norm_silu(x, w, b, groups)}
            if compiled_gn is not None:
                impls["torch.compile"] = lambda: compiled_gn(x, w, b, groups)
            for backend in kernel_backends(bench.device):
                impls[f"ours:{backend}"] = with_backend(backend, lambda: ops.group_norm_silu(x, w, b, groups))
            impls[DEFAULT] = lambda: ops.group_norm_silu(x, w, b, groups)
            bench.compare("group_norm_silu", f"{tuple(shape)} {layout}", dtype, impls,
                          bytes_moved=2 * x.numel() * x.element_size())


def sdpa_layout(t):
    return t.transpose(1, 2)  # (B, N, H, D) -> (B, H, N, D), a view


def sdpa_backend_impls(bench, fn):
    """SDPA letting PyTorch pick, plus forced cuDNN and flash on GPUs."""
    impls = {"eager": fn}
    if bench.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, kind in (("sdpa:cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa:flash", SDPBackend.FLASH_ATTENTION)):
            def forced(kind=kind):
                with sdpa_kernel(kind):
                    return fn()

            impls[name] = forced
    return impls


def add_xformers(impls, q, k, v, bias=None):
    try:
        import xformers.ops as xops
    except ImportError:
        return
    impls["xformers"] = lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias)


def fwd_bwd(fn, inputs):
    def run():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def bench_self_attention(bench: Bench, args, cases, dtype):
    for B, N, H, D in cases:
        q, k, v = (torch.randn(B, N, H, D, device=bench.device, dtype=dtype, requires_grad=True) for _ in range(3))
        sdpa = lambda: F.scaled_dot_product_attention(sdpa_layout(q), sdpa_layout(k), sdpa_layout(v))  # noqa: E731
        compiled_sdpa = compiled(lambda q, k, v: F.scaled_dot_product_attention(
            sdpa_layout(q), sdpa_layout(k), sdpa_layout(v)), args.compile)
        flops = 4 * B * H * N * N * D
        for mode in ("fwd", "fwd+bwd"):
            impls = sdpa_backend_impls(bench, sdpa)
            if compiled_sdpa is not None:
                impls["torch.compile"] = lambda: compiled_sdpa(q, k, v)
            add_xformers(impls, q, k, v)
            for backend in kernel_backends(bench.device):
                impls[f"ours:{backend}"] = with_backend(backend, lambda: ops.attention(q, k, v))
            impls[DEFAULT] = lambda: ops.attention(q, k, v)
            if mode == "fwd":
                with torch.no_grad():
                    bench.compare("attention fwd", f"B{B} N{N} H{H} D{D}", dtype, impls, flops=flops)
            else:
                impls = {name: fwd_bwd(fn, (q, k, v)) for name, fn in impls.items()}
                bench.compare("attention fwd+bwd", f"B{B} N{N} H{H} D{D}", dtype, impls, flops=3.5 * flops)


def bench_cross_attention(bench: Bench, args, cases, dtype):
    for B, N, L, H, D, lengths in cases:
        dev = bench.device
        q = torch.randn(B, N, H, D, device=dev, dtype=dtype)
        k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype) for _ in range(2))
        key_lengths = torch.tensor(lengths, dtype=torch.int32, device=dev)
        mask = (torch.arange(L, device=dev)[None, :] < key_lengths[:, None].long()).view(B, 1, 1, L)
        qt, kt, vt = sdpa_layout(q), sdpa_layout(k), sdpa_layout(v)
        impls = {"eager": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)}
        compiled_sdpa = compiled(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), args.compile)
        if compiled_sdpa is not None:
            impls["torch.compile"] = lambda: compiled_sdpa(qt, kt, vt, mask)

        def per_sample():  # padding-free: each sample attends to its own keys only
            return [F.scaled_dot_product_attention(qt[b:b + 1], kt[b:b + 1, :, :n], vt[b:b + 1, :, :n])
                    for b, n in enumerate(lengths) if n > 0]

        impls["sdpa per-sample"] = per_sample
        for backend in kernel_backends(dev):
            impls[f"ours:{backend}"] = with_backend(backend, lambda: ops.cross_attention(q, k, v, key_lengths))
        impls[DEFAULT] = lambda: ops.cross_attention(q, k, v, key_lengths)
        flops = 4 * H * N * D * sum(lengths)  # useful work: valid keys only
        with torch.no_grad():
            bench.compare("cross_attention", f"B{B} N{N} L{L} H{H} D{D} len{lengths}", dtype, impls, flops=flops)


def suite_ops(args, bench: Bench):
    if bench.device.type == "cuda":
        dtype = torch.bfloat16
        bench_group_norm(bench, args, [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 128, 512, 512)],
                         dtype)
        self_cases = []
        for D in (64, 128):
            for N in (1024, 2048, 4096, 8192, 16384):
                self_cases.append((16384 // N, N, 2048 // D, D))
        bench_self_attention(bench, args, self_cases, dtype)
        cross_cases = [(2, N, L, 8, 64, [L, L // 3]) for N in (4096, 16384) for L in (77, 120, 256, 300)]
        bench_cross_attention(bench, args, cross_cases, dtype)
    else:
        for _, run_case in cpu_op_cases(bench, args, args.cpu_shapes, getattr(torch, args.dtype)):
            run_case()


# The CPU ops suite's shapes, by the U-Net they come from. GroupNorm (B, C, H, W); cross-attention
# (B, N, L, H, D, key lengths); self-attention (B, N, H, D). SDXL's self-attention has B*H cut to keep
# one row under a second at 1 thread (each head is the same work; cpu_policy_table.py does the same).
CPU_OP_SHAPES = {
    "sd15": {  # SD1.5-sized; (8, 320, 64, 64) and the 512-key rows are this package's own long-caption U-Net
        "group_norm": [(8, 320, 64, 64), (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)],
        "cross_attention": [(2, 4096, 128, 8, 64, [77, 128]), (2, 1024, 77, 8, 40, [77, 20]),
                            (2, 4096, 512, 8, 64, [300, 512])],
        "attention": [(1, 1024, 8, 64), (1, 2048, 8, 40)],
    },
    "tiny": {  # the shipped tiny U-Net: batch 32, 8x8 and 4x4 maps, 32 text tokens
        "group_norm": [(32, 64, 8, 8), (32, 128, 4, 4)],
        "cross_attention": [(32, 64, 32, 2, 32, list(range(32, 0, -1)))],
        "attention": [(32, 64, 2, 32), (32, 16, 4, 32)],
    },
    "sdxl": {  # SDXL at 1024x1024: batch 2, 128x128 latents, attention at 64x64 and 32x32, head dim 64
        "group_norm": [(2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32)],
        "cross_attention": [(2, 4096, 77, 10, 64, [77, 77]), (2, 1024, 77, 20, 64, [77, 40])],
        "attention": [(1, 1024, 5, 64), (1, 4096, 2, 64)],
    },
}


def cpu_op_cases(bench: Bench, args, nets, dtype) -> list[tuple[str, Callable[[], None]]]:
    """(label, run) for each shape of CPU_OP_SHAPES[net], nets in the order given: running one adds its
    rows (every implementation; self-attention forward and forward + backward) to bench, so a caller
    with a deadline can stop between any two."""
    cases = []
    for net in nets:
        shapes = CPU_OP_SHAPES[net]
        for shape in shapes["group_norm"]:
            cases.append((f"{net} group_norm_silu {shape}", lambda s=shape: bench_group_norm(bench, args, [s], dtype)))
        for case in shapes["cross_attention"]:
            cases.append((f"{net} cross_attention {case[:5]}",
                          lambda c=case: bench_cross_attention(bench, args, [c], dtype)))
        for case in shapes["attention"]:
            cases.append((f"{net} attention {case}", lambda c=case: bench_self_attention(bench, args, [c], dtype)))
    return cases


def suite_unet(args, bench: Bench):
    import model_suites

    model_suites.suite_unet(args, bench)


def suite_pipeline(args, bench: Bench):
    import model_suites

    model_suites.suite_pipeline(args, bench)


SUITES: dict[str, Callable[[argparse.Namespace, Bench], None]] = {
    "ops": suite_ops,
    "unet": suite_unet,
    "pipeline": suite_pipeline,
}


# ------------------------------------------------------------------ command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="ops", help=f"what to time; one of: {', '.join(SUITES)} (default: ops)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and the measured limits to FILE as JSON")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to run on (default: cuda when available, else cpu)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing each implementation")
    p.add_argument("--iters", type=int, default=10, help="timed calls per implementation (the median is reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch and our kernels (default: PyTorch's default, all cores)")
    p.add_argument("--clock", choices=("wall", "thread-cpu"), default="wall",
                   help="wall: elapsed time (default). thread-cpu: CPU time of the calling thread, which other "
                        "processes' load barely disturbs; CPU device with --threads 1 only")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="ops suite on the CPU: the dtype of every row (default float32; the CUDA suite runs bfloat16)")
    p.add_argument("--cpu-shapes", default="sd15,tiny",
                   help="ops suite on the CPU: whose op shapes, comma-separated, in this order (sd15, tiny, sdxl; "
                        "default sd15,tiny)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile peers (their compilation takes minutes on a small CPU)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false",
                   help="unet/pipeline suites: skip the onnxruntime rows (they export the U-Net first)")
    p.add_argument("--shapes", default="tiny,sd15-fifth",
                   help="unet suite: which U-Nets, comma-separated (tiny: the shipped tiny U-Net at batch 32, 8x8; "
                        "sd15-fifth: SD1.5's layout at 1/5 width, random init, batch 2, 32x32)")
    p.add_argument("--busy", default="0",
                   help="pipeline suite: comma-separated counts of CPU-spinning processes to run beside the timed "
                        "calls, one set of rows per count (default 0: a quiet machine; e.g. 0,2 for quiet and "
                        "oversubscribed)")
    args = p.parse_args(argv)
    try:
        args.busy = [int(n) for n in args.busy.split(",")]
    except ValueError:
        p.error(f"--busy takes comma-separated counts such as 0,2, not {args.busy!r}")
    if any(n < 0 for n in args.busy):
        p.error("--busy counts must be >= 0")
    args.cpu_shapes = [n for n in args.cpu_shapes.split(",") if n]
    unknown = [n for n in args.cpu_shapes if n not in CPU_OP_SHAPES]
    if unknown or not args.cpu_shapes:
        p.error(f"--cpu-shapes takes some of {','.join(CPU_OP_SHAPES)}, not {unknown[0] if unknown else 'nothing'!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite not in SUITES:
        print(f"run.py: unknown suite {args.suite!r}; choose one of: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda was asked for but no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    if args.warmup < 0 or args.iters < 1:
        print("run.py: --warmup must be >= 0 and --iters >= 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("run.py: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.clock == "thread-cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        print("run.py: --clock thread-cpu measures one thread; use it with --device cpu --threads 1", file=sys.stderr)
        return 2
    bench = Bench(device, args.warmup, args.iters, args.clock)
    bench.measure_limits()
    print(f"live backends: {', '.join(ops.available_backends())}; torch {torch.__version__}; clock: {args.clock}")
    print(HEADER)
    SUITES[args.suite](args, bench)
    if args.json:
        result = {
            "suite": args.suite,
            "device": device_name(device),
            "cpu": cpu_info(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "clock": bench.clock,
            "copy_GBps": bench.copy_gbps,
            "copy_GBps_by_working_set": {str(k): v for k, v in sorted(bench._copy_peaks.items())},
            "matmul_TFLOPs": bench.matmul_tflops,
            "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "rows": [asdict(r) for r in bench.rows],
        }
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
