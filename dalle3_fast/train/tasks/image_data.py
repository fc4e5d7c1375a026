"""Image (+ caption record) micro-batches for the image tasks, deterministic and resumable.

Two sources, named by the ``data`` option:
- ``"world"``: the procedural scene world, drawn on the fly (sample ``i`` of seed ``s`` is always
  the same picture), so any position is reached without replaying the stream;
- a WebDataset shard spec (``"data/{000000..000099}.tar"``): read in order, sample ``k`` of the
  stream goes to rank ``k % world_size``, shards reshuffled per epoch with a seeded RNG.

Every batch shares one size: ``buckets`` lists the allowed ``[width, height]`` (aspect-ratio
buckets); a world batch picks one with a seeded RNG, a shard sample goes to the bucket nearest its
aspect ratio (resized to cover, centre-cropped) and a batch is emitted when a bucket fills.
Skipping to a resume position reads only image headers.
"""
from __future__ import annotations

import io
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from PIL import Image


@dataclass
class ImageDataOptions:
    data: str = "world"                   # "world" or a WebDataset shard spec
    data_seed: int = 0                    # which world / which shard order
    resolution: int = 64                  # square size when no buckets are given
    buckets: list[list[int]] = field(default_factory=list)  # [[width, height], ...]


def bucket_sizes(options: ImageDataOptions, multiple: int = 8) -> list[tuple[int, int]]:
    sizes = [tuple(b) for b in options.buckets] or [(options.resolution, options.resolution)]
    for s in sizes:
        if len(s) != 2 or min(s) < multiple or s[0] % multiple or s[1] % multiple:
            raise ValueError(f"task_options.buckets / resolution: size {list(s)} must be [width, height], each a "
                             f"multiple of {multiple} and >= {multiple}")
    return sizes


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (for sample grids)."""
    return images.float().add(1).div(2).clamp(0, 1)


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height), keeping the aspect ratio, then centre-crop."""
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> int:
    ratio = math.log(width / height)
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i][0] / sizes[i][1]) - ratio))


def _collate(images: list[Image.Image], records: list[dict]) -> dict:
    return {"image": torch.stack([to_tensor(im) for im in images]), "records": records}


def world_batches(options: ImageDataOptions, batch_size: int, rank: int, world_size: int, start: int,
                  multiple: int = 8) -> Iterator[dict]:
    from dalle3_fast.data.world import world_sample

    sizes = bucket_sizes(options, multiple)
    for m in itertools.count(start):
        g = m * world_size + rank  # global batch number
        w, h = sizes[random.Random(f"{options.data_seed}:bucket:{g}").randrange(len(sizes))]
        pairs = [world_sample(options.data_seed, g * batch_size + j, w, h) for j in range(batch_size)]
        yield _collate([im for im, _ in pairs], [rec for _, rec in pairs])


def _shard_records(options: ImageDataOptions, rank: int, world_size: int):
    """(sample, (width, height)) of this rank's share of the endless, per-epoch-shuffled stream."""
    from dalle3_fast.data.shards import expand_shards, iter_samples

    paths = expand_shards(options.data)
    k = 0
    for epoch in itertools.count():
        order = list(paths)
        random.Random(f"{options.data_seed}:epoch:{epoch}").shuffle(order)
        before = k
        for sample, _ in iter_samples(order, decode_image=False):
            if k % world_size == rank:
                with Image.open(io.BytesIO(sample.members[sample.image_extension])) as im:
                    size = im.size  # header only
                yield sample, size
            k += 1
        if k == before:
            raise ValueError(f"task_options.data: the shards {options.data!r} hold no readable sample")


def _record(sample) -> dict:
    record = dict(sample.json() or {})
    text = sample.text("txt")
    if text is not None:
        record.setdefault("alt", text)
    record.setdefault("key", sample.key)
    return record


def shard_batches(options: ImageDataOptions, batch_size: int, rank: int, world_size: int, start: int,
                  multiple: int = 8) -> Iterator[dict]:
    sizes = bucket_sizes(options, multiple)
    pending: list[list] = [[] for _ in sizes]
    emitted = 0
    for sample, (w, h) in _shard_records(options, rank, world_size):
        b = nearest_bucket(w, h, sizes)
        pending[b].append(sample)
        if len(pending[b]) < batch_size:
            continue
        samples, pending[b] = pending[b], []
        emitted += 1
        if emitted <= start:
            continue  # resume: skipped without decoding
        bw, bh = sizes[b]
        yield _collate([cover_crop(s.image(), bw, bh) for s in samples], [_record(s) for s in samples])


def image_batches(options: ImageDataOptions, batch_size: int, rank: int, world_size: int, start: int,
                  multiple: int = 8) -> Iterator[dict]:
    """``{"image": (B, 3, H, W) in [-1, 1], "records": [caption record per sample]}`` forever."""
    if options.data == "world":
        return world_batches(options, batch_size, rank, world_size, start, multiple)
    return shard_batches(options, batch_size, rank, world_size, start, multiple)


def world_captions(seed: int, count: int) -> list[str]:
    """Captions of all three styles for ``count`` world scenes (tokenizer training text)."""
    from dalle3_fast.data.world import captions, sample_scene, scene_seed

    out = []
    for i in range(count):
        s = scene_seed(seed, i)
        out.extend(captions(sample_scene(s), s).values())
    return out
