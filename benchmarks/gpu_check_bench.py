"""Benchmarks of benchmarks/gpu_check.py (run as a child process; one JSON line per row, appended as measured).

    python benchmarks/gpu_check_bench.py --rows FILE [--deadline EPOCH] [--tiny]

bf16 on the GPU: GroupNorm+SiLU (GB/s, % of the measured device-to-device copy), self-attention
(TFLOP/s, FLOPs 4*B*H*N*N*D forward, 3.5x that forward+backward), varlen cross-attention (useful
FLOPs over the valid keys), against eager PyTorch, torch.compile and SDPA's flash / cuDNN / efficient
backends; an SD1.5-sized U-Net step (batch 2, 64x64 latents, 77 tokens) and the 2-step latent
decoder (OpenAI-size, 512x512), ours vs our reference backend vs torch.compile. Random weights.
Timing: triton.testing.do_bench (CUDA events, L2 flushed before each call), median after warm-up.
--tiny: every function at tiny shapes on the CPU, once (the dry run); torch.compile there uses the
"eager" backend (tracing only), which proves the plumbing without minutes of C++ compilation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dalle3_fast.ops as ops  # noqa: E402
from dalle3_fast.ops import reference  # noqa: E402

# Rough seconds of one torch.compile (inductor, 16 cores) of each model: skipped when less time is left.
COMPILE_ESTIMATE_S = {"unet": 150, "decoder": 90}


class Bench:
    def __init__(self, args):
        self.tiny = args.tiny
        self.rows_file = args.rows
        self.deadline = args.deadline
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.compile_backend = "eager" if args.tiny else "inductor"
        self.copy_gbps = None
        self.matmul_tflops = None
        self._do_bench = None
        if not self.tiny:
            try:
                from triton.testing import do_bench

                self._do_bench = do_bench
            except ImportError:
                self._do_bench = None

    # -------------------------------------------------------------- time

    def seconds_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def time_ms(self, fn, rep_ms: float = 60.0) -> float:
        if self.tiny:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        if self._do_bench is not None:
            return float(self._do_bench(fn, warmup=max(10.0, rep_ms / 4), rep=rep_ms, return_mode="median"))
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def emit(self, row: dict) -> None:
        with open(self.rows_file, "a") as f:
            f.write(json.dumps({"stage": "bench", **row}) + "\n")

    def measure_limits(self) -> None:
        n_bytes, mm_n = (1 << 24, 512) if self.tiny else (1 << 30, 8192)
        src = torch.empty(n_bytes // 4, device=self.device, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        self.copy_gbps = 2 * n_bytes / self.time_ms(lambda: dst.copy_(src), 200) / 1e6
        del src, dst
        a = torch.randn(mm_n, mm_n, device=self.device, dtype=self.dtype)
        b = torch.randn(mm_n, mm_n, device=self.device, dtype=self.dtype)
        self.matmul_tflops = 2 * mm_n**3 / self.time_ms(lambda: a @ b, 200) / 1e9
        del a, b
        self.emit({"kind": "limits", "copy_GBps": self.copy_gbps, "matmul_TFLOPs": self.matmul_tflops,
                   "dtype": str(self.dtype).removeprefix("torch."), "copy_bytes": n_bytes, "matmul_n": mm_n,
                   "device": torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu"})
        print(f"limits: copy {self.copy_gbps:.0f} GB/s, matmul {self.matmul_tflops:.1f} TFLOP/s", flush=True)

    def compare(self, op: str, case: str, impls: dict, *, baseline: str = "eager", bytes_moved=None, flops=None,
                goal: str | None = None, rep_ms: float = 60.0, skipped: dict | None = None,
                base_ms: float | None = None) -> dict:
        """Time every impl (a failing one is reported with its error) and emit a row each."""
        results = {}
        for name, fn in impls.items():
            try:
                results[name] = (self.time_ms(fn, rep_ms), "")
            except Exception as exc:  # noqa: BLE001  (a peer refusing these inputs is a row, not a crash)
                if is_sticky_cuda_error(exc):
                    raise
                results[name] = (None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc)
                                 else type(exc).__name__)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        for name, why in (skipped or {}).items():
            results[name] = (None, why)
        base = results.get(baseline, (base_ms, ""))[0]
        for name, (ms, note) in results.items():
            row = {"kind": "row", "op": op, "case": case, "dtype": str(self.dtype).removeprefix("torch."),
                   "impl": name, "ms": ms, "speedup": base / ms if ms and base else None, "note": note}
            if goal:
                row["goal"] = goal
            if ms and flops is not None:
                row["tflops"] = flops / (ms * 1e9)
                row["fraction_of_matmul"] = row["tflops"] / self.matmul_tflops
            if ms and bytes_moved is not None:
                row["gbps"] = bytes_moved / (ms * 1e6)
                row["fraction_of_copy"] = row["gbps"] / self.copy_gbps
            self.emit(row)
            print(f"{op} {case} {name}: {'n/a' if ms is None else f'{ms:.3f} ms'} {note}", flush=True)
        return {name: ms for name, (ms, _) in results.items()}

    def compiled(self, fn):
        return torch.compile(fn, dynamic=False, backend=self.compile_backend)

    def kernel_backends(self) -> list[str]:
        live = ops.available_backends()
        wanted = ("cpu",) if self.device.type == "cpu" else ("cuda", "triton")
        return [b for b in wanted if b in live]

    def randn(self, *shape, requires_grad=False):
        return torch.randn(*shape, device=self.device, dtype=self.dtype, requires_grad=requires_grad)


def is_sticky_cuda_error(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("illegal memory access", "misaligned address", "unspecified launch failure",
                                   "device-side assert", "an illegal instruction"))


def with_backend(backend: str, fn):
    def run():
        with ops.use_backend(backend):
            return fn()

    return run


def sdpa_kernels(fn, kinds: dict) -> dict:
    from torch.nn.attention import sdpa_kernel

    impls = {}
    for name, kind in kinds.items():
        def forced(kind=kind):
            with sdpa_kernel(kind):
                return fn()

        impls[name] = forced
    return impls


def sdpa_backends(prefix: str, fn, with_flash: bool) -> dict:
    from torch.nn.attention import SDPBackend

    kinds = {f"{prefix}:cudnn": SDPBackend.CUDNN_ATTENTION, f"{prefix}:efficient": SDPBackend.EFFICIENT_ATTENTION}
    if with_flash:
        kinds[f"{prefix}:flash"] = SDPBackend.FLASH_ATTENTION
    return sdpa_kernels(fn, kinds)


def bhnd(t):
    return t.transpose(1, 2)  # (B, N, H, D) -> (B, H, N, D), a view


# ------------------------------------------------------------------ ops


def eager_group_norm_silu(x, weight, bias):
    return F.silu(F.group_norm(x, 32, weight, bias, 1e-5))


GN_SHAPES = [(2, 320, 64, 64), (2, 640, 128, 128), (1, 128, 512, 512)]
GN_SHAPES_TINY = [(2, 64, 8, 8)]


def bench_group_norm(b: Bench) -> None:
    compiled_gn = b.compiled(eager_group_norm_silu)
    for shape in GN_SHAPES_TINY if b.tiny else GN_SHAPES:
        for layout in ("nchw", "channels_last"):
            x = b.randn(*shape)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            w, bias = b.randn(shape[1]), b.randn(shape[1])
            impls = {"eager": lambda: eager_group_norm_silu(x, w, bias),
                     "torch.compile": lambda: compiled_gn(x, w, bias)}
            for backend in b.kernel_backends():
                impls[f"ours:{backend}"] = with_backend(backend, lambda: ops.group_norm_silu(x, w, bias, 32))
            nbytes = x.numel() * x.element_size()
            b.compare("group_norm_silu", f"{shape} {layout}", impls, bytes_moved=2 * nbytes,
                      goal="gn" if nbytes >= 32 * 2**20 or b.tiny else None)
            del x


def scores_too_large(B, H, N, L) -> str | None:
    if B * H * N * L > 2**31:
        return f"skipped: the {B}x{H}x{N}x{L} scores need {B * H * N * L * 4 / 2**30:.0f} GiB in fp32"
    return None


# (B, N, H, D): SD1.5 levels 0 and 1 at 64x64 latents; the T5 generator's level 0 at 128x128 (D=64, the goal).
ATTN_CASES = [(2, 16384, 5, 64), (2, 4096, 8, 40), (2, 1024, 8, 80)]
ATTN_CASES_TINY = [(1, 64, 2, 64)]
ATTN_BWD_CASES = [(2, 4096, 8, 40), (2, 16384, 5, 64)]


def attention_impls(b: Bench, q, k, v, with_eager: bool) -> tuple[dict, dict]:
    B, N, H, D = q.shape
    sdpa = lambda: bhnd(F.scaled_dot_product_attention(bhnd(q), bhnd(k), bhnd(v)))  # noqa: E731  (B, N, H, D) out
    impls, skipped = {}, {}
    too_large = scores_too_large(B, H, N, N)
    if with_eager and not too_large:
        compiled_ref = b.compiled(reference.attention)
        impls["eager"] = lambda: reference.attention(q, k, v)
        impls["torch.compile"] = lambda: compiled_ref(q, k, v)
    elif too_large:
        skipped = {"eager": too_large, "torch.compile": too_large}
    impls["sdpa"] = sdpa
    if b.device.type == "cuda":
        impls.update(sdpa_backends("sdpa", sdpa, with_flash=True))
    for backend in b.kernel_backends():
        impls[f"ours:{backend}"] = with_backend(backend, lambda: ops.attention(q, k, v))
    return impls, skipped


def bench_attention(b: Bench) -> None:
    for B, N, H, D in ATTN_CASES_TINY if b.tiny else ATTN_CASES:
        q, k, v = (b.randn(B, N, H, D) for _ in range(3))
        impls, skipped = attention_impls(b, q, k, v, with_eager=True)
        with torch.no_grad():
            b.compare("attention fwd", f"B{B} N{N} H{H} D{D}", impls, flops=4 * B * H * N * N * D,
                      goal="attention" if D == 64 else None, skipped=skipped)


def bench_attention_backward(b: Bench) -> None:
    for B, N, H, D in ATTN_CASES_TINY if b.tiny else ATTN_BWD_CASES:
        q, k, v = (b.randn(B, N, H, D, requires_grad=True) for _ in range(3))
        grad = b.randn(B, N, H, D)
        impls, skipped = attention_impls(b, q, k, v, with_eager=True)
        impls = {name: (lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad)) for name, fn in impls.items()}
        b.compare("attention fwd+bwd", f"B{B} N{N} H{H} D{D}", impls, flops=3.5 * 4 * B * H * N * N * D,
                  skipped=skipped)


# (B, N, L, H, D, key lengths): SD1.5 level 0 with 77 tokens, the T5 generator's level 0 with 120, long L.
CROSS_CASES = [(2, 4096, 77, 8, 40, [77, 20]), (2, 16384, 120, 5, 64, [120, 33]), (2, 1024, 512, 8, 80, [512, 100])]
CROSS_CASES_TINY = [(2, 64, 77, 2, 40, [77, 20])]


def bench_cross_attention(b: Bench) -> None:
    for B, N, L, H, D, lengths in CROSS_CASES_TINY if b.tiny else CROSS_CASES:
        q = b.randn(B, N, H, D)
        k, v = (b.randn(B, L, H, D) for _ in range(2))
        key_lengths = torch.tensor(lengths, dtype=torch.int32, device=b.device)
        mask = (torch.arange(L, device=b.device)[None, :] < key_lengths[:, None].long()).view(B, 1, 1, L)
        qt, kt, vt = bhnd(q), bhnd(k), bhnd(v)
        masked = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)  # noqa: E731
        compiled_masked = b.compiled(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m))
        impls = {"eager": lambda: reference.cross_attention(q, k, v, key_lengths),
                 "torch.compile": lambda: compiled_masked(qt, kt, vt, mask),
                 "sdpa+mask": masked}
        if b.device.type == "cuda":
            impls.update(sdpa_backends("sdpa+mask", masked, with_flash=False))

        def per_sample():  # padding-free: each sample attends to its own keys
            return [F.scaled_dot_product_attention(qt[i:i + 1], kt[i:i + 1, :, :n], vt[i:i + 1, :, :n])
                    for i, n in enumerate(lengths) if n > 0]

        impls["sdpa per-sample"] = per_sample
        for backend in b.kernel_backends():
            impls[f"ours:{backend}"] = with_backend(backend, lambda: ops.cross_attention(q, k, v, key_lengths))
        with torch.no_grad():
            b.compare("cross_attention", f"B{B} N{N} L{L} H{H} D{D} len{lengths}", impls,
                      flops=4 * H * N * D * sum(lengths), goal="cross_attention")


# ------------------------------------------------------------------ models


def _model_impls(b: Bench, step, model) -> dict:
    impls = {"ours": lambda: step(model)}
    for backend in b.kernel_backends():
        impls[f"ours:{backend}"] = with_backend(backend, lambda: step(model))
    impls["reference"] = with_backend("reference", lambda: step(model))
    return impls


def make_unet(b: Bench):
    """The U-Net, a description, and step(model) -> one denoising step of `model` (the U-Net or its compiled form)."""
    from dalle3_fast.models.unet import UNet

    name, batch, size, tokens, width = ("tiny", 2, 8, 7, 64) if b.tiny else ("sd15", 2, 64, 77, 768)
    case = f"{name} B{batch} {size}x{size} latents {tokens} tokens"
    with b.device:  # random init where it runs: 860M parameters initialise in seconds on a GPU, not on 1 CPU core
        unet = UNet(name)
    unet = unet.to(b.device, b.dtype).eval()
    sample = b.randn(batch, 4, size, size)
    t = torch.full((batch,), 500, device=b.device, dtype=torch.int64)
    text = b.randn(batch, tokens, width)
    lengths = torch.full((batch,), tokens, dtype=torch.int32, device=b.device)
    with torch.no_grad():
        text_kv = unet.precompute_text_kv(text, lengths)  # once per sampling call, as the sampler does
    return unet, case, (lambda model: model(sample, t, text_kv=text_kv))


def make_decoder(b: Bench):
    """The decoder, a description, and step(decoder_unet) -> a 2-step decode running that network."""
    from dalle3_fast.diffusion import decode_consistency
    from dalle3_fast.models.latent_decoder import LatentDecoder

    if b.tiny:
        decoder, z = LatentDecoder("tiny"), b.randn(1, 4, 4, 4)
        case = "tiny B1 4x4 latents, 2 steps"
    else:
        decoder, z = LatentDecoder("openai", with_encoder=False), b.randn(1, 4, 64, 64)
        case = "openai B1 64x64 latents -> 512x512, 2 steps"
    decoder = decoder.to(b.device, b.dtype).eval()
    network = decoder.decoder_unet

    def step(unet):
        decoder.decoder_unet = unet
        try:
            return decode_consistency(decoder, z, num_inference_steps=2)
        finally:
            decoder.decoder_unet = network

    return network, case, step


def bench_model(b: Bench, op: str, make, goal: str | None, rep_ms: float) -> tuple:
    model, case, step = make(b)
    with torch.no_grad():
        times = b.compare(op, case, _model_impls(b, step, model), baseline="reference", goal=goal, rep_ms=rep_ms)
    return model, case, step, times.get("reference")


def bench_model_compiled(b: Bench, op: str, kind: str, model, case: str, step, reference_ms, rep_ms: float) -> None:
    """torch.compile of the network on our reference backend (what PyTorch alone gives), then on ours.

    Each is one compilation (minutes for the full-size models), skipped with a note when the
    stage's deadline is nearer than that.
    """
    for name, backend in (("torch.compile(reference)", "reference"), ("torch.compile(ours)", None)):
        need = 0 if b.tiny else COMPILE_ESTIMATE_S[kind]
        if b.seconds_left() < need:
            skipped = {name: f"skipped: ~{need} s of compilation, {b.seconds_left():.0f} s left"}
            b.compare(op, case, {}, baseline="reference", base_ms=reference_ms, skipped=skipped)
            continue
        compiled = torch.compile(model, dynamic=False, backend=b.compile_backend)
        run = (lambda: step(compiled)) if backend is None else with_backend(backend, lambda: step(compiled))
        with torch.no_grad():
            b.compare(op, case, {name: run}, baseline="reference", base_ms=reference_ms, rep_ms=rep_ms)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", required=True, help="JSON-lines file the rows are appended to")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds: optional work is skipped after it")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, one repetition (the dry run)")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check_bench.py: no CUDA device; use --tiny for the CPU dry run", file=sys.stderr)
        return 2
    for name in ("recompile_limit", "cache_size_limit"):  # one compiled function per shape, many shapes
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    torch.manual_seed(0)
    b = Bench(args)
    print(f"live backends: {', '.join(ops.available_backends())}; torch {torch.__version__}", flush=True)
    b.measure_limits()
    bench_group_norm(b)
    bench_attention(b)
    bench_cross_attention(b)
    unet = bench_model(b, "unet step", make_unet, "unet", rep_ms=300)
    decoder = bench_model(b, "decoder 2-step", make_decoder, None, rep_ms=300)
    bench_attention_backward(b)
    bench_model_compiled(b, "unet step", "unet", *unet, rep_ms=300)
    del unet
    bench_model_compiled(b, "decoder 2-step", "decoder", *decoder, rep_ms=300)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
