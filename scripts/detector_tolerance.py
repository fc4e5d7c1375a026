"""How much degradation the scene-world detector tolerates: the ceiling a decoder must clear.

    python scripts/detector_tolerance.py [--n 128] [--seed 1] [--json out.json]

Held-out images (world ``--seed``) are degraded in known ways (Gaussian blur, down- and up-sampling,
Gaussian noise); for each, the PSNR against the input and how often the detector reads the same shapes,
colours, counts and whole scene graph off the degraded image as off the input (the agreement
``scripts/eval_decoders.py`` reports for decoders). A decoder whose PSNR matches a blur row but whose
agreement is lower makes errors that move edges rather than soften them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

AGREEMENT = ("shape", "colour", "count", "all")


def degradations():
    import torch
    import torch.nn.functional as F
    from PIL import ImageFilter

    from dalle3_fast.pipeline import from_pil, to_pil

    def blur(sigma):
        return lambda images: [im.filter(ImageFilter.GaussianBlur(sigma)) for im in images]

    def resample(factor):
        def run(images):
            x = from_pil(images)
            y = F.interpolate(F.interpolate(x, scale_factor=1 / factor, mode="area"), scale_factor=factor,
                              mode="bicubic")
            return to_pil(y.clamp(-1, 1))
        return run

    def noise(std):
        def run(images):
            x = from_pil(images)
            g = torch.Generator().manual_seed(0)
            return to_pil((x + 2 * std * torch.randn(x.shape, generator=g)).clamp(-1, 1))
        return run

    return {"gaussian blur sigma 0.5 px": blur(0.5), "gaussian blur sigma 0.75 px": blur(0.75),
            "gaussian blur sigma 1.0 px": blur(1.0), "gaussian blur sigma 1.5 px": blur(1.5),
            "2x area down, bicubic up": resample(2), "4x area down, bicubic up": resample(4),
            "gaussian noise std 0.05 (of [0, 1])": noise(0.05), "gaussian noise std 0.1 (of [0, 1])": noise(0.1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/detector_tolerance.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="held-out images (default 128)")
    p.add_argument("--seed", type=int, default=1, help="scene-world seed of the held-out images (default 1)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--json", default=None, help="also write the rows here as JSON")
    args = p.parse_args(argv)
    if args.n < 1 or args.size < 8:
        p.error("--n must be >= 1 and --size >= 8")

    from dalle3_fast.data.world import compare, detect, world_sample
    from dalle3_fast.pipeline import from_pil

    images = [world_sample(args.seed, i, args.size, args.size)[0] for i in range(args.n)]
    truths = [detect(im) for im in images]
    x = from_pil(images)
    rows = {}
    for name, degrade in degradations().items():
        out = degrade(images)
        mse = (((from_pil(out) - x) / 2) ** 2).mean().item()
        agree = dict.fromkeys(AGREEMENT, 0)
        for truth, image in zip(truths, out):
            result = compare(detect(image), truth)
            for key in AGREEMENT:
                agree[key] += bool(result.get(key, True))
        rows[name] = {"psnr_db": round(10 * math.log10(1 / mse), 2) if mse > 0 else float("inf"),
                      **{k: round(v / args.n, 3) for k, v in agree.items()}}
        print(f"{name:<38} PSNR {rows[name]['psnr_db']:6.2f} dB  "
              + "  ".join(f"{k} {rows[name][k]:.3f}" for k in AGREEMENT), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "seed": args.seed, "size": args.size, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
