"""Aspect-ratio buckets: every image goes to the bucket closest in aspect ratio, is resized to cover it
and centre-cropped, and a batch only ever holds one bucket, so variable sizes train without padding.

DALL-E 3 serves 1024x1024, 1792x1024 and 1024x1792; ``scaled_buckets`` gives the same shapes at any
scale (the tiny model trains on 64x64, 96x64 and 64x96).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

T = TypeVar("T")


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {text!r} must look like WIDTHxHEIGHT, e.g. 1792x1024") from None
        if w < 1 or h < 1:
            raise ValueError(f"bucket {text!r} must have positive sides")
        return cls(w, h)


DALLE3_BUCKETS = (Bucket(1024, 1024), Bucket(1792, 1024), Bucket(1024, 1792))
TINY_BUCKETS = (Bucket(64, 64), Bucket(96, 64), Bucket(64, 96))


def scaled_buckets(buckets: Sequence[Bucket], scale: float, multiple: int = 8) -> tuple[Bucket, ...]:
    """``buckets`` scaled by ``scale``, sides rounded to a multiple of ``multiple`` (8 for a KL-f8 VAE)."""
    if scale <= 0 or multiple < 1:
        raise ValueError(f"scale must be > 0 and multiple >= 1, got scale={scale}, multiple={multiple}")
    out = []
    for b in buckets:
        w = max(multiple, int(round(b.width * scale / multiple)) * multiple)
        h = max(multiple, int(round(b.height * scale / multiple)) * multiple)
        if Bucket(w, h) not in out:
            out.append(Bucket(w, h))
    return tuple(out)


def closest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest in log space (ties: the first listed)."""
    if not buckets:
        raise ValueError("buckets is empty; pass e.g. TINY_BUCKETS")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - target))


def resize_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize so the image covers the bucket (keeping its aspect), then centre-crop to it."""
    w, h = image.size
    if (w, h) == (bucket.width, bucket.height):
        return image
    scale = max(bucket.width / w, bucket.height / h)
    nw, nh = max(bucket.width, round(w * scale)), max(bucket.height, round(h * scale))
    resized = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - bucket.width) // 2, (nh - bucket.height) // 2
    return resized.crop((left, top, left + bucket.width, top + bucket.height))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def bucket_batches(items: Iterable[tuple[Hashable, T]], batch_size: int,
                   drop_last: bool = False) -> Iterator[tuple[Hashable, list[T]]]:
    """Streaming: (bucket, item) pairs in, (bucket, batch) out, each batch from one bucket.

    Items wait in a per-bucket buffer until it holds ``batch_size``; leftovers come out at the end
    (or are dropped with ``drop_last``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buffers: dict[Hashable, list[T]] = {}
    for bucket, item in items:
        buf = buffers.setdefault(bucket, [])
        buf.append(item)
        if len(buf) == batch_size:
            yield bucket, buf
            buffers[bucket] = []
    if not drop_last:
        for bucket, buf in buffers.items():
            if buf:
                yield bucket, buf


class BucketBatchSampler(torch.utils.data.Sampler):
    """Map-style batch sampler: batches of indices whose images share a bucket.

    ``sizes``: (width, height) per dataset index. Each epoch (``set_epoch``) shuffles indices within
    buckets and the order of batches with ``seed + epoch``; with ``world_size`` > 1, rank r takes
    batches r::world_size of a list trimmed to a multiple of world_size, so every rank runs the same
    number of steps.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], buckets: Sequence[Bucket], batch_size: int, *,
                 seed: int = 0, drop_last: bool = True, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.buckets = tuple(buckets)
        self.assignment = [closest_bucket(w, h, self.buckets) for w, h in sizes]
        self.batch_size, self.seed, self.drop_last, self.shuffle = batch_size, seed, drop_last, shuffle
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(f"buckets:{self.seed}:{self.epoch}")
        by_bucket: dict[Bucket, list[int]] = {}
        for i, b in enumerate(self.assignment):
            by_bucket.setdefault(b, []).append(i)
        batches = []
        for b in self.buckets:
            idx = by_bucket.get(b, [])
            if self.shuffle:
                rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size
        return batches[:usable][self.rank::self.world_size]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
