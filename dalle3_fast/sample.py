"""``python -m dalle3_fast.sample --prompt "a red circle above a blue square"``: text -> PNG.

Without ``--pipeline`` the embedded tiny pipeline (dalle3_fast/assets/tiny_pipeline, trained on the
scene world at 64x64) draws the image. Prints the revised prompt, the seed(s) and the time per stage.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class UsageError(Exception):
    """A request this command refuses; printed as one line."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dalle3_fast.sample",
        description="Generate images from a text prompt and write them as PNG files.",
        epilog="Prompts longer than the text encoder's token limit are truncated with a warning; --no-truncate "
               "refuses them instead. Errors (unknown size, steps < 1, a missing or corrupt pipeline directory, "
               "a prompt over the limit with --no-truncate) print one line on stderr and exit with status 2.")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--pipeline", default=None,
                   help="pipeline directory (model_index.json + parts); default: the embedded tiny pipeline")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels, e.g. 64x64 (default: the pipeline's; "
                                                "each side a multiple of the VAE and U-Net downsampling)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; 1 disables guidance (default: the pipeline's)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: the empty prompt)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (image i uses seed + i); "
                                                          "default: a random one, printed")
    p.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--sampler", default=None, choices=("ddim", "euler", "dpmpp_2m"),
                   help="sampler (default: the pipeline's, dpmpp_2m)")
    p.add_argument("--upsample", default="none", choices=("none", "local", "openai"),
                   help="rewrite the prompt into a descriptive caption first: none, local (the pipeline's small "
                        "seq2seq, no network) or openai (an OpenAI-compatible chat endpoint; see --upsample-*)")
    p.add_argument("--upsample-base-url", default=None, help="openai upsampler: base URL (default $OPENAI_BASE_URL)")
    p.add_argument("--upsample-model", default=None, help="openai upsampler: model (default $DALLE3_UPSAMPLE_MODEL)")
    p.add_argument("--decoder", default=None, choices=("vae", "consistency"),
                   help="latents -> pixels: the VAE decoder or the 2-step consistency decoder (default: the pipeline's)")
    p.add_argument("--decoder-engine", default=None,
                   help="decode with an exported 2-step decoder instead of the PyTorch one: a .onnx file "
                        "(onnxruntime) or a TensorRT .plan, from `python -m dalle3_fast.export --part decoder`; "
                        "implies --decoder consistency")
    p.add_argument("--unet-engine", default=None,
                   help="run every denoising step on an exported U-Net instead of the PyTorch one: a .onnx file "
                        "(onnxruntime, CPU) or a TensorRT .plan (GPU), from `python -m dalle3_fast.export --part unet`")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="U-Net/VAE/decoder precision (default float32)")
    p.add_argument("--no-truncate", action="store_true",
                   help="refuse a prompt longer than the text encoder's token limit instead of truncating it")
    p.add_argument("--out", default="out.png",
                   help="output PNG path (default out.png); with --n > 1, OUT-0.png, OUT-1.png, ...")
    return p.parse_args(argv)


def output_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out {out!r} must end in .png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def quiet_transformers() -> None:
    """transformers' weight-loading progress bars and notices are noise on a CLI's stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_pipeline(directory, device: str, dtype_name: str):
    import torch

    from dalle3_fast.assets import TINY_PIPELINE
    from dalle3_fast.pipeline import MODEL_INDEX, Dalle3Pipeline

    directory = Path(directory) if directory is not None else TINY_PIPELINE
    if not (directory / MODEL_INDEX).is_file():
        where = "the embedded pipeline is not installed (run scripts/build_tiny_pipeline.py)" if \
            directory == TINY_PIPELINE else "pass a directory written by Dalle3Pipeline.save_pretrained"
        raise UsageError(f"pipeline directory {str(directory)!r} has no {MODEL_INDEX}; {where}")
    quiet_transformers()
    try:
        return Dalle3Pipeline.from_pretrained(directory, device=device, dtype=getattr(torch, DTYPES[dtype_name]))
    except Exception as exc:  # any failure to read the parts means a corrupt or incomplete directory
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise UsageError(f"cannot load the pipeline in {str(directory)!r} (corrupt or incomplete): {detail}") from exc


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def run(args) -> int:
    import random

    import torch

    from dalle3_fast.pipeline import PipelineError, parse_size
    from dalle3_fast.upsample import OpenAIUpsampler

    if args.n < 1:
        raise UsageError(f"--n {args.n} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps} must be >= 1")
    if args.size is not None:
        try:
            parse_size(args.size)
        except PipelineError as exc:
            raise UsageError(f"--size: {exc}") from exc
    paths = output_paths(args.out, args.n)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)

    t0 = time.perf_counter()
    pipe = load_pipeline(args.pipeline, args.device, args.dtype)
    try:
        if args.decoder_engine is not None:
            from dalle3_fast.export import use_decoder_engine

            use_decoder_engine(pipe, Path(args.decoder_engine))
        if args.unet_engine is not None:
            from dalle3_fast.export.engine_unet import use_unet_engine

            use_unet_engine(pipe, Path(args.unet_engine))
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    load_s = time.perf_counter() - t0
    try:
        pipe.check_size(args.size or pipe.defaults["size"])
        upsampler = None
        if args.upsample == "local":
            if pipe.upsampler is None:
                raise UsageError("this pipeline has no local upsampler; use --upsample none or openai")
            upsampler = pipe.upsampler
        elif args.upsample == "openai":
            upsampler = OpenAIUpsampler(args.upsample_base_url, args.upsample_model)
        out = pipe(args.prompt, negative_prompt=args.negative_prompt, size=args.size, steps=args.steps,
                   guidance=args.guidance, seed=seed, n=args.n, sampler=args.sampler, decoder=args.decoder,
                   upsampler=upsampler, truncate=not args.no_truncate)
    except (PipelineError, ValueError, RuntimeError) as exc:
        raise UsageError(" ".join(str(exc).split())) from exc

    t0 = time.perf_counter()
    for image, path in zip(out.images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    png_s = time.perf_counter() - t0

    t = out.timings
    steps = args.steps if args.steps is not None else pipe.defaults["steps"]
    if args.upsample != "none":
        print(f"revised prompt: {out.revised_prompts[0]}")
    else:
        print(f"prompt: {out.revised_prompts[0]}")
    print(f"seed{'s' if len(out.seeds) > 1 else ''}: {', '.join(map(str, out.seeds))}")
    w, h = out.images[0].size
    print(f"size: {w}x{h}  steps: {steps}  device: {args.device}  dtype: {args.dtype}")
    print(f"time: load {load_s:.2f}s | upsample {t.get('upsample_s', 0):.2f}s | text encoder "
          f"{t['text_encoder_s']:.3f}s | U-Net {t['denoise_s']:.2f}s ({steps / max(t['denoise_s'], 1e-9):.1f} steps/s) "
          f"| decoder {t['decode_s']:.3f}s | PNG {png_s:.3f}s")
    for path in paths:
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.showwarning = _one_line_warnings
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
