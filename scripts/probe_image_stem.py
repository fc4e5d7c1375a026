"""Can the captioner's image encoder see shapes? A 6-way shape probe on single-object scene-world images.

    python scripts/probe_image_stem.py --stem patch --stem conv --steps 300 --json out/stem_probe.json

For each ``--stem`` it builds the CoCa image encoder of ``CoCaConfig.tiny(image_stem=STEM)`` (stem to an
8x8 token grid, 2 transformer layers, attentional pooler), puts a linear 6-way head on its pooled
(contrastive) embedding, and trains both from scratch with AdamW on batches of freshly drawn
one-object images (world seed 0; no word). It reports shape accuracy on ``--test`` images of world seed 1
(chance 1/6) and the median thread CPU time per training step. Same seed, data and steps for every stem.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

STEMS = {"patch": {"image_stem": "patch"}, "conv": {"image_stem": "conv"},
         "conv-deep": {"image_stem": "conv", "conv_stem_depth": 2}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/probe_image_stem.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stem", action="append", choices=tuple(STEMS), help="image stem(s) to probe (repeatable); conv-deep: conv_stem_depth 2")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--test", type=int, default=500, help="held-out test images (default 500)")
    p.add_argument("--size", type=int, default=64, help="image side (default 64)")
    p.add_argument("--seed", type=int, default=0, help="model init seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.stem = args.stem or ["patch", "conv"]
    if min(args.steps, args.batch_size, args.test, args.threads) < 1 or args.size < 24:
        p.error("--steps, --batch-size, --test and --threads must be >= 1 and --size >= 24")
    return args


def one_object_images(world_seed: int, start: int, n: int, size: int):
    """(images (n, 3, size, size) in [-1, 1], shape labels (n,)) of one-object scenes without a word."""
    import torch

    from dalle3_fast.data.buckets import image_to_tensor
    from dalle3_fast.data.world import SHAPES, render, sample_scene, scene_seed

    images, labels = [], []
    for i in range(start, start + n):
        graph = sample_scene(scene_seed(world_seed, i), size, size, word_probability=0.0, max_objects=1)
        images.append(image_to_tensor(render(graph)))
        labels.append(SHAPES.index(graph.objects[0].shape))
    return torch.stack(images), torch.tensor(labels)


def probe(stem: str, args, test_images, test_labels) -> dict:
    import torch
    from torch import nn

    from dalle3_fast.data.world import SHAPES
    from dalle3_fast.models.captioner import CoCa, CoCaConfig

    torch.manual_seed(args.seed)
    config = CoCaConfig.tiny(**STEMS[stem], image_size=args.size)
    encoder = CoCa(config).visual  # built and initialised exactly as inside the captioner
    head = nn.Linear(config.embed_dim, len(SHAPES))
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    step_cpu = []
    encoder.train()
    for step in range(args.steps):
        images, labels = one_object_images(0, step * args.batch_size, args.batch_size, args.size)
        t0 = time.thread_time()
        loss = nn.functional.cross_entropy(head(encoder(images)[0]), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_cpu.append(time.thread_time() - t0)
    encoder.eval()
    with torch.inference_mode():
        predicted = torch.cat([head(encoder(test_images[i: i + 250])[0]).argmax(-1)
                               for i in range(0, len(test_images), 250)])
    return {"stem": stem, "test_accuracy": round(float((predicted == test_labels).float().mean()), 4),
            "final_train_loss": round(float(loss.detach()), 4),
            "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
            "median_step_cpu_ms": round(1000 * statistics.median(step_cpu), 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    test_images, test_labels = one_object_images(1, 0, args.test, args.size)
    rows = []
    for stem in args.stem:
        rows.append(probe(stem, args, test_images, test_labels))
        r = rows[-1]
        print(f"[probe] stem {stem}: shape accuracy {r['test_accuracy']:.3f} on {args.test} held-out images after "
              f"{args.steps} steps x {args.batch_size} (chance 0.167); {r['median_step_cpu_ms']} ms CPU/step",
              file=sys.stderr)
    report = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "test": args.test, "size": args.size,
              "seed": args.seed, "torch_threads": args.threads, "results": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        from dalle3_fast.io import atomic_write_bytes
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
