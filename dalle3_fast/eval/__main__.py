"""``python -m dalle3_fast.eval --pipeline DIR (--prompts FILE | --world-prompts N) [--scorer ...] [--json OUT]``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dalle3_fast.eval",
        description="Generate images for evaluation prompts and report the CLIP score (100 x cosine of image and "
                    "text embeddings, averaged) and, for scene-world prompts, the fraction of images whose "
                    "detected scene graph matches the prompt, per attribute (colour, shape, count, position, "
                    "size, background, word).")
    p.add_argument("--pipeline", default=None, help="pipeline directory (default: the embedded tiny pipeline)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt per line")
    src.add_argument("--world-prompts", type=int, metavar="N", help="N held-out scene-world prompts instead")
    p.add_argument("--world-style", default="dsc", choices=("dsc", "compositional"),
                   help="--world-prompts kind: dsc (descriptive captions of new scenes) or compositional "
                        "(colour/shape/count/position/text prompts)")
    p.add_argument("--seed", type=int, default=1, help="seed of the held-out prompts and of the image noise")
    p.add_argument("--scorer", default=None,
                   help="CLIP-score model: captioner:DIR (our CoCa's contrastive towers) or open_clip:ARCH:FILE; "
                        "default: no CLIP score")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=16, help="images generated per call (default 16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--unet-engine", default=None,
                   help="run the denoising steps on an exported U-Net: an .onnx file (onnxruntime) or a TensorRT "
                        ".plan (GPU), from python -m dalle3_fast.export --part unet")
    p.add_argument("--save-images", default=None, help="directory to write every generated image to")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dalle3_fast.pipeline import PipelineError
    from dalle3_fast.sample import UsageError, load_pipeline

    from .clip_score import load_scorer
    from .prompts import read_prompts, world_prompts
    from .run import evaluate, format_report

    try:
        if args.n < 1 or args.batch_size < 1:
            raise ValueError("--n and --batch-size must be >= 1")
        prompts = read_prompts(args.prompts) if args.prompts else world_prompts(args.world_prompts, args.seed,
                                                                                 args.world_style)
        scorer = load_scorer(args.scorer, args.device)
        pipe = load_pipeline(args.pipeline, args.device, "float32")
        if args.unet_engine:
            from dalle3_fast.export.engine_unet import use_unet_engine

            use_unet_engine(pipe, args.unet_engine)
        report = evaluate(pipe, prompts, scorer=scorer, n=args.n, seed=args.seed, steps=args.steps,
                          guidance=args.guidance, size=args.size, batch_size=args.batch_size,
                          save_images=args.save_images, progress=not args.no_progress)
    except (UsageError, PipelineError, ValueError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    report["pipeline"] = str(args.pipeline or "embedded")
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
