"""python -m dalle3_fast.data.world --out DIR --n 100000 --size 64: write scene-world shards.

Each sample is ``key.png`` (or ``.jpg``), ``key.txt`` (the alt-text, where img2dataset puts the web
caption) and ``key.json`` ({"graph", "alt", "ssc", "dsc"}). Sample i depends only on (seed, i), so the
output is the same for any --workers; shards already on disk are kept, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
from pathlib import Path

from tqdm import tqdm

from ...io import atomic_write_bytes
from ..shards import DEFAULT_SHARD_SIZE
from .writer import init_worker, shard_name, write_shard, write_shard_job

CONFIG_NAME = "world_config.json"


def parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 24:
        raise argparse.ArgumentTypeError(f"--size {text!r}: use N or WxH with both sides >= 24, e.g. 64 or 96x64")
    return parts[0], parts[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dalle3_fast.data.world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory for the shards (created if missing)")
    p.add_argument("--n", type=int, default=100_000, help="number of samples (default 100000)")
    p.add_argument("--size", type=parse_size, default=(64, 64), help="image size N or WxH (default 64)")
    p.add_argument("--seed", type=int, default=0, help="world seed; sample i depends only on (seed, i)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard (default 10000)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="worker processes (default: CPU count, at most 8)")
    p.add_argument("--format", choices=("png", "jpg"), default="png",
                   help="image encoding (default png: lossless, so the detector reads renders exactly)")
    args = p.parse_args(argv)
    if args.n < 1 or args.shard_size < 1 or args.workers < 1:
        p.error("--n, --shard-size and --workers must be >= 1")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    width, height = args.size
    config = {"n": args.n, "width": width, "height": height, "seed": args.seed, "shard_size": args.shard_size,
              "format": args.format}
    config_path = out / CONFIG_NAME
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        if previous != config:
            print(f"error: {out} holds shards written with {previous}, not {config}; "
                  "use another --out or delete it", file=sys.stderr)
            return 2
    else:
        atomic_write_bytes(config_path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())

    n_shards = math.ceil(args.n / args.shard_size)
    jobs, done = [], 0
    for s in range(n_shards):
        start, stop = s * args.shard_size, min(args.n, (s + 1) * args.shard_size)
        if (out / shard_name(s)).exists():
            done += stop - start
        else:
            jobs.append((str(out), s, start, stop, args.seed, width, height, args.format))
    bar = tqdm(total=args.n, initial=done, unit="img", desc=f"world -> {out}", dynamic_ncols=True)
    if args.workers == 1 or len(jobs) <= 1:
        for job in jobs:
            write_shard(*job, on_sample=lambda: bar.update(1))
    else:
        ctx = multiprocessing.get_context("spawn")
        counter = ctx.Value("q", 0)
        with ctx.Pool(min(args.workers, len(jobs)), initializer=init_worker, initargs=(counter,)) as pool:
            result = pool.map_async(write_shard_job, jobs)
            while not result.ready():
                result.wait(0.25)
                bar.update(done + counter.value - bar.n)
            result.get()  # re-raises a worker's error
            bar.update(done + counter.value - bar.n)
    bar.close()
    print(f"wrote {len(jobs)} shards ({n_shards - len(jobs)} already present) to {out}: "
          f"{shard_name(0)} .. {shard_name(n_shards - 1)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
