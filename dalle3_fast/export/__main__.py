"""Export a part of a pipeline to ONNX (and optionally a TensorRT engine), verified against PyTorch.

    python -m dalle3_fast.export --pipeline DIR --part decoder --onnx decoder.onnx [--tensorrt decoder.plan]
    python -m dalle3_fast.export --pipeline DIR --part unet --onnx unet.onnx --dtype fp16

Parts: ``decoder`` (the 2-step consistency decoder as one graph; inputs latents, noise_0, noise_1),
``unet`` (one denoising step; sample, timestep, encoder_hidden_states, encoder_lengths), ``vae-decoder``.
Batch, image size and token count are dynamic. The ONNX file is checked with onnx.checker and run with
onnxruntime on random inputs at two sizes; the command fails if the relative error exceeds the dtype's bound.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    from dalle3_fast.export.graphs import PARTS
    from dalle3_fast.export.onnx_export import DEFAULT_OPSET

    p = argparse.ArgumentParser(prog="python -m dalle3_fast.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--pipeline", default=None,
                   help="pipeline directory (model_index.json); default: the embedded tiny pipeline")
    p.add_argument("--part", required=True, choices=PARTS, help="which model to export")
    p.add_argument("--onnx", required=True, help="ONNX file to write")
    p.add_argument("--tensorrt", default=None, help="also build a TensorRT engine (plan file) from the ONNX file")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and activations dtype")
    p.add_argument("--min-size", default=None, help="smallest image size WxH the graph/engine serves "
                   "(default: half the pipeline's smallest size)")
    p.add_argument("--opt-size", default=None, help="image size WxH to trace at and optimise the engine for "
                   "(default: the pipeline's default size)")
    p.add_argument("--max-size", default=None, help="largest image size WxH (default: twice the pipeline's largest)")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch of the dynamic batch dimension")
    p.add_argument("--opt-batch", type=int, default=1, help="batch the TensorRT profile is optimised for")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--device", default="cpu", help="device to trace on (cpu is enough; cuda for --tensorrt checks)")
    p.add_argument("--json", default=None, help="write the verification figures to this JSON file")
    return p.parse_args(argv)


def _size(text: str, flag: str) -> tuple[int, int]:
    from dalle3_fast.pipeline import PipelineError, parse_size

    try:
        return parse_size(text)
    except PipelineError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def resolve_sizes(args, pipe) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(min, opt, max) image sizes, each a multiple of the pipeline's size multiple, min <= opt <= max."""
    sizes = [pipe.check_size(s) for s in pipe.sizes]
    multiple = pipe.size_multiple

    def snap(v):
        return max(multiple, v // multiple * multiple)

    opt = _size(args.opt_size, "--opt-size") if args.opt_size else pipe.check_size(pipe.defaults["size"])
    lo = _size(args.min_size, "--min-size") if args.min_size else (
        snap(min(s[0] for s in sizes) // 2), snap(min(s[1] for s in sizes) // 2))
    hi = _size(args.max_size, "--max-size") if args.max_size else (
        2 * max(s[0] for s in sizes), 2 * max(s[1] for s in sizes))
    for flag, (w, h) in (("--min-size", lo), ("--opt-size", opt), ("--max-size", hi)):
        if w % multiple or h % multiple:
            raise ValueError(f"{flag} {w}x{h} is not a multiple of {multiple} on both sides")
    if not (lo[0] <= opt[0] <= hi[0] and lo[1] <= opt[1] <= hi[1]):
        raise ValueError(f"sizes must satisfy --min-size <= --opt-size <= --max-size per side; got "
                         f"{lo[0]}x{lo[1]}, {opt[0]}x{opt[1]}, {hi[0]}x{hi[1]}")
    return lo, opt, hi


def run(args) -> dict:
    from dalle3_fast.export import graphs, onnx_export
    from dalle3_fast.pipeline import Dalle3Pipeline

    if args.max_batch < 1 or not 1 <= args.opt_batch <= args.max_batch:
        raise ValueError(f"--max-batch {args.max_batch} / --opt-batch {args.opt_batch}: need 1 <= opt <= max")
    if args.tensorrt:
        from dalle3_fast.export.tensorrt import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason:
            raise RuntimeError(f"--tensorrt: {reason}")
    directory = args.pipeline or default_pipeline_dir()
    dtype = DTYPES[args.dtype]
    pipe = Dalle3Pipeline.from_pretrained(directory, device=args.device, dtype=dtype)
    lo, opt, hi = resolve_sizes(args, pipe)
    spec = graphs.part_spec(pipe, args.part, dtype)
    report = {"part": args.part, "dtype": args.dtype, "opset": args.opset, "onnx": str(args.onnx),
              "sizes": {"min": lo, "opt": opt, "max": hi}, "max_batch": args.max_batch}
    t0 = time.perf_counter()
    onnx_export.export_onnx(spec, args.onnx, opt_size=opt, min_size=lo, max_size=hi, max_batch=args.max_batch,
                            opset=args.opset)
    report["export_s"] = time.perf_counter() - t0
    onnx_export.check_onnx(args.onnx)
    report["onnx_bytes"] = Path(args.onnx).stat().st_size
    print(f"[export] {args.part} -> {args.onnx} ({report['onnx_bytes'] / 2**20:.1f} MiB, "
          f"{report['export_s']:.1f} s); onnx.checker passed", file=sys.stderr)
    if not args.no_verify and args.device == "cpu":
        if dtype == torch.bfloat16:
            print("[export] verification skipped: onnxruntime's CPU provider has no bfloat16 kernels",
                  file=sys.stderr)
        else:
            other = lo if lo != opt else hi
            rows = onnx_export.verify_onnx(spec, args.onnx, [opt, other], [2, 1])
            report["verify"] = rows
            bound = onnx_export.TOLERANCES[dtype]
            for r in rows:
                print(f"[export] onnxruntime vs PyTorch at {r['size']} batch {r['batch']}: rel err "
                      f"{r['rel_err']:.2e} (bound {bound:.0e}); ort {r['ort_ms']:.1f} ms, torch {r['torch_ms']:.1f} ms",
                      file=sys.stderr)
            worst = max(r["rel_err"] for r in rows)
            if not worst <= bound:
                raise AssertionError(f"onnxruntime differs from PyTorch by {worst:.2e} > {bound:.0e}")
    if args.tensorrt:
        report["tensorrt"] = build_and_check_engine(args, pipe, spec, lo, opt, hi)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_and_check_engine(args, pipe, spec, lo, opt, hi) -> dict:
    """Build the plan, run it on CUDA inputs at the opt and min sizes, compare with PyTorch on the GPU."""
    from dalle3_fast.export import onnx_export
    from dalle3_fast.export.tensorrt import TRTEngine, build_engine, profile_shapes

    t0 = time.perf_counter()
    shapes = profile_shapes(spec, min_size=lo, opt_size=opt, max_size=hi, max_batch=args.max_batch,
                            opt_batch=args.opt_batch)
    build_engine(args.onnx, args.tensorrt, shapes)
    out = {"plan": str(args.tensorrt), "build_s": time.perf_counter() - t0, "profile": shapes, "checks": []}
    engine = TRTEngine(args.tensorrt)
    spec.module.to("cuda")
    for (w, h), b in ((opt, args.opt_batch), (lo, 1)):
        inputs = {k: v.cuda() for k, v in spec.inputs(b, w, h, seed=1).items()}
        with torch.no_grad():
            ref = spec.module(**inputs).float().cpu().numpy()
        got = engine(**inputs)[spec.output_names[0]].float().cpu().numpy()
        err = onnx_export.relative_error(got, ref)
        out["checks"].append({"size": f"{w}x{h}", "batch": b, "rel_err": err})
        print(f"[export] TensorRT vs PyTorch (cuda) at {w}x{h} batch {b}: rel err {err:.2e}", file=sys.stderr)
    print(f"[export] engine written to {args.tensorrt} ({out['build_s']:.0f} s)", file=sys.stderr)
    return out


def default_pipeline_dir() -> Path:
    directory = Path(__file__).resolve().parents[1] / "assets" / "tiny_pipeline"
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(f"no --pipeline given and the embedded pipeline {directory} is missing; build it "
                                "with scripts/build_tiny_pipeline.py or pass --pipeline DIR")
    return directory


def main(argv=None) -> int:
    args = parse_args(argv)
    from dalle3_fast.io import CheckpointError

    try:
        run(args)
    except CheckpointError as exc:  # a damaged pipeline directory
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError, AssertionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
