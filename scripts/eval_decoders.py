"""Reconstruction quality of the ways back from latents to pixels, on held-out scene-world images.

    python scripts/eval_decoders.py --pipeline dalle3_fast/assets/tiny_pipeline \
        [--teacher runs/tiny_pipeline/decoder/final] [--n 256] [--teacher-steps 50] [--json out.json]
    python scripts/eval_decoders.py --vae runs/vae_tiny/final [--size 64x64] [--n 256] [--json out.json]

``--vae DIR`` measures a bare VAE directory (diffusers AutoencoderKL format, e.g. a training run's
``final`` or an exported checkpoint) instead of a pipeline: only its decoder's row, at ``--size``.

Each image is encoded by the pipeline's VAE (posterior mode) and decoded by: the VAE decoder; the latent
decoder's teacher (the undistilled diffusion decoder, DDIM at --teacher-steps); the pipeline's distilled
2-step consistency decoder. Reported: MSE and PSNR (images in [0, 1]) against the input images, and how
often the scene-world detector reads the same shapes, colours and whole scene graph off the
reconstruction as off the input: the ceiling of what the pipeline can draw through that decoder.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from dalle3_fast.data.world import compare, detect, world_sample
from dalle3_fast.diffusion import decode_consistency, decode_ddim
from dalle3_fast.models.latent_decoder import LatentDecoder
from dalle3_fast.models.vae import AutoencoderKL
from dalle3_fast.pipeline import Dalle3Pipeline, from_pil, to_pil

AGREEMENT = ("shape", "colour", "count", "all")


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="dalle3_fast/assets/tiny_pipeline", help="pipeline directory")
    p.add_argument("--vae", default=None, help="a bare VAE directory to measure instead of --pipeline's decoders")
    p.add_argument("--size", default="64x64", help="WxH of the images with --vae (default 64x64)")
    p.add_argument("--teacher", default=None, help="directory of the undistilled latent decoder (optional)")
    p.add_argument("--teacher-steps", type=int, default=50, help="DDIM steps of the teacher (default 50)")
    p.add_argument("--n", type=int, default=256, help="held-out images (default 256)")
    p.add_argument("--seed", type=int, default=1, help="scene-world seed of the held-out images (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--json", default=None, help="write the table here as JSON")
    args = p.parse_args(argv)

    if args.vae is not None:
        if args.teacher is not None:
            p.error("--teacher needs a pipeline's VAE; drop --vae or --teacher")
        vae, decoder, size = AutoencoderKL.from_pretrained(args.vae).eval(), None, args.size
    else:
        pipe = Dalle3Pipeline.from_pretrained(args.pipeline)
        vae, decoder, size = pipe.vae, pipe.decoder, pipe.defaults["size"]
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        p.error(f"--size {size!r}: expected WxH, e.g. 64x64")
    teacher = LatentDecoder.from_pretrained(args.teacher).eval() if args.teacher else None
    decoders = {"vae decoder": lambda z, g: vae.decode(z)}
    if teacher is not None:
        decoders[f"teacher, DDIM {args.teacher_steps} steps"] = \
            lambda z, g: decode_ddim(teacher, z, args.teacher_steps, generator=g)
    if decoder is not None:
        decoders["distilled, 2 steps"] = lambda z, g: decode_consistency(decoder, z, generator=g,
                                                                         num_inference_steps=2)
    sums = dict.fromkeys(decoders, 0.0)
    agree = {name: dict.fromkeys(AGREEMENT, 0) for name in decoders}
    with torch.no_grad():
        for start in range(0, args.n, args.batch_size):
            images = [world_sample(args.seed, i, w, h)[0] for i in range(start, min(start + args.batch_size, args.n))]
            truths = [detect(image) for image in images]
            x = from_pil(images)
            z = vae.encode(x).mode()
            for name, decode in decoders.items():
                y = decode(z, torch.Generator().manual_seed(start)).clamp(-1, 1)
                sums[name] += (((y - x) / 2) ** 2).mean(dim=(1, 2, 3)).sum().item()
                for truth, recon in zip(truths, to_pil(y)):
                    result = compare(detect(recon), truth)
                    for key in AGREEMENT:
                        agree[name][key] += bool(result.get(key, True))
    rows = {name: {"mse": total / args.n, "psnr_db": psnr(total / args.n),
                   "detector_agreement": {k: v / args.n for k, v in agree[name].items()}}
            for name, total in sums.items()}
    print(f"{args.n} held-out {w}x{h} scene-world images (seed {args.seed}); images in [0, 1]; detector agreement "
          f"with the input on {', '.join(AGREEMENT)}")
    for name, r in rows.items():
        a = r["detector_agreement"]
        print(f"  {name:<28} MSE {r['mse']:.5f}  PSNR {r['psnr_db']:.2f} dB  "
              + "  ".join(f"{k} {a[k]:.3f}" for k in AGREEMENT))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "seed": args.seed, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
