"""The cpu stage of benchmarks/gpu_check.py (a child process): our CPU ops against eager / SDPA on the host CPU.

    python benchmarks/gpu_check_cpu.py --rows FILE [--deadline EPOCH] [--tiny]

The lent GPU machines' host CPUs are the only AVX-512 x86 this project can reach (its dev and CI
machines are AVX2), so this runs benchmarks/run.py's CPU ops suite there: "ours (default)", the path
the dispatcher picks, next to eager GroupNorm+SiLU and SDPA (with a bool key mask for cross-attention),
fp32 and bf16. Passes, in order, while time lasts: the tiny U-Net's and SD1.5's shapes at 1 thread
(median thread CPU time), the same at 2 threads (median wall time), SDXL's at 1 thread. A shape is
started only while MIN_CASE_S, and 1.5x the longest shape so far, are left; the rest are listed as unreached. One JSON line per row, appended
as measured, each with the ISA summary, the thread count and the clock.
--tiny (the dry run): the tiny U-Net's shapes only, one warm-up and one timed call, limits from a
small copy and sgemm: the plumbing, not timings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(1, str(BENCH_DIR))

import run  # noqa: E402  (benchmarks/run.py: the shapes, the peers and the timing)
from cpu_isa import cpu_info, isa_summary, torch_cpu_capability  # noqa: E402

import dalle3_fast.ops as ops  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)
# (threads, U-Nets whose shapes run): tiny and SD1.5 at 1 thread first, as the rows are.
PASSES = ((1, ("tiny", "sd15")), (2, ("tiny", "sd15")), (1, ("sdxl",)))
TINY_PASSES = ((1, ("tiny",)), (2, ("tiny",)))
WARMUP, ITERS = 2, 5
MIN_CASE_S = 3.0


def clock_for(threads: int) -> str:
    return "thread-cpu" if threads == 1 else "wall"  # thread CPU time measures one thread only


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=Path, required=True, help="JSON-lines file the rows are appended to")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds: no shape is started after it")
    p.add_argument("--tiny", action="store_true", help="dry run: tiny shapes, one call each")
    args = p.parse_args(argv)

    def emit(record: dict) -> None:
        with open(args.rows, "a") as f:
            f.write(json.dumps({"stage": "cpu", **record}) + "\n")

    def seconds_left() -> float:
        return float("inf") if args.deadline is None else args.deadline - time.time()

    info = cpu_info()
    isa = isa_summary(info)
    emit({"kind": "host", "cpu_model": info["model"], "logical_cpus": info["logical_cpus"], "isa": isa,
          "avx512f": info["avx512f"], "torch_cpu_capability": torch_cpu_capability(), "torch": torch.__version__,
          "live_backends": ops.available_backends()})
    suite_args = run.parse_args(["--suite", "ops", "--device", "cpu", "--no-compile"])
    warmup, iters = (1, 1) if args.tiny else (WARMUP, ITERS)
    unreached = []
    longest = 0.0  # seconds of the longest shape so far
    for threads, nets in TINY_PASSES if args.tiny else PASSES:
        torch.set_num_threads(threads)
        bench = run.Bench(torch.device("cpu"), warmup, iters, clock_for(threads))
        limits_measured = False
        for net in nets:
            for dtype in DTYPES:
                dtype_name = str(dtype).removeprefix("torch.")
                for label, run_case in run.cpu_op_cases(bench, suite_args, [net], dtype):
                    if seconds_left() < max(MIN_CASE_S, 1.5 * longest):
                        unreached.append(f"{label} {dtype_name} {threads}T")
                        continue
                    if not limits_measured:  # per thread count; the 'of limit' column needs them
                        bench.measure_limits(small=args.tiny)
                        emit({"kind": "limits", "threads": threads, "copy_GBps": bench.copy_gbps,
                              "matmul_TFLOPs": bench.matmul_tflops})
                        limits_measured = True
                    first, t0 = len(bench.rows), time.monotonic()
                    run_case()
                    longest = max(longest, time.monotonic() - t0)
                    for row in bench.rows[first:]:
                        emit({"kind": "row", **asdict(row), "case": f"{row.shape} {row.dtype} {threads}T", "net": net,
                              "threads": threads, "clock": bench.clock, "isa": isa})
    emit({"kind": "unreached", "cases": unreached})
    print(f"cpu stage: {len(unreached)} shapes not reached before the deadline", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
