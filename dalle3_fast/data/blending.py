"""Caption blending (DALL-E 3, section 3.4): a sample's caption is the synthetic one with probability
``synthetic_ratio`` (default 0.95) and the original web caption otherwise.

The draw is a hash of (seed, epoch, sample key), so it is the same whatever the sharding, rank,
worker or order, and changes from one epoch to the next.
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .buckets import TINY_BUCKETS, Bucket, bucket_batches, closest_bucket, image_to_tensor, resize_to_bucket
from .shards import CorruptSample, Sample, ShardStats, expand_shards, iter_samples

SYNTHETIC_FIELDS = ("dsc", "ssc")


def draw_uniform(seed: int, epoch: int, key: str) -> float:
    """A uniform number in [0, 1) determined by (seed, epoch, key)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def use_synthetic(seed: int, epoch: int, key: str, synthetic_ratio: float) -> bool:
    return draw_uniform(seed, epoch, key) < synthetic_ratio


def sample_captions(sample: Sample, field: str = "dsc",
                    stats: ShardStats | None = None) -> tuple[str | None, str | None]:
    """(synthetic, original) captions of a shard sample.

    Synthetic: the ``.dsc``/``.ssc`` member a recaption job added, else that field of the json (the
    scene world's exact captions). Original: the ``.txt`` member (img2dataset's caption), else the
    json's "alt" or "caption".
    """
    synthetic, original = sample.text(field), sample.text("txt")
    if synthetic is None or original is None:
        try:
            meta = sample.json() or {}
        except CorruptSample as exc:
            if stats is not None:
                stats.note("corrupt_members", str(exc))
            meta = {}
        if synthetic is None and isinstance(meta.get(field), str):
            synthetic = meta[field]
        if original is None:
            original = next((meta[k] for k in ("alt", "caption") if isinstance(meta.get(k), str)), None)
    return synthetic, original


def distributed_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class BlendedShardDataset(IterableDataset):
    """(image, caption) from WebDataset shards with caption blending and aspect-ratio buckets.

    Images come out as float32 (3, H, W) in [-1, 1], resized and centre-cropped to their closest
    bucket. With ``batch_size`` set, it yields (images (B, 3, H, W), captions list[str]) batches whose
    images share one bucket (use ``DataLoader(dataset, batch_size=None)``).

    Sharding: the shard list is shuffled with (seed, epoch), then rank r of world_size takes shards
    r::world_size (torch.distributed if initialised, else RANK/WORLD_SIZE), and DataLoader worker w
    of n takes every n-th of those. Samples pass through a seeded shuffle buffer. Call
    ``set_epoch`` each epoch (before creating the iterator; with persistent workers, recreate the
    loader) so both the order and the caption draws change. Bad samples are skipped and counted in
    ``self.stats`` (per process/worker).
    """

    def __init__(self, shards: str | Sequence[str], *, synthetic_ratio: float = 0.95, caption_field: str = "dsc",
                 seed: int = 0, buckets: Sequence[Bucket] = TINY_BUCKETS, batch_size: int | None = None,
                 drop_last: bool = True, shuffle_buffer: int = 1000, rank: int | None = None,
                 world_size: int | None = None):
        if not 0.0 <= synthetic_ratio <= 1.0:
            raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio}")
        if caption_field not in SYNTHETIC_FIELDS:
            raise ValueError(f"caption_field must be one of {SYNTHETIC_FIELDS}, got {caption_field!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.shards = expand_shards(shards)
        self.synthetic_ratio, self.caption_field, self.seed = synthetic_ratio, caption_field, seed
        self.buckets = tuple(buckets)
        self.batch_size, self.drop_last, self.shuffle_buffer = batch_size, drop_last, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.stats = ShardStats()
        self.missing_synthetic = 0  # samples that had no synthetic caption and used the original

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption(self, sample: Sample) -> str:
        synthetic, original = sample_captions(sample, self.caption_field, self.stats)
        if synthetic is None:
            self.missing_synthetic += 1
            return original or ""
        if original is None or use_synthetic(self.seed, self.epoch, sample.key, self.synthetic_ratio):
            return synthetic
        return original

    def rank_world(self) -> tuple[int, int]:
        rank, world = distributed_rank_world()
        return (self.rank if self.rank is not None else rank,
                self.world_size if self.world_size is not None else world)

    def my_shards(self) -> list[str]:
        rank, world = self.rank_world()
        shards = list(self.shards)
        random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(shards)
        shards = shards[rank::world]
        if not shards:
            raise ValueError(f"rank {rank} of {world} gets no shard: {len(self.shards)} shards cannot feed {world} "
                             "ranks; write the data in at least as many shards as ranks (smaller --shard-size)")
        info = get_worker_info()
        if info is not None:
            shards = shards[info.id::info.num_workers]
        return shards

    def _samples(self) -> Iterator[tuple[Bucket, tuple[torch.Tensor, str]]]:
        info = get_worker_info()
        rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{self.rank_world()[0]}:{info.id if info else 0}")
        buffer: list = []
        for sample, image in iter_samples(self.my_shards(), self.stats):
            bucket = closest_bucket(*image.size, self.buckets)
            item = (bucket, (image_to_tensor(resize_to_bucket(image, bucket)), self.caption(sample)))
            if self.shuffle_buffer <= 1:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        if self.batch_size is None:
            for _, item in self._samples():
                yield item
            return
        for _, batch in bucket_batches(self._samples(), self.batch_size, self.drop_last):
            yield torch.stack([img for img, _ in batch]), [cap for _, cap in batch]
